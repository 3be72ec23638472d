"""Resume after SIGKILL is bitwise exact; corrupt checkpoints are skipped; NaN never reaches a checkpoint."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.train import TrainConfig, Trainer, TrainingError, TrainingInterrupted
from lmzoo.train.checkpoint import latest_valid, list_checkpoints, load_model_weights
from tests.train import run_tiny
from tests.train.tiny import ProgressionBatches, causal_step, tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "tests.train.run_tiny", str(out), *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _last_logged_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    steps = [0]
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError):
                pass
    return max(steps)


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max |Δ| = {(a[k] - b[k]).abs().max().item()}"


def test_sigkill_at_random_steps_then_resume_is_bitwise_equal(tmp_path):
    steps = 120  # room to spare: a fast machine runs several steps between the target and the kill
    run_tiny.main([str(tmp_path / "ref"), "--steps", str(steps)])  # the uninterrupted run, in this process
    rng = random.Random(7)
    out, reached, kills = tmp_path / "crashy", 0, []
    for _ in range(3):
        target = rng.randint(reached + 2, reached + 4)
        proc = _run(out, "--steps", str(steps), "--resume-or-start")  # the first launch finds none
        deadline = time.time() + 60
        while _last_logged_step(out) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.08))  # anywhere in the step: forward, optimizer, checkpoint writing
        assert proc.poll() is None, "the run finished before it could be killed; lower the targets"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        reached = _last_logged_step(out)
        kills.append(reached)
    assert kills[-1] < steps
    _finish(_run(out, "--steps", str(steps), "--resume"))
    _assert_bitwise_equal(load_file(out / "final.safetensors"), load_file(tmp_path / "ref" / "final.safetensors"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # redone steps are not logged twice
    ref_rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


def _trainer(out, steps=8, **kw):
    cfg = TrainConfig(steps=steps, lr=1e-2, log_every=1, save_every=2, keep_last=3, progress=False, plot=False, **kw)
    return Trainer(tiny_model(seed=1), ProgressionBatches(batch_size=4), causal_step, cfg, out)


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    ref = _trainer(tmp_path / "ref")
    ref.fit()
    _trainer(tmp_path / "run").fit()
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.rmtree(ckpts / "step_00000008")  # as if killed before step 8's checkpoint
    (ckpts / ".tmp-step_00000008").mkdir()  # ... while writing it
    newest = list_checkpoints(ckpts)[0][1]
    assert newest.name == "step_00000006"
    blob = bytearray((newest / "optimizer.safetensors").read_bytes())
    blob[-3] ^= 0xFF  # one flipped bit pattern in the data: same size, different hash
    (newest / "optimizer.safetensors").write_bytes(bytes(blob))
    with pytest.warns(RuntimeWarning, match="step_00000006.*SHA-256"):
        assert latest_valid(ckpts).name == "step_00000004"
    again = _trainer(tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="skipping checkpoint step_00000006"):
        res = again.fit(resume=True)
    assert res.resumed_from.name == "step_00000004" and res.step == 8
    _assert_bitwise_equal(again.full_state_dict(), ref.full_state_dict())
    assert [s for s, _ in list_checkpoints(ckpts)] == [8, 6, 4]  # step 6 rewritten whole; keep_last held
    assert not (ckpts / ".tmp-step_00000008").exists()  # the interrupted write was cleaned up
    latest_valid(ckpts)  # every kept checkpoint verifies again


def test_checkpoint_without_manifest_is_skipped(tmp_path):
    _trainer(tmp_path, steps=4).fit()
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_00000004" / "manifest.json").unlink()
    with pytest.warns(RuntimeWarning, match="step_00000004.*no manifest.json"):
        assert latest_valid(ckpts).name == "step_00000002"
    (ckpts / "step_00000002" / "model.safetensors").write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="step_00000002.*truncated"):
        with pytest.warns(RuntimeWarning, match="step_00000004"):
            assert latest_valid(ckpts) is None


def test_resume_with_nothing_to_resume_is_an_error_unless_start_if_missing(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing to resume in .*checkpoints \(it holds no checkpoint\)"):
        _trainer(tmp_path / "a", steps=2).fit(resume=True)
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    res = _trainer(tmp_path / "a", steps=2).fit(resume=True, start_if_missing=True)
    assert res.resumed_from is None and res.step == 2 and len(res.history) == 2
    (tmp_path / "a" / "checkpoints" / "step_00000002" / "manifest.json").unlink()
    with pytest.warns(RuntimeWarning, match="skipping checkpoint step_00000002"):
        with pytest.raises(CheckpointError, match=r"none of its 1 checkpoint\(s\) verifies"):
            _trainer(tmp_path / "a", steps=2).fit(resume=True)


def _sigint_at(calls_to_signal: set[int]):
    """A step function that sends this process SIGINT (as Ctrl-C does) during the given forward calls."""
    calls = {"n": 0}

    def step_fn(model, batch):
        calls["n"] += 1
        if calls["n"] in calls_to_signal:
            os.kill(os.getpid(), signal.SIGINT)
        return causal_step(model, batch)
    return step_fn


def test_ctrl_c_finishes_the_step_saves_it_and_resumes_bitwise(tmp_path):
    ref = _trainer(tmp_path / "ref", steps=8)
    ref.fit()
    cfg = TrainConfig(steps=8, lr=1e-2, log_every=1, save_every=0, progress=False, plot=False)
    tr = Trainer(tiny_model(seed=1), ProgressionBatches(batch_size=4), _sigint_at({3}), cfg, tmp_path / "run")
    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 3; checkpoint .*step_00000003") as info:
        tr.fit()
    assert info.value.step == 3 and info.value.checkpoint == tmp_path / "run" / "checkpoints" / "step_00000003"
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [3]  # save_every 0: the interrupt's
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back
    again = _trainer(tmp_path / "run", steps=8)
    assert again.fit(resume=True).resumed_from.name == "step_00000003"
    _assert_bitwise_equal(again.full_state_dict(), ref.full_state_dict())


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    cfg = TrainConfig(steps=8, grad_accum=2, lr=1e-2, log_every=1, progress=False, plot=False)
    tr = Trainer(tiny_model(seed=1), ProgressionBatches(batch_size=4), _sigint_at({5, 6}), cfg, tmp_path)
    with pytest.raises(KeyboardInterrupt) as info:  # both in step 3 (its two micro-batches)
        tr.fit()
    assert not isinstance(info.value, TrainingInterrupted)  # the plain one, from inside step 3's second forward
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_fresh_start_refuses_to_overwrite_existing_checkpoints(tmp_path):
    _trainer(tmp_path, steps=2).fit()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        _trainer(tmp_path, steps=2).fit()


def _nan_at(step_to_poison: int):
    calls = {"n": 0}

    def step_fn(model, batch):
        calls["n"] += 1
        loss, metrics = causal_step(model, batch)
        return (loss * float("nan") if calls["n"] == step_to_poison else loss), metrics
    return step_fn


def test_nan_stop_keeps_the_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(steps=10, lr=1e-2, log_every=1, save_every=2, progress=False, plot=False, nan_policy="stop")
    tr = Trainer(tiny_model(seed=1), ProgressionBatches(batch_size=4), _nan_at(5), cfg, tmp_path)
    with pytest.raises(TrainingError, match=r"step 5: loss nan.*not finite.*step_00000004.*untouched"):
        tr.fit()
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [4, 2]
    good = load_model_weights(latest_valid(tmp_path / "checkpoints"), tiny_model(seed=99))
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_nan_skip_leaves_weights_unchanged_for_that_step(tmp_path):
    cfg = TrainConfig(steps=5, lr=1e-2, log_every=1, progress=False, plot=False, nan_policy="skip")
    tr = Trainer(tiny_model(seed=1), ProgressionBatches(batch_size=4), _nan_at(3), cfg, tmp_path)
    snapshots = []
    inner = tr._train_step

    def spy():
        rec = inner()
        snapshots.append({k: v.clone() for k, v in tr.model.state_dict().items()})
        return rec
    tr._train_step = spy
    res = tr.fit()
    assert res.skipped_steps == 1 and res.history[2].get("skipped") and res.step == 5
    _assert_bitwise_equal(snapshots[2], snapshots[1])  # step 3 changed nothing
    assert not torch.equal(snapshots[3]["lm_head.weight"], snapshots[2]["lm_head.weight"])
    assert all(torch.isfinite(v).all() for v in snapshots[-1].values())


def test_too_many_nan_steps_in_a_row_stop(tmp_path):
    cfg = TrainConfig(steps=6, log_every=1, progress=False, plot=False, nan_policy="skip", max_skipped_steps=2)
    always_nan = lambda m, b: (causal_step(m, b)[0] * float("inf"), {})
    tr = Trainer(tiny_model(), ProgressionBatches(batch_size=4), always_nan, cfg, tmp_path)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        tr.fit()
    assert list_checkpoints(tmp_path / "checkpoints") == []
