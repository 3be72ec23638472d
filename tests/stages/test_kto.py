"""``lmzoo dpo --loss kto`` (lmzoo.stages.kto) on tiny models: the KL rows are mismatched within their
batch as TRL builds them, the reference's log-probs line up with their rows, KTO lifts the desirable
completions' implicit reward above the undesirable ones' on held-out data, the CLI on an unpaired file
(with LoRA), and bad input."""

from __future__ import annotations

import json

import pytest

import lmzoo
from lmzoo.cli.main import main
from lmzoo.stages import kto
from lmzoo.train.metrics import read_metrics
from tests.stages.test_preference_stages import separable_pairs, small
from tests.stages.test_sft import tiny_decoder, tok  # noqa: F401  (tok: the shared tokenizer fixture)


def kto_cfg(steps: int, **data) -> dict:
    cfg = small("dpo", steps=steps, **data)
    cfg["loss"] = {"name": "kto", "beta": 0.5}
    cfg["train"]["lr"] = 3e-3
    return cfg


def unpaired_file(path, labels=(True, False), label_of=None):
    """Per prompt, "7" desirable and "五" not (as ``separable_pairs``), in TRL's unpaired records."""
    rows = [{"prompt": f"What is {i} + 4?", "completion": "7" if good else "五", "label": good}
            for i in range(20) for good in labels]
    if label_of is not None:
        rows[0]["label"] = label_of
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_kl_rows_pair_each_prompt_with_another_completion_of_its_batch(tok):
    from lmzoo.data.preference import UnpairedExample, encode_unpaired
    from lmzoo.data.sft import IGNORE

    prompts, answers = [f"What is {i} + 4?" for i in range(11)], [str(i) * (1 + i % 3) for i in range(11)]
    ex = encode_unpaired(tok, [UnpairedExample([{"role": "user", "content": p}], a, i % 2 == 0)
                               for i, (p, a) in enumerate(zip(prompts, answers))], "chatml", max_len=64)
    rows = kto.mismatched(ex, 4, seed=0, max_len=64)
    flat = sorted(i for g in rows.groups for i in g)
    assert flat == list(range(11)) and all(4 <= len(g) < 8 for g in rows.groups)  # 11 // 4 = 2 batches: 6 and 5

    def start(labels):
        return next(k for k, y in enumerate(labels) if y != IGNORE)

    def parts(ids, labels):  # (prompt text, completion text) split at the first labelled token
        return tok.decode(ids[:start(labels)]), tok.decode(ids[start(labels):])

    for g in rows.groups:
        own = [parts(ex.input_ids[i], ex.labels[i]) for i in g]
        kl = [parts(rows.kl.input_ids[i], rows.kl.labels[i]) for i in g]
        for j in range(len(g)):  # TRL's rotation: x_j with y_{j-1}, the first with the last's
            assert kl[j] == (own[j][0], own[j - 1][1])
        assert sorted(c for _, c in kl) == sorted(c for _, c in own)  # the batch's own completions, re-paired
    short = kto.mismatched(ex, 4, seed=0, max_len=12, max_prompt_len=8)  # prompts are longer than 12 tokens
    for g in short.groups:
        for j, i in enumerate(g):
            ids, labels, s = short.kl.input_ids[i], short.kl.labels[i], start(short.kl.labels[i])
            p = g[j - 1]
            assert start(ex.labels[i]) > 12 and len(ids) == len(labels) == 12  # the row is cut to max_len...
            assert ids[:s] == ex.input_ids[i][:start(ex.labels[i])][-s:]  # ...from the prompt's start
            completion = ex.input_ids[p][start(ex.labels[p]):]
            assert s >= 8 and ids[s:] == completion[:12 - s]  # at least max_prompt_len, then the completion's start
            assert len(completion) > 12 - 8 or ids[s:] == completion  # whole, where max_prompt_len leaves it room


