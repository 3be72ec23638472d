"""The loop on the tiny model: schedules, accumulation, precision, checkpointed activations,
evaluation and what a run writes (metrics.jsonl, loss.png)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from lmzoo.errors import ConfigError
from lmzoo.train import TrainConfig, Trainer, TrainingError
from lmzoo.train.optim import lr_factor, param_groups
from tests.train.tiny import ProgressionBatches, causal_step, eval_batches, tiny_model


def _fit(tmp_path, batch_size=8, model=None, step_fn=causal_step, batches=None, **kw):
    base = dict(steps=6, lr=1e-2, log_every=1, progress=False, plot=False)
    cfg = TrainConfig(**(base | kw))
    tr = Trainer(model or tiny_model(seed=3), batches or ProgressionBatches(batch_size), step_fn, cfg, tmp_path,
                 eval_batches=eval_batches())
    return tr, tr.fit()


def test_schedule_by_hand():
    cfg = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)  # cos(0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(π/2) = 0
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    lin = cfg.replace(schedule="linear")
    assert lr_factor(35, lin) == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr_factor(50, cfg.replace(schedule="constant")) == 1.0


def test_logged_lr_follows_the_schedule(tmp_path):
    _, res = _fit(tmp_path, steps=5, warmup_steps=2, min_lr=1e-3)
    cfg = TrainConfig(steps=5, lr=1e-2, warmup_steps=2, min_lr=1e-3)
    assert [r["lr"] for r in res.history] == pytest.approx([1e-2 * lr_factor(s, cfg) for s in range(5)])


def test_weight_decay_only_on_matrices():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_accumulating_two_half_batches_equals_one_full_batch(tmp_path):
    a, res_a = _fit(tmp_path / "a", batch_size=8, grad_accum=1)

    class Halves(ProgressionBatches):  # the same rows, as two micro-batches of 4
        def __next__(self):
            i, half = divmod(self.index, 2)
            self.index += 1
            return {"input_ids": self.global_batch(i)[half * 4:(half + 1) * 4]}

    b, res_b = _fit(tmp_path / "b", batches=Halves(8), grad_accum=2)
    la, lb = [r["loss"] for r in res_a.history], [r["loss"] for r in res_b.history]
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5
    assert res_a.history[-1]["tokens"] == res_b.history[-1]["tokens"] == 6 * 8 * 15
    for k, v in a.full_state_dict().items():
        torch.testing.assert_close(v, b.full_state_dict()[k], rtol=1e-5, atol=1e-6)


def test_clipping_bounds_the_update(tmp_path):
    model = tiny_model(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr, res = _fit(tmp_path, model=model, steps=1, clip_grad=1e-9, lr=1.0, weight_decay=0.0, optimizer_impl="loop")
    assert res.history[0]["grad_norm"] > 0.1  # the norm is logged before clipping
    # AdamW normalises the step, so clipping shows in the moments: m = (1 - β1)·g with ||g|| = 1e-9
    m = [s["exp_avg"] for s in tr.optimizer.state.values()]
    assert math.sqrt(sum(float(t.pow(2).sum()) for t in m)) == pytest.approx(0.1 * 1e-9, rel=1e-3)
    assert any(not torch.equal(v, before[k]) for k, v in tr.model.state_dict().items())


def test_bf16_autocast_on_cpu_learns_and_keeps_fp32_weights(tmp_path):
    tr, res = _fit(tmp_path, steps=12, precision="bf16")
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.3
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    assert math.isfinite(res.eval["loss"])


def _snapshots(tr: Trainer) -> list[dict]:
    """The weights after every step of ``tr``'s run (filled as it trains)."""
    snaps, inner = [], tr._train_step

    def spy():
        rec = inner()
        snaps.append({k: v.detach().clone() for k, v in tr.model.state_dict().items()})
        return rec
    tr._train_step = spy
    return snaps


def test_fp16_loss_scaling_learns_and_halves_the_scale_on_each_overflow(tmp_path):
    """fp16 autocast with torch's dynamic loss scaler (on the CPU here; the same code path as on a GPU):
    it learns, the weights stay fp32, and every overflowed step is skipped and halves the scale."""
    tr, res = _fit(tmp_path, steps=12, precision="fp16")
    assert tr.precision.scaler is not None and tr.precision.scaler.is_enabled()
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.3
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    overflows = sum(bool(r.get("overflow")) for r in res.history)
    # 65536 to start, x0.5 per overflow, x2 only after 2000 clean steps (torch's defaults)
    assert tr.precision.scaler.get_scale() == 65536.0 * 0.5 ** overflows
    saved = json.loads((res.checkpoint / "trainer.json").read_text())["scaler"]
    assert saved["scale"] == tr.precision.scaler.get_scale()  # the scaler's state is in every checkpoint


