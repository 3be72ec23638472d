"""``lmzoo reward`` and ``lmzoo dpo`` on ChatGLM-6B, the GLM prefix decoder (one response per row, right
padded; the prefix and the 2D positions read off each row's [gMASK] <sop>): the rows carry them, also
truncated; a response's log-probs on a padded batch equal a direct computation with the reference forward;
both stages learn separable pairs, the saved reward model reloads with the same scores; bad input."""

from __future__ import annotations

import pytest
import torch

import lmzoo
from lmzoo.cli.main import main
from lmzoo.data.preference import IGNORE, PaddedPairs, PreferencePair, concatenated, encode_pairs
from lmzoo.errors import ConfigError
from lmzoo.objectives.logprobs import response_logps
from lmzoo.stages import dpo, reward
from tests.stages.test_preference_stages import separable_pairs, small
from tests.stages.test_sft import tiny_decoder, tok  # noqa: F401  (tok: the shared tokenizer fixture)

TOL = 1e-5


def _base(tok, tmp_path):
    return lmzoo.save(tiny_decoder("chatglm", tok), tmp_path / "base", tokenizer=tok)


def _rows(tok, pairs, **kw) -> dict:
    """The (2B, T) rows of ``pairs`` as the stages batch them (chatglm template, padded with <pad>)."""
    ex = encode_pairs(tok, pairs, "chatglm", **kw)
    return concatenated(PaddedPairs(ex, tok.pad_id).batch(range(len(ex)))), ex