def test_the_weights_warning_is_trls():
    """TRL 1.16's bounds (KTO paper, eq. 8) for 10 desirable and 30 undesirable examples, by hand:
    desirable_weight in [30/10, 1.33·30/10] = [3.0, 3.99] or undesirable_weight in [10/39.9, 10/30]."""
    data = [True] * 10 + [False] * 30
    msg = kto.balance_warning(data, 1.0, 1.0)
    assert "[3.0, 3.99]" in msg and "[0.25, 0.33]" in msg and "= 0.33 is outside [1, 4/3]" in msg
    assert kto.balance_warning(data, 3.5, 1.0) is None and kto.balance_warning(data, 1.0, 0.3) is None
    assert kto.balance_warning([True, False] * 5, 1.0, 1.0) is None
    assert kto.balance_warning([True, False] * 5, 2.0, 1.0) is not None  # ratio 2, even with equal counts
    assert "all 4 training examples are desirable" in kto.balance_warning([True] * 4, 1.0, 1.0)


def test_kto_lifts_desirable_rewards_above_undesirable_ones_on_held_out_data(tok, tmp_path):
    model_dir = lmzoo.save(tiny_decoder("llama", tok), tmp_path / "base", tokenizer=tok)
    cfg = kto_cfg(10, files=[str(separable_pairs(tmp_path))], val_fraction=0.2)  # pairs, unpaired as TRL does
    res = kto.run_kto(cfg, model_dir, tmp_path / "kto")
    assert res.data_summary.startswith("64 completions (32 desirable kept)")  # 32 training pairs, both halves
    first = next(r for r in read_metrics(tmp_path / "kto" / "metrics.jsonl") if r["split"] == "train")
    # at step 1 the policy is the reference: r = 0 and z = 0 on every row (so the precomputed reference
    # log-probs sit on their own rows and KL rows), and every loss is 1 − σ(0) = 1/2
    assert first["loss"] == pytest.approx(0.5, abs=1e-5) and first["kl"] == pytest.approx(0.0, abs=1e-5)
    assert res.before["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert res.after["rewards/chosen"] > 1.0 and res.after["rewards/rejected"] < -1.0, res.after
    assert res.after["rewards/margins"] > 2.0 and res.after["kl"] >= 0.0
    assert (tmp_path / "kto" / "dpo.png").stat().st_size > 0 and lmzoo.load_tokenizer(res.final_dir).chat_template


def test_builtin_pairs_are_unpaired_with_the_accuracy_hook(tok, tmp_path):
    model_dir = lmzoo.save(tiny_decoder("gpt2", tok), tmp_path / "base", tokenizer=tok)
    res = kto.run_kto(kto_cfg(2), model_dir, tmp_path / "kto")
    assert res.data_summary.startswith("128 completions (64 desirable kept)")  # builtin n: 64 pairs
    assert 0.0 <= res.after["accuracy"] <= 1.0 and {"kl", "rewards/margins"} <= set(res.after)


def test_cli_on_an_unpaired_file_with_lora(tok, tmp_path, capsys):
    model_dir = lmzoo.save(tiny_decoder("llama", tok), tmp_path / "base", tokenizer=tok)
    out = tmp_path / "run"
    assert main(["dpo", "--model", str(model_dir), "--loss", "kto", "--data", str(unpaired_file(tmp_path / "u.jsonl")),
                 "--out", str(out), "--steps", "10", "--lr", "1e-2", "--batch-size", "4", "--max-len", "64", "--lora",
                 "--no-progress", "--set", "loss.beta=0.5", "--set", "data.val_fraction=0.2"]) == 0
    err = capsys.readouterr().err
    assert "loss kto (beta 0.5" in err and "; kl " in err
    assert (out / "final" / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    ev = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    assert ev[0]["step"] == 0 and ev[-1]["step"] == 10
    assert ev[-1]["rewards/margins"] > ev[0]["rewards/margins"] + 0.5, ev  # LoRA on the frozen reference base


def test_bad_input(tok, tmp_path, capsys):
    model_dir = lmzoo.save(tiny_decoder("llama", tok), tmp_path / "base", tokenizer=tok)
    common = ["dpo", "--model", str(model_dir), "--out", str(tmp_path / "never"), "--steps", "1", "--no-progress",
              "--max-len", "64", "--batch-size", "4"]
    only = unpaired_file(tmp_path / "good.jsonl", labels=(True,))  # 20 records, all desirable
    cases = [(["--loss", "kto", "--data", str(unpaired_file(tmp_path / "bad.jsonl", label_of="yes"))],
              "bad.jsonl: line 1: label holds 'yes', expected true or false"),
             (["--set", "loss.desirable_weight=2"], "loss.desirable_weight is KTO's"),
             (["--loss", "kto", "--set", "loss.undesirable_weight=-1"], "undesirable_weight must be a number ≥ 0"),
             (["--loss", "kto", "--batch-size", "1"], "fewer than 2 examples per batch"),
             (["--loss", "kto", "--data", str(only)], "held-out examples: 1 completions")]  # 5% of 20 records
    for extra, message in cases:
        assert main([*common, *extra]) == 1, extra
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and err[0].startswith("lmzoo dpo: error:") and message in err[0], (extra, err)
    # only desirable examples: KTO still has a target (z), so it trains, with a warning naming the problem
    assert main([*common, "--loss", "kto", "--data", str(only), "--out", str(tmp_path / "one"), "--set",
                 "data.val_fraction=0.2"]) == 0
    warning = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "all 16 training examples are desirable" in warning[0], warning


def test_resume_is_bitwise_the_uninterrupted_run(tok, tmp_path):
    """Resumed from its step-2 checkpoint, a run draws the same fixed batches and ends with the same weights."""
    import shutil

    import torch
    from safetensors.torch import load_file

    model_dir = lmzoo.save(tiny_decoder("llama", tok), tmp_path / "base", tokenizer=tok)
    cfg = kto_cfg(4, files=[str(separable_pairs(tmp_path))], val_fraction=0.2)
    cfg["train"]["save_every"] = 2
    kto.run_kto(cfg, model_dir, tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "crashed")
    for later in ("final", "checkpoints/step_00000004"):  # what a crash after step 2 would not have
        shutil.rmtree(tmp_path / "crashed" / later)
    kto.run_kto(cfg, model_dir, tmp_path / "crashed", resume=True)
    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("straight", "crashed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # one torchrun launch of 2 processes: about 10 s on 2 cores
def test_two_ddp_ranks(tok, tmp_path):
    """Each rank trains on its own fixed batch, with the reference log-probs of its own rows (step 1: loss
    1/2 and z = 0 on both), z averaged over the ranks, and the same metric keys on both (the loop
    all-reduces them); the held-out margin rises and rank 0 alone writes final/."""
    from tests.stages.test_preference_distributed import _torchrun

    model_dir = lmzoo.save(tiny_decoder("llama", tok), tmp_path / "base", tokenizer=tok)
    out = tmp_path / "ddp"
    stdout = _torchrun(["dpo", "--loss", "kto", "--model", str(model_dir), "--data",
                        str(unpaired_file(tmp_path / "u.jsonl")), "--out", str(out), "--steps", "4", "--batch-size",
                        "8", "--max-len", "64", "--lr", "3e-3", "--no-progress", "--set", "loss.beta=0.5", "--set",
                        "data.val_fraction=0.2", "--set", "train.log_every=1", "--set", "train.warmup_steps=0"], "ddp")
    assert stdout.split() == [str(out / "final")]
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-5) and train[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert [r["tokens"] for r in train] == [8, 16, 24, 32]  # 2 ranks × a fixed batch of 4 examples a step
    ev = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    assert ev[-1]["rewards/margins"] > ev[0]["rewards/margins"] + 1.0, ev
