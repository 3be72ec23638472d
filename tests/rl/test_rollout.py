"""Rollouts: the recorded log-probs equal a training forward's on the whole left-padded sequence, early
stops are masked where the EOS fell, seeds reproduce, and top-k/top-p leave the recorded values alone."""

from __future__ import annotations

import pytest
import torch

import lmzoo
from lmzoo.errors import LmzooError
from lmzoo.rl import rollout, sequence_token_logps
from tests.stages.test_sft import tiny_decoder, tok  # noqa: F401  (tok: the shared tokenizer fixture)

PROMPTS = ["What is 3 + 4?", "hello", "从小到大排序：3 1 2 ->"]  # three lengths: left padding differs per row
SAMPLING = dict(temperature=0.7, top_k=40, top_p=0.9)


pytestmark = pytest.mark.usefixtures("one_thread")


def _policy(family: str, tok):
    """A tiny random decoder with weights N(0, 0.07²): PyTorch's default N(0, 1) embedding gives GPT-2's tied head
    logits so large that every distribution is one-hot (log-probs all 0), which would test nothing."""
    from lmzoo.train.init import init_weights

    torch.manual_seed(0)
    return init_weights(tiny_decoder(family, tok), std=0.07).float()


def _prompts(tok):
    return [tok.encode(p) for p in PROMPTS]


def _first(row: list[int], token: int, limit: int) -> int:
    """Response length when ``token`` stops the row: up to and including its first occurrence."""
    return row.index(token) + 1 if token in row else limit


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_recorded_logps_equal_a_training_forward_and_early_stops_are_masked(family, tok):
    model = _policy(family, tok)
    prompts, n, new = _prompts(tok), 2, 10
    free = rollout(model, prompts, n=n, max_new_tokens=new, generator=torch.Generator().manual_seed(0), **SAMPLING)
    P = free.prompt_len
    assert P == max(len(p) for p in prompts) and free.input_ids.shape == (len(prompts) * n, P + new)
    # the third token of row 0 becomes the EOS: the same seed draws the same tokens until each row meets it
    eos = int(free.input_ids[0, P + 2])
    rows = free.input_ids[:, P:].tolist()
    want = [_first(r, eos, new) for r in rows]
    out = rollout(model, prompts, n=n, max_new_tokens=new, eos_token_id=eos, pad_token_id=tok.pad_id,
                  generator=torch.Generator().manual_seed(0), **SAMPLING)
    assert out.response_lengths.tolist() == want and want[0] <= 3 and max(want) == new  # some stop, some run on
    assert out.ended_with_eos.tolist() == [eos in r for r in rows]
    assert out.input_ids.shape[1] == P + max(want) and out.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    for k, (length, prompt) in enumerate(zip(want, [p for p in prompts for _ in range(n)])):
        resp = out.input_ids[k, P:]
        assert resp[:length].tolist() == rows[k][:length]  # the tokens the free run drew
        assert (resp[length:] == tok.pad_id).all()  # the engine's pads after the EOS
        assert out.response_mask[k].tolist() == [0] * P + [1] * length + [0] * (len(resp) - length)
        assert out.attention_mask[k].tolist() == [0] * (P - len(prompt)) + [1] * (len(prompt) + length) + [0] * (
            len(resp) - length)
        assert out.input_ids[k, P - len(prompt):P].tolist() == prompt  # left-padded prompt
    mask = out.response_mask.bool()
    assert (out.logps[~mask] == 0).all() and (out.logps[mask] < 0).all()

    model.train()  # one training forward, with grad, over prompt + response
    recomputed = sequence_token_logps(model, out.input_ids, out.attention_mask, out.response_mask, temperature=0.7)
    assert recomputed.requires_grad and recomputed.dtype == torch.float32
    delta = (recomputed.detach() - out.logps).abs().max().item()
    print(f"{family}: max |recomputed - recorded| log-prob = {delta:.2e}")
    assert delta <= 1e-5 and (recomputed[~mask] == 0).all()
    # the rollout's tensors are ordinary ones (not inference tensors): a PPO-style ratio trains through them
    ratio = (recomputed - out.logps).exp()  # (N, T), 1 where the policy has not moved
    (ratio * out.response_mask).sum().backward()
    assert all(not getattr(out, f).is_inference() for f in ("input_ids", "attention_mask", "response_mask", "logps"))
    # independently of the padding: row 2 alone (no pads), log softmax(z / τ) by hand
    k, length = 2, want[2]
    row = out.input_ids[k, P - len(prompts[1]):P + length][None]  # (1, t)
    with torch.no_grad():
        logp = (model(row).logits[0].float() / 0.7).log_softmax(-1)  # (t, V)
    t0 = len(prompts[1])
    by_hand = torch.stack([logp[t - 1, row[0, t]] for t in range(t0, t0 + length)])
    torch.testing.assert_close(out.logps[k, P:P + length], by_hand, atol=1e-5, rtol=0)


