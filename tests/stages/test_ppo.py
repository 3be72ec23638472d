"""``lmzoo ppo``: a tiny random policy learns to emit what a reward counts (through the CLI and the shipped
config); a reward model trained by ``lmzoo reward`` is climbed on held-out prompts while the KL to the
reference stays bounded; the buffer's plumbing (values at rollout = the critic's training forward, ratio 1
at the first minibatch, returns = score − β·Σ KL with γ = λ = 1); bad input; the adaptive β across
--resume (at a rollout boundary: bitwise the uninterrupted run; mid-rollout: the β that made the rollout)."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

import lmzoo
from lmzoo.cli.main import main
from lmzoo.stages import ppo, reward
from lmzoo.train.metrics import read_metrics
from tests.stages.test_preference_stages import separable_pairs, small
from tests.stages.test_sft import ROOT, tiny_decoder, tok  # noqa: F401  (tok: the shared tokenizer fixture)

SHIPPED = ROOT / "configs" / "ppo" / "tiny.yaml"
FLAGS = ["--no-progress", "--batch-size", "16", "--max-new-tokens", "8", "--set", "ppo.epochs=2",
         "--set", "ppo.minibatches=2", "--set", "data.builtin={n: 64, n_eval: 8, level: easy, kinds: [sort]}",
         "--set", "eval.n=8", "--set", "eval.max_new_tokens=8", "--set", "eval.samples=2", "--set",
         "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.plot=false"]


def count_o(prompts, responses):
    """The reward of the sanity check: how many times the letter "o" appears (in 14 of the 385 tokens)."""
    return [float(r.count("o")) for r in responses]


def boom(prompts, responses):
    raise ValueError("no reward today")


def short(prompts, responses):
    return [0.0] * (len(responses) - 1)


def cfg(steps: int, **sections) -> dict:
    c = yaml.safe_load(SHIPPED.read_text())
    c["data"].update(batch_size=16, builtin={"n": 64, "n_eval": 8, "level": "easy", "kinds": ["sort"]})
    c["rollout"].update(max_new_tokens=8)
    c["ppo"].update(epochs=2, minibatches=2)
    c["eval"].update(n=8, max_new_tokens=8, samples=2)
    c["train"].update(steps=steps, log_every=1, eval_every=0, progress=False, plot=False, lr=1e-3)
    for name, values in sections.items():
        c[name].update(values)
    return c


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    return lmzoo.save(tiny_decoder("llama", tok), tmp_path_factory.mktemp("base") / "llama", tokenizer=tok)


def test_the_shipped_config_is_valid():
    ppo.check_config(yaml.safe_load(SHIPPED.read_text()), str(SHIPPED))


def test_a_random_policy_learns_to_emit_what_the_reward_counts(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["ppo", "--model", str(base), "--reward", "tests.stages.test_ppo:count_o", "--out", str(out),
                 "--steps", "48", "--lr", "1e-3", *FLAGS]) == 0
    assert capsys.readouterr().out.strip() == str(out / "final")
    ev = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    before, after = ev[0], ev[-1]
    # greedy replies of 8 tokens to held-out prompts: < 1 "o" at the start, most tokens carry one at the end
    assert before["reward/mean"] < 1.0 and after["reward/mean"] > before["reward/mean"] + 2.5, (before, after)
    assert before["kl"] == pytest.approx(0.0, abs=1e-6) and after["kl"] > 0.1  # it moved off the reference
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    for key in ("reward/mean", "reward/std", "kl", "kl_coef", "entropy", "clip_fraction", "response_length",
                "value_loss", "explained_variance", "approx_kl"):
        assert key in train[-1], key
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4 and '"step": 48' in lines[-1]  # 2 greedy replies at step 0 and at the end
    assert lmzoo.load_tokenizer(out / "final").chat_template
    assert not (out / "final" / "config.json").read_text().count("ForSequenceClassification")  # the policy only


def test_ppo_climbs_a_reward_model_on_held_out_prompts_with_bounded_kl(base, tmp_path):
    rm_cfg = small("reward", steps=24, batch_size=8, files=[str(separable_pairs(tmp_path))], val_fraction=0.2)
    rm_cfg["train"]["lr"] = 1e-2
    rm = reward.run_reward(rm_cfg, base, tmp_path / "rm")
    assert rm.after["accuracy"] == 1.0
    # 12 rollouts of 32 prompts (48 steps): the greedy replies flip to what the RM scores highest (≈ 7.2) in
    # 3 of the 4 seeds tried (train.seed 0 stays put); seed 1 here
    c = cfg(48, kl={"coef": 0.1})
    c["data"]["batch_size"], c["train"]["seed"] = 32, 1
    res = ppo.run_ppo(c, base, tmp_path / "ppo", reward=str(rm.final_dir))  # critic: the RM
    before, after = res.before, res.after
    assert after["reward/mean"] > before["reward/mean"] + 3.0, (before, after)  # the RM's score of greedy replies
    assert 0.05 < after["kl"] < 10.0, after  # nats per 8-token reply, exact over the vocabulary
    rows = [r for r in read_metrics(tmp_path / "ppo" / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["kl_coef"] == 0.1 for r in rows)  # the fixed controller


@pytest.mark.parametrize("lora", [False, True])
def test_buffer_plumbing_values_ratio_and_returns(base, tmp_path, lora):
    c = cfg(4, ppo={"gamma": 1.0, "lam": 1.0, "whiten_advantages": False, "critic": "policy"})
    run = ppo.build(c, base, tmp_path / "run", reward=count_o, lora=lora)
    trainer, batches, step_fn = run.trainer, run.batches, run.step_fn
    b = next(batches)  # the first minibatch of the first epoch of the first rollout
    assert b["input_ids"].shape[0] == 8 and batches.rollouts == 1  # half of its 16 rows (2 minibatches)
    m = b["mask"]
    model = trainer.model
    model.train()
    logps, _, values = model(b["input_ids"], b["attention_mask"], int(b["prompt_len"]), 1.0)
    torch.testing.assert_close(values[m], b["old_values"][m], atol=1e-5, rtol=0)  # V at rollout = training forward
    torch.testing.assert_close(logps[m], b["old_logps"][m], atol=1e-4, rtol=0)
    _, metrics = step_fn(model, b)
    assert metrics["clip_fraction"] == 0.0 and metrics["approx_kl"] < 1e-8
    # γ = λ = 1: R_t = Σ_{t' ≥ t} r_t', so R_0 = score − β·Σ_t (log π_old − log π_ref) (k1), whatever V is
    kl = torch.where(m, b["old_logps"] - b["ref_logps"], 0.0).sum(1)
    torch.testing.assert_close(b["returns"][:, 0], b["scores"] - 0.05 * kl, atol=1e-5, rtol=0)
    torch.testing.assert_close(b["advantages"][m], (b["returns"] - b["old_values"])[m], atol=1e-5, rtol=0)
    if lora:  # the reference is the frozen base, which the zero-initialised adapters leave equal to the policy
        torch.testing.assert_close(b["ref_logps"][m], b["old_logps"][m], atol=1e-4, rtol=0)
        assert float(b["kl"]) == pytest.approx(0.0, abs=1e-3)
        res = ppo.run_ppo(c, base, tmp_path / "lora", reward=count_o, lora=True)  # 4 steps: adapter/ and merged final/
        assert (res.adapter_dir / "adapter_config.json").is_file()
        a, z = lmzoo.load(res.final_dir).state_dict(), lmzoo.load(base).state_dict()
        assert a.keys() == z.keys() and any(not torch.equal(a[k], z[k]) for k in a)
    else:
        assert float(b["kl"]) == pytest.approx(0.0, abs=1e-3)  # the frozen copy: the same model at rollout 1
    assert float(b["reward/mean"]) == pytest.approx(float(b["scores"].mean()), abs=0.3)  # this half vs the rollout


def test_bad_input_is_one_clear_error(base, tok, tmp_path, capsys):
    from lmzoo.tokenizers.chat import resolve_template

    other = lmzoo.train_tokenizer("bpe", texts=["some other text"] * 30, vocab_size=280,
                                  special_tokens=["<s>", "</s>", "<pad>"])
    other.set_special("pad", "<pad>")
    other.chat_template = resolve_template("llama2")  # one it can render (no special tokens of its own)
    foreign = lmzoo.save(lmzoo.reward_model(tiny_decoder("llama", other), pad_token_id=other.pad_id),
                         tmp_path / "foreign", tokenizer=other)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n{"prompt": "hello"}\n')
    cases = [("tests.stages.test_ppo:boom", [], "reward tests.stages.test_ppo:boom raised ValueError: no reward today"),
             ("tests.stages.test_ppo:short", [], "returned 7 values for 8 responses"),
             (str(foreign), [], "Set ppo.critic: policy"),
             ("nonsense", [], "neither a reward-model directory"),
             ("task:sort", ["--data", str(tmp_path / "prompts.jsonl")], "a task: reward needs verifiable prompts"),
             ("task:sort", ["--set", "kl.kind=k9"], "kl.kind must be one of"),
             ("task:sort", ["--set", "ppo.gamma=2"], "ppo.gamma must be a number in [0, 1]"),
             ("task:sort", ["--set", "rollout.temperature=0"], "rollout.temperature must be a number in (0"),
             ("task:sort", ["--set", "ppo.clipping=1"], "ppo: unknown key(s) ['clipping']")]
    for spec, extra, message in cases:
        assert main(["ppo", "--model", str(base), "--reward", spec, "--out", str(tmp_path / "never"), "--steps", "1",
                     *FLAGS, *extra]) == 1, spec
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and err[0].startswith("lmzoo ppo: error:") and message in err[0], (spec, extra, err)


def test_the_adaptive_kl_coefficient_survives_resume(base, tmp_path):
    from safetensors.torch import load_file

    c = cfg(8, kl={"controller": "adaptive", "coef": 0.2, "target": 0.01, "horizon": 40},
            train={"save_every": 2, "keep_last": 4}, eval={"n": 2, "samples": 0})
    ppo.run_ppo(c, base, tmp_path / "straight", reward=count_o)

    def coefs(run):
        return {r["step"]: r["kl_coef"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"}

    straight = coefs(tmp_path / "straight")
    betas = [straight[k] for k in (1, 5)]  # rollout 1 (steps 1-4) and rollout 2 (5-8)
    assert betas[1] != betas[0]  # β moved once, after rollout 1
    for kept, wiped in ((4, (6, 8)), (6, (8,))):  # at a rollout boundary, and mid-rollout
        run = tmp_path / f"from{kept}"
        shutil.copytree(tmp_path / "straight", run)
        for step in wiped:
            shutil.rmtree(run / "checkpoints" / f"step_{step:08d}")
        shutil.rmtree(run / "final")
        ppo.run_ppo(c, base, run, reward=count_o, resume=True)
        got = coefs(run)
        assert all(got[s] == straight[s] for s in range(kept + 1, 9)), (kept, got, straight)
    a, b = load_file(tmp_path / "straight" / "final" / "model.safetensors"), load_file(
        tmp_path / "from4" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed at a boundary: bitwise the uninterrupted run


@pytest.mark.slow  # two torchrun launches of 2 CPU processes
def test_two_ranks_sample_their_shares_and_keep_one_beta(base, tmp_path):
    """Under DDP each rank samples its half of the prompts and the controller reads the mean KL over ranks:
    the run ends (no rank waits on another), both ranks saved the same moved β, final/ is written once.
    The same under FSDP2 (the ranks decode in step)."""
    import json
    import os
    import subprocess
    import sys

    def torchrun(out, parallel):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmzoo",
               "ppo", "--model", str(base), "--reward", "tests.stages.test_ppo:count_o", "--out", str(out),
               "--steps", "8", *FLAGS, "--set", "kl.controller=adaptive", "--set", "kl.target=0.01",
               "--set", "kl.horizon=40", "--set", f"train.parallel={parallel}"]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    proc = torchrun(tmp_path / "ddp", "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(tmp_path / "ddp" / "final")]  # rank 0 saved and said so
    last = tmp_path / "ddp" / "checkpoints" / "step_00000008"
    betas = [json.loads((last / f"rank_{r:05d}.json").read_text())["data"]["kl_coef"] for r in (0, 1)]
    assert betas[0] == betas[1] != 0.05, betas
    assert lmzoo.load(tmp_path / "ddp" / "final").config.vocab_size == 385
    proc = torchrun(tmp_path / "fsdp", "fsdp")  # policy and critic sharded, called through their root
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "fsdp" / "checkpoints" / "step_00000008"
    fsdp_betas = [json.loads((last / f"rank_{r:05d}.json").read_text())["data"]["kl_coef"] for r in (0, 1)]
    # one β on both ranks (not DDP's to the bit: FSDP sums gradients in another order, and a sampled token
    # that flips changes the KL the controller reads)
    assert fsdp_betas[0] == fsdp_betas[1] != 0.05, fsdp_betas
    assert lmzoo.load(tmp_path / "fsdp" / "final").config.vocab_size == 385