def test_fp16_overflow_skips_the_update_and_backs_off(tmp_path):
    calls = {"n": 0}

    def huge_at_4(model, batch):  # a finite loss whose scaled gradients overflow at step 4
        calls["n"] += 1
        loss, metrics = causal_step(model, batch)
        return (loss * 1e35 if calls["n"] == 4 else loss), metrics

    cfg = TrainConfig(steps=6, lr=1e-2, log_every=1, progress=False, plot=False, precision="fp16")
    tr = Trainer(tiny_model(seed=3), ProgressionBatches(8), huge_at_4, cfg, tmp_path)
    snaps = _snapshots(tr)
    scales = []
    inner_step = tr.precision.step
    tr.precision.step = lambda opt: (ok := inner_step(opt), scales.append(tr.precision.scaler.get_scale()))[0]
    res = tr.fit()
    assert res.history[3].get("overflow") is True and res.step == 6
    assert scales[3] == scales[2] / 2  # backed off
    for k, v in snaps[3].items():
        assert torch.equal(v, snaps[2][k]), k  # step 4 changed nothing
    assert not torch.equal(snaps[4]["lm_head.weight"], snaps[3]["lm_head.weight"])  # step 5 trains again
    assert all(torch.isfinite(v).all() for v in snaps[-1].values())


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="inductor needs a C++ compiler")
def test_compile_gives_the_eager_run(tmp_path):
    """``compile: true`` (inductor): the same losses and weights as eager to float32 rounding, the same names.
    Measured on the CPU (3 steps, 1 layer): losses within 2.4e-7, weights within 6.5e-7; ~15-60 s to compile."""
    a, ra = _fit(tmp_path / "eager", steps=3, model=tiny_model(seed=3, n_layers=1))
    b, rb = _fit(tmp_path / "compiled", steps=3, model=tiny_model(seed=3, n_layers=1), compile=True)
    assert [r["loss"] for r in rb.history] == pytest.approx([r["loss"] for r in ra.history], rel=1e-5, abs=0)
    sa, sb = a.full_state_dict(), b.full_state_dict()
    assert list(sa) == list(sb)  # parameter names unchanged
    for k, v in sa.items():
        torch.testing.assert_close(sb[k], v, rtol=0, atol=1e-5)
    assert any(not torch.equal(v, tiny_model(seed=3, n_layers=1).state_dict()[k]) for k, v in sa.items())


def test_activation_checkpointing_gives_the_same_run(tmp_path):
    a, ra = _fit(tmp_path / "a")
    b, rb = _fit(tmp_path / "b", activation_checkpointing=True)
    assert [r["loss"] for r in ra.history] == pytest.approx([r["loss"] for r in rb.history], rel=1e-6)
    assert list(a.full_state_dict()) == list(b.full_state_dict())  # parameter names unchanged


def _token_dropout_step(model, batch):
    """Draws from the global RNG, so anything else drawing from it would change the run."""
    ids = batch["input_ids"]
    ids = ids.masked_fill(torch.rand(ids.shape) < 0.2, 0)
    return causal_step(model, {"input_ids": ids})


def test_evaluation_does_not_change_training_and_reports_ppl_and_bpb(tmp_path):
    a, ra = _fit(tmp_path / "a", step_fn=_token_dropout_step, eval_every=0)
    b, rb = _fit(tmp_path / "b", step_fn=_token_dropout_step, eval_every=1)
    for k, v in a.full_state_dict().items():
        assert torch.equal(v, b.full_state_dict()[k])
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert {"step", "loss"} <= r.keys()
    e = evals[-1]
    assert e["ppl"] == pytest.approx(math.exp(e["loss"]))
    assert e["bpb"] == pytest.approx(e["loss"] / (2 * math.log(2)))  # tiny.py: 2 bytes per token
    assert e["tokens"] == 2 * 8 * 15


def test_same_seed_same_run_and_loss_curve_png(tmp_path):
    a, ra = _fit(tmp_path / "a", step_fn=_token_dropout_step, seed=11, plot=True)
    b, rb = _fit(tmp_path / "b", step_fn=_token_dropout_step, seed=11)
    c, rc = _fit(tmp_path / "c", step_fn=_token_dropout_step, seed=12)
    assert [r["loss"] for r in ra.history] == [r["loss"] for r in rb.history]
    assert [r["loss"] for r in ra.history] != [r["loss"] for r in rc.history]
    png = tmp_path / "a" / "loss.png"
    if pytest.importorskip("matplotlib"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_running_out_and_iterators_without_state(tmp_path):
    with pytest.raises(TrainingError, match="data ran out at step 3"):
        _fit(tmp_path / "a", batches=ProgressionBatches(8, limit=2))
    with pytest.raises(ConfigError, match="state_dict"):
        Trainer(tiny_model(), iter([]), causal_step, TrainConfig(steps=1), tmp_path / "b")


def test_tensorboard_is_optional(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="tensorboard"):
            _fit(tmp_path, tensorboard=True)
        return
    _fit(tmp_path, tensorboard=True, steps=2)
    assert any((tmp_path / "tensorboard").iterdir())


@pytest.mark.parametrize("field,value,message", [
    ("schedule", "step", "'schedule' must be one of"), ("steps", 0, r"train\.steps must be an integer >= 1, got 0"),
    ("min_lr", 1.0, "'min_lr' must be between 0 and lr"), ("nan_policy", "ignore", "'nan_policy'"),
    ("betas", (0.9, 1.5), "'betas'"),
    # one rule for integer fields: an integer, not a bool, a float or a string (lmzoo/models/config_base.py)
    ("warmup_steps", 2.5, r"train\.warmup_steps must be an integer >= 0, got 2\.5 \(float\)"),
    ("save_every", "10", r"train\.save_every must be an integer >= 0, got '10' \(str\)"),
    ("keep_last", True, r"train\.keep_last must be an integer >= 1, got True \(bool\)"),
    ("seed", 3.0, r"train\.seed must be an integer >= 0, got 3\.0 \(float\)"),
    ("plot", "false", r"train\.plot must be true or false, got 'false' \(str\)"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_config_from_yaml_values():
    cfg = TrainConfig.from_dict({"lr": "3e-4", "steps": 5})
    assert cfg.lr == 3e-4
    with pytest.raises(ConfigError, match=r"unknown training option\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