def test_the_same_seed_gives_the_same_rollouts(tok):
    model = _policy("llama", tok)
    kw = dict(n=3, max_new_tokens=8, temperature=1.2, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    a, b, c = (rollout(model, _prompts(tok), generator=torch.Generator().manual_seed(s), **kw) for s in (1, 1, 2))
    for f in ("input_ids", "attention_mask", "response_mask", "logps", "ended_with_eos", "response_lengths"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not torch.equal(a.input_ids, c.input_ids)
    assert not torch.equal(a.input_ids[0], a.input_ids[1])  # a prompt's samples differ from each other


def test_top_k_leaves_the_recorded_logps_those_of_the_temperature_scaled_distribution(tok):
    """top_k=1 draws the argmax, so it must equal greedy decoding; its recorded log-probs are those of the full
    distribution (below 0), not of the truncated one (which would be log 1 = 0)."""
    model = _policy("llama", tok)
    prompts = _prompts(tok)
    greedy = rollout(model, prompts, max_new_tokens=6, temperature=0)
    top1 = rollout(model, prompts, max_new_tokens=6, temperature=1.0, top_k=1,
                   generator=torch.Generator().manual_seed(0))
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    assert torch.equal(greedy.input_ids[:, width:], lmzoo.generate(model, ids, mask, max_new_tokens=6)[:, width:])
    assert torch.equal(top1.input_ids, greedy.input_ids)
    torch.testing.assert_close(top1.logps, greedy.logps, atol=1e-6, rtol=0)
    assert (greedy.logps[greedy.response_mask.bool()] < -1e-3).all()


def test_response_ids_max_len_and_bad_input(tok):
    model = _policy("llama", tok)
    prompt = tok.encode("hello world 你好 世界 hello world")
    out = rollout(model, [prompt], max_new_tokens=4, temperature=0, max_len=7)
    assert out.prompt_len == 3 and out.input_ids[0, :3].tolist() == prompt[-3:]  # the prompt keeps its end
    eos = int(out.input_ids[0, 4])  # the second new token
    stopped = rollout(model, [prompt], max_new_tokens=4, temperature=0, max_len=7, eos_token_id=eos)
    assert stopped.response_ids() == [out.input_ids[0, 3:4].tolist()]  # cut before the EOS
    assert stopped.response_ids(drop_eos=False) == [out.input_ids[0, 3:5].tolist()]
    for kw, msg in ((dict(n=0), "n"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                    (dict(max_len=4, max_new_tokens=4), "max_len")):
        with pytest.raises(LmzooError, match=msg):
            rollout(model, [prompt], **kw)
    with pytest.raises(LmzooError, match="at least one token"):
        rollout(model, [prompt, []])
    with pytest.raises(ValueError, match="must be one"):
        sequence_token_logps(model, out.input_ids, out.attention_mask, out.response_mask[:, 1:])
