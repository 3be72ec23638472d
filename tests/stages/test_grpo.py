"""``lmzoo grpo``: a random policy learns what a reward counts; from a partly trained SFT model GRPO on
the built-in tasks makes held-out greedy answers right more often; bad rewards and bad input are one
clear error; a resumed run ends with the uninterrupted run's weights; LoRA's reference is the base."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import lmzoo
from lmzoo.cli.main import main
from lmzoo.stages import grpo, rl
from tests.stages.conftest import SORTING
from tests.stages.test_sft import tiny_decoder, tok  # noqa: F401  (tok: the fixture)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "configs" / "grpo" / "tiny.yaml"
TINY = ["--set", "data.batch_size=16", "--set", "rollout.group_size=4", "--set", "rollout.max_new_tokens=6",
        "--set", "eval.samples=2", "--set", "train.log_every=1", "--set", "train.eval_every=0", "--no-progress",
        "--lr", "1e-2"]


# -- module:function rewards the CLI imports by name ---------------------------------------------------


def sevens(prompts, responses):
    """How many 7s the reply has."""
    return [r.count("7") for r in responses]


def raises(prompts, responses):
    raise ValueError("the grader is down")


def nan(prompts, responses):
    return [float("nan")] * len(responses)


def too_few(prompts, responses):
    return [1.0] * (len(responses) - 1)


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):  # noqa: F811
    return lmzoo.save(tiny_decoder("llama", tok), tmp_path_factory.mktemp("grpo") / "base", tokenizer=tok)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "kind": "add", "answer": str(i + 1)}) + "\n"
                            for i in range(16)), encoding="utf-8")
    return path


def records(out: Path, split: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("split") == split]


def test_the_shipped_config_is_valid():
    cfg = yaml.safe_load(SHIPPED.read_text())
    grpo.check_config(cfg, str(SHIPPED))
    assert cfg["data"]["batch_size"] % cfg["rollout"]["group_size"] == 0 and cfg["reward"]["spec"] == "task:all"


def test_a_random_policy_learns_to_say_what_the_reward_counts(base, prompts_file, tmp_path):
    """Reward = the number of 7s in 6 new tokens: from a random policy (about one 7 in ten tokens) the
    rollouts' mean reward rises to most of its maximum in a few steps; the KL to the reference (the
    starting model) is 0 at the first step, since the policy is the reference there, and grows."""
    assert main(["grpo", "--model", str(base), "--data", str(prompts_file), "--out", str(tmp_path / "run"),
                 "--reward", "tests.stages.test_grpo:sevens", "--steps", "12", *TINY]) == 0
    rec = records(tmp_path / "run")
    reward = [r["reward/mean"] for r in rec]
    assert len(rec) == 12 and reward[0] < 1.0 and sum(reward[-3:]) / 3 > 3.5, reward  # at most 6
    assert rec[0]["kl"] < 1e-5 and rec[-1]["kl"] > 0.1, [r["kl"] for r in rec]
    # 6 new tokens unless a stop token was drawn (a random policy draws one now and then)
    assert all(0 <= r["clip_fraction"] <= 1 and 1 <= r["response_length"] <= 6 for r in rec), rec
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 12, 12]
    assert samples[-1]["reward"] == samples[-1]["response"].count("7") and samples[-1]["reward"] >= 3
    assert (tmp_path / "run" / "grpo.png").stat().st_size > 0 and (tmp_path / "run" / "final" / "config.json").exists()


def test_builtin_grpo_makes_the_sft_model_answer_better(sft_sorting, tmp_path):
    """The end-to-end claim, from a partly trained SFT model (sorting three digits, as the preference
    test starts): GRPO with the task checker's reward makes its greedy answers to held-out tasks (the SFT
    run's own held-out ones, unseen by either run) right more often, and its sampled rewards higher."""
    import sys

    start = sft_sorting.final_dir
    tasks = SORTING
    cfg = yaml.safe_load(SHIPPED.read_text())
    cfg["data"].update(batch_size=64, builtin=tasks)
    # μ = 2 passes × 2 minibatches per rollout: 50 rollouts of 64 for 200 steps (3 seeds: +6, +6, +9 points)
    cfg["rollout"].update(group_size=8, max_new_tokens=12, temperature=0.7, epochs=2, minibatches=2)
    cfg["eval"].update(n=100, max_new_tokens=12, samples=0)
    cfg["train"].update(steps=GRPO_STEPS, lr=1e-4, log_every=1, eval_every=0, progress=False, plot=False)
    res = grpo.run_grpo(cfg, start, tmp_path / "grpo")
    reward = [r["reward/mean"] for r in res.train.history]
    n = len(reward) // 4
    assert res.after["accuracy"] >= res.before["accuracy"] + 0.05, (res.before, res.after)
    assert sum(reward[-n:]) / n > sum(reward[:n]) / n, reward
    print(f"grpo: greedy answers right {res.before['accuracy']:.2f} -> {res.after['accuracy']:.2f}, rollout reward "
          f"{sum(reward[:n]) / n:.2f} -> {sum(reward[-n:]) / n:.2f} (first / last quarter)", file=sys.__stderr__)