def test_rows_end_the_prompt_with_gmask_sop_also_when_truncated(tok):
    tail = [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")]
    long = "从小到大排序：3 1 2 " * 12  # about 150 tokens: the prompt is cut from the left
    pairs = [PreferencePair([{"role": "user", "content": "What is 3 + 4?"}], "7", "五"),
             PreferencePair([{"role": "user", "content": long}], "1 2 3", "3 2 1")]
    both, ex = _rows(tok, pairs, max_len=24)
    assert ex.truncated == 1 and ex.kept == 1
    for ids, labels in zip(both["input_ids"].tolist(), both["labels"].tolist()):
        start = next(k for k, y in enumerate(labels) if y != IGNORE)  # the response's first token
        assert ids[start - 2:start] == tail, ids
        assert ids.count(tail[0]) == 1 and ids.count(tail[1]) == 1  # one prefix per row


def test_response_logps_on_a_right_padded_batch_equal_the_reference():
    """log π(y | x) of each row of a right-padded batch equals the sum over the response's tokens of the
    reference forward's log-softmax on the row alone (tests/models/chatglm/test_parity.py: ChatGLM-6B's
    equations on the release's weights): the pads after a response change nothing, the prompt is not scored."""
    import tempfile
    from pathlib import Path

    from tests.models.chatglm import test_parity as glm

    path = Path(tempfile.mkdtemp()) / "release"
    sd = glm.original_state(glm.HP)
    glm.write_original(path, sd, glm.original_config())
    model = lmzoo.load(path).eval()
    rows = [(glm.prompt(5, 6, 7), [8, 9, 10, glm.EOP]), (glm.prompt(11, 12), [13, glm.EOP]),
            (glm.prompt(14, 15, 16, 17, 18), [19, 20, 21, 22, 23, glm.EOP])]
    T = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((3, T), glm.PAD)
    labels, mask = torch.full((3, T), IGNORE), torch.zeros(3, T, dtype=torch.long)
    want = []
    for b, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[b, :n], mask[b, :n], labels[b, len(p):n] = torch.tensor(p + r), 1, torch.tensor(r)
        with torch.no_grad():
            logp = glm.reference_logits(sd, glm.HP, ids[b:b + 1, :n])[0].log_softmax(-1)  # (n, V)
        want.append(sum(logp[t - 1, ids[b, t]].item() for t in range(len(p), n)))
    with torch.no_grad():
        got = response_logps(model, ids, labels, mask)
        mean = response_logps(model, ids, labels, mask, average=True)
    want = torch.tensor(want)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    torch.testing.assert_close(mean, want / torch.tensor([4.0, 2.0, 6.0]), atol=TOL, rtol=0)
    assert got.abs().min() > 1.0  # a real sum over several tokens


def test_reward_model_learns_the_pairs_and_reloads_with_equal_scores(tok, tmp_path):
    model_dir = _base(tok, tmp_path)
    cfg = small("reward", steps=24, batch_size=8, files=[str(separable_pairs(tmp_path))], val_fraction=0.2,
                template="chatglm")
    cfg["train"]["lr"] = 1e-2
    res = reward.run_reward(cfg, model_dir, tmp_path / "rm")
    assert res.after["accuracy"] == 1.0, (res.before, res.after)  # every held-out pair ranked right
    rows = [r for r in lmzoo.train.metrics.read_metrics(tmp_path / "rm" / "metrics.jsonl") if r["split"] == "train"]
    first, last = (sum(r["loss"] for r in part) / 6 for part in (rows[:6], rows[-6:]))
    assert last < first - 0.02, (first, last)  # the Bradley–Terry loss falls (ln 2 at the start)

    # the saved directory: its own tokenizer and template render the texts, lmzoo.score pads them in batches
    prompts = [[{"role": "user", "content": f"What is {i} + 4?"}] for i in (50, 61, 7)]
    texts = [tok.render_chat(p + [{"role": "assistant", "content": a}], template="chatglm")[0]
             for p in prompts for a in ("7", "五")]
    scores = lmzoo.score(res.final_dir, texts, batch_size=4)
    assert all(c > r for c, r in zip(scores[::2], scores[1::2])), scores  # new prompts, still ranked right
    # a direct computation: the causal model with the saved decoder weights, each text alone, its final
    # hidden state at the last token times the saved score.weight
    rm = lmzoo.load(res.final_dir)
    causal = lmzoo.load(model_dir)
    missing, unexpected = causal.load_state_dict(rm.decoder.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("lm_head") for k in missing)
    with torch.no_grad():
        direct = [(causal(torch.tensor([tok.encode(t)])).hidden_states[0, -1] @ rm.score.weight[0]).item()
                  for t in texts]
    assert max(abs(a - b) for a, b in zip(scores, direct)) <= TOL, (scores, direct)


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_pulls_the_chosen_answers_ahead(lora, tok, tmp_path):
    model_dir = _base(tok, tmp_path)
    cfg = small("dpo", steps=10, template="chatglm")
    cfg["loss"].update(name="sigmoid", beta=0.5, sft_weight=0.0)
    cfg["train"]["lr"] = 1e-2 if lora else 3e-3  # the adapters start at zero
    res = dpo.run_dpo(cfg, model_dir, tmp_path / "dpo", lora=lora)
    assert res.before["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # the policy is the reference
    assert res.after["rewards/margins"] > res.before["rewards/margins"] + 0.1, res.after  # measured: 1.0, 0.22 (LoRA)
    assert 0.0 <= res.after["accuracy"] <= 1.0  # greedy answers through the engine, [gMASK] <sop> prompts
    assert lmzoo.load_tokenizer(res.final_dir).chat_template
    if lora:
        assert (res.adapter_dir / "adapter_config.json").is_file()


def test_bad_input_is_one_clear_error(tok, tmp_path, capsys):
    model_dir = _base(tok, tmp_path)
    # with no --template this vocabulary (it has <|im_start|>) picks ChatML, which a prefix decoder cannot read
    cases = [("dpo", [], "does not put them there; use --template chatglm"),
             ("reward", ["--template", "chatglm", "--set", "data.max_prompt_len=1"], "must keep its last 2 tokens")]
    for stage, extra, message in cases:
        assert main([stage, "--model", str(model_dir), "--out", str(tmp_path / "never"), "--steps", "1",
                     "--no-progress", *extra]) == 1, extra
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and err[0].startswith(f"lmzoo {stage}: error:") and message in err[0], (extra, err)
    with pytest.raises(ConfigError, match="must keep its last 2 tokens"):  # the default: max_len // 2
        dpo.run_dpo(small("dpo", max_len=3, template="chatglm"), model_dir, tmp_path / "short")
