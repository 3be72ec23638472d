"""``lmzoo dpo`` and ``lmzoo reward`` under ``torchrun`` (2 CPU processes, gloo) against the same command
in one process on the same global batch, as tests/train/test_distributed.py does for the loop itself:
DDP and FSDP2 follow the one-process DPO loss curve and held-out statistics (the greedy-answer accuracy
hook included), final/ is written once, by rank 0, and loads, and a reward model trained on 2 FSDP ranks
ranks the held-out pairs and scores texts as the one-process one does."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import lmzoo
from lmzoo.cli.main import main
from lmzoo.train.metrics import read_metrics
from tests.stages.test_sft import ROOT, tiny_decoder, tok  # noqa: F401  (tok: the shared tokenizer fixture)
from tests.train.test_distributed import _rel_diff

pytestmark = pytest.mark.slow  # three torchrun launches of 2 processes: about a minute on 2 cores

STEPS = 4
COMMON = ["--no-progress", "--steps", str(STEPS), "--max-len", "64", "--set", "train.log_every=1",
          "--set", "train.eval_every=2", "--set", "train.warmup_steps=0", "--set", "train.plot=false"]
# built-in pairs (so the greedy-answer accuracy hook runs too); 2 micro-batches of 4 pairs a step; plain DPO:
# the RPO term (loss.sft_weight) is a mean over each rank's tokens, and ranks hold different numbers of them
DPO = ["--loss", "sigmoid", "--beta", "0.5", "--set", "loss.sft_weight=0", "--lr", "3e-3", "--batch-size", "4",
       "--set", "train.grad_accum=2",
       "--set", "data.builtin={n: 64, n_eval: 8, level: easy}", "--set", "eval.n=8", "--set", "eval.max_new_tokens=4"]
REWARD = ["--lr", "1e-2", "--batch-size", "8", "--set", "data.val_fraction=0.2"]


def _cli(stage: str, model_dir, out, *extra) -> list[str]:
    return [stage, "--config", str(ROOT / "configs" / stage / "tiny.yaml"), "--model", str(model_dir), "--out",
            str(out), *COMMON, *(DPO if stage == "dpo" else REWARD), *extra]


def _one_process(args: list[str]) -> str:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(args) == 0
    torch.set_num_threads(before)
    return stdout.getvalue()


def _torchrun(args: list[str], parallel: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmzoo",
           *args, "--set", f"train.parallel={parallel}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    causes = "\n".join(ln for ln in proc.stderr.splitlines() if "Error:" in ln or "error:" in ln)  # each rank's
    assert proc.returncode == 0, f"{causes}\n...\n{proc.stderr[-3000:]}"
    return proc.stdout


def _split(out, split: str) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == split]


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    return lmzoo.save(tiny_decoder("llama", tok), tmp_path_factory.mktemp("base") / "llama", tokenizer=tok)


@pytest.fixture(scope="module")
def dpo_runs(base, tmp_path_factory):
    """{parallel: (run folder, stdout)} for one process ("none") and 2 ranks under DDP and FSDP2."""
    root = tmp_path_factory.mktemp("dpo")
    runs = {"none": (root / "none", _one_process(_cli("dpo", base, root / "none")))}
    for parallel in ("ddp", "fsdp"):
        runs[parallel] = (root / parallel, _torchrun(_cli("dpo", base, root / parallel), parallel))
    return runs


@pytest.fixture(scope="module")
def reward_runs(base, tmp_path_factory):
    """Pairs a tiny model learns in a few steps, the wrong way round for its random score head: the held-out
    accuracy starts at 0 and ends at 1, so both runs must get the same evaluations right, not just finish."""
    root = tmp_path_factory.mktemp("reward")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} + 4?", "chosen": "五", "rejected": "7"}) + "\n"
                             for i in range(40)), encoding="utf-8")
    runs = {"none": (root / "none", _one_process(_cli("reward", base, root / "none", "--data", str(pairs))))}
    runs["fsdp"] = (root / "fsdp", _torchrun(_cli("reward", base, root / "fsdp", "--data", str(pairs)), "fsdp"))
    return runs


# DPO's implicit reward β·(log π − log π_ref) is a difference of sums of ~10 token log-probs (≈ -20 each), and
# each rank pads its half of a batch to its own length, so float32 roundings (1.2e-7 relative) of ~2e-6 in a
# log-prob reach the loss at ~1e-6 relative (measured: 6.5e-7 DDP, 5.9e-7 FSDP); the pretrain test's equal-shape
# batches stay at 1.2e-7.
DPO_RTOL = 1e-5


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_dpo_on_two_ranks_follows_the_one_process_run(dpo_runs, parallel):
    one, _ = dpo_runs["none"]
    two, stdout = dpo_runs[parallel]
    ref, got = _split(one, "train"), _split(two, "train")
    assert len(got) == STEPS and json.loads((two / "run.json").read_text())["world_size"] == 2
    # step 1: the policy is its reference, so every pair's loss is ln 2, on every rank's rows only if each
    # rank's precomputed reference log-probs are those of its own rows
    assert got[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    rel = _rel_diff([r["loss"] for r in got], [r["loss"] for r in ref])
    print(f"dpo {parallel} vs one process: max relative loss difference {rel:.2e}")
    assert rel <= DPO_RTOL, (rel, got, ref)
    for a, b in zip(got, ref):  # TRL's statistics: the mean over both ranks' pairs, as one process sees them
        for key in ("rewards/margins", "rewards/accuracies", "logps/chosen", "tokens"):
            if key == "rewards/accuracies" and a["step"] == 1:
                continue  # the policy is its reference: each margin is 0 up to rounding, so its sign is noise
            assert a[key] == pytest.approx(b[key], rel=DPO_RTOL, abs=1e-5), (key, a, b)
    ref_eval, got_eval = _split(one, "eval"), _split(two, "eval")
    assert [r["step"] for r in got_eval] == [0, 2, 4] and "accuracy" in got_eval[-1]
    assert ref_eval[-1]["rewards/margins"] > ref_eval[0]["rewards/margins"] + 0.1  # training moved something
    for a, b in zip(got_eval, ref_eval):  # every held-out pair, on every rank
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for key in a.keys() - {"split", "step"}:
            assert a[key] == pytest.approx(b[key], rel=DPO_RTOL, abs=1e-5), (key, a, b)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_dpo_final_model_is_saved_once_and_loads(dpo_runs, parallel):
    one, _ = dpo_runs["none"]
    two, stdout = dpo_runs[parallel]
    assert stdout.split() == [str(two / "final")]  # rank 0 saved and said so; rank 1 said nothing
    assert lmzoo.load_tokenizer(two / "final").chat_template
    a, b = lmzoo.load(one / "final").state_dict(), lmzoo.load(two / "final").state_dict()
    assert a.keys() == b.keys()
    # Adam's first steps move every weight by about lr (3e-3) per step whatever the gradient's size, so the
    # few weights whose gradients are rounding noise differ by a few % of that (measured: 9.6e-5 at most)
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=3e-4)


def test_reward_model_on_two_fsdp_ranks_matches_the_one_process_one(reward_runs, tok):
    one, _ = reward_runs["none"]
    two, stdout = reward_runs["fsdp"]
    assert stdout.split() == [str(two / "final")]
    ref, got = _split(one, "eval"), _split(two, "eval")
    print("reward held-out accuracy, one process:", [r["accuracy"] for r in ref], "2 FSDP ranks:",
          [r["accuracy"] for r in got])
    assert [r["accuracy"] for r in ref] == [0.0, 1.0, 1.0]  # learned: the wrong way round at first
    for a, b in zip(got, ref, strict=True):
        assert a["accuracy"] == b["accuracy"]
        assert a["margin"] == pytest.approx(b["margin"], rel=1e-4, abs=1e-5)
    losses = [[r["loss"] for r in _split(d, "train")] for d in (one, two)]
    # -log σ(margin) falls to ~1e-3, so its relative rounding grows: compare absolutely (measured: 2.2e-6)
    assert len(losses[1]) == STEPS and max(abs(x - y) for x, y in zip(*losses)) <= 2e-5, losses
    texts = ["What is 3 + 4? 五", "What is 3 + 4? 7", "你好 世界"]
    torch.testing.assert_close(torch.tensor(lmzoo.score(two / "final", texts)),
                               torch.tensor(lmzoo.score(one / "final", texts)), rtol=1e-3, atol=1e-3)