GRPO_STEPS = 200

def test_bad_input_is_one_clear_error(base, prompts_file, tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "hello world " * 200}) + "\n", encoding="utf-8")
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "hi"}) + "\n", encoding="utf-8")
    data = ["--data", str(prompts_file)]
    cases = [
        ([*data, "--reward", "tests.stages.test_grpo:raises"], "reward tests.stages.test_grpo:raises raised "
                                                               "ValueError: the grader is down"),
        ([*data, "--reward", "tests.stages.test_grpo:nan"], "returned nan for response 0; rewards must be finite"),
        ([*data, "--reward", "tests.stages.test_grpo:too_few"], "returned 1 values for 2 responses"),  # the 2 eval samples
        ([*data, "--reward", "tests.stages.test_grpo:absent"], "has no 'absent'"),
        ([*data, "--set", "rollout.group_size=3"], "data.batch_size 16 (responses per rollout) is not a multiple of "
                                                   "rollout.group_size 3"),
        (["--data", str(long), "--reward", "tests.stages.test_grpo:sevens"], "prompt 1 is"),
        (["--data", str(bare)], "a task: reward needs each prompt's task"),
        ([*data, "--set", "rollout.temperature=0"], "rollout.temperature must be > 0"),
        ([*data, "--held-out", str(bare)], "record 1 is not a verifiable task"),
        (["--held-out", str(prompts_file)], "data.held_out is for prompts from files"),
    ]
    for extra, message in cases:
        assert main(["grpo", "--model", str(base), "--out", str(tmp_path / "never"), "--steps", "1", *TINY,
                     *extra]) == 1, extra
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and err[0].startswith("lmzoo grpo: error:") and message in err[0], (extra, err)
    assert not (tmp_path / "never" / "final").exists()


def test_prompt_files_measure_accuracy_on_a_held_out_file(base, prompts_file, tmp_path):
    """--held-out: with --data, the accuracy of greedy answers to the file's tasks is measured before the
    first step and at the end, as on the built-in tasks (and not without it)."""
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"What is {i} + 2?", "kind": "add", "answer": str(i + 2)}) + "\n"
                            for i in range(5)), encoding="utf-8")
    for extra, out in ((["--held-out", str(held)], "with"), ([], "without")):
        assert main(["grpo", "--model", str(base), "--data", str(prompts_file), "--out", str(tmp_path / out),
                     "--reward", "tests.stages.test_grpo:sevens", "--steps", "2", *TINY, *extra]) == 0
    evals = records(tmp_path / "with", "eval")
    assert [r["step"] for r in evals] == [0, 2] and all(0 <= r["accuracy"] <= 1 for r in evals), evals
    assert not any("accuracy" in r for r in records(tmp_path / "without", "eval"))


def test_resume_at_a_rollout_boundary_ends_with_the_uninterrupted_weights(base, prompts_file, tmp_path, capsys):
    """Two minibatches per rollout (so the second step's ratio is against the rollout's recorded
    log-probs), checkpoints every 2 steps: resumed from step 2 (a rollout boundary, as after a crash),
    the run ends with the uninterrupted 4-step run's weights, bit for bit."""
    from safetensors.torch import load_file

    common = ["grpo", "--model", str(base), "--data", str(prompts_file), "--reward", "tests.stages.test_grpo:sevens",
              "--steps", "4", "--save-every", "2", "--set", "rollout.minibatches=2", *TINY]
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    shutil.copytree(tmp_path / "straight", tmp_path / "crashed")
    for later in ("final", "checkpoints/step_00000004"):
        shutil.rmtree(tmp_path / "crashed" / later)
    assert main([*common, "--out", str(tmp_path / "crashed"), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("straight", "crashed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(Path(base) / "model.safetensors")
    assert any(not torch.equal(a[k], before[k]) for k in a)  # it trained
    assert [r["reward/mean"] for r in records(tmp_path / "crashed")] == [r["reward/mean"] for r in
                                                                         records(tmp_path / "straight")]


def test_lora_reference_is_the_base_without_a_copy(base, prompts_file, tmp_path):
    from lmzoo.peft import apply_lora
    from lmzoo.rl.rollout import sequence_token_logps

    model = lmzoo.load(base)
    plain = lmzoo.load(base)
    apply_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora" in n:
                p.normal_(0, 0.5)  # adapters far from zero: the policy is no longer the base
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    am, rm = torch.ones_like(ids), torch.tensor([[0, 0, 0, 1, 1, 1]])
    ref = rl.reference_logps(model, beta=0.1, lora=True, temperature=1.0)
    assert not hasattr(ref, "model")  # no frozen copy kept
    with torch.no_grad():
        want, moved = sequence_token_logps(plain, ids, am, rm), sequence_token_logps(model, ids, am, rm)
        got = ref(ids, am, rm)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (moved - want).abs().max() > 1e-2
    assert rl.reference_logps(model, beta=0.0, lora=True, temperature=1.0) is None
    # a LoRA run: the adapters start at B = 0, so the KL to the base is 0 at the first step, then grows
    assert main(["grpo", "--model", str(base), "--data", str(prompts_file), "--out", str(tmp_path / "lora"),
                 "--reward", "tests.stages.test_grpo:sevens", "--steps", "6", "--lora", *TINY]) == 0
    rec = records(tmp_path / "lora")
    assert rec[0]["kl"] < 1e-6 and rec[-1]["kl"] > 1e-4, [r["kl"] for r in rec]
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").exists()
    merged, start = lmzoo.load(tmp_path / "lora" / "final"), lmzoo.load(base)
    with torch.no_grad():
        assert (sequence_token_logps(merged, ids, am, rm) - sequence_token_logps(start, ids, am, rm)).abs().max() > 1e-3


@pytest.mark.slow  # one torchrun launch of 2 processes
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_sample_their_own_prompts_and_finish(parallel, base, prompts_file, tmp_path):
    """2 CPU ranks (gloo): each samples its half of the prompts (rows stop at different steps per rank;
    under FSDP the ranks decode in step until both are done) and the loop's update syncs them; nothing
    hangs, final/ is written once."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmzoo",
           "grpo", "--model", str(base), "--data", str(prompts_file), "--out", str(tmp_path / "ddp"), "--reward",
           "tests.stages.test_grpo:sevens", "--steps", "3", "--parallel", parallel, *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = records(tmp_path / "ddp")
    assert [r["step"] for r in rec] == [1, 2, 3] and all(math.isfinite(r["reward/mean"]) for r in rec)
    assert proc.stdout.strip().endswith("final") and lmzoo.load(tmp_path / "ddp" / "final") is not None
