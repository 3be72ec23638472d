"""The step options that only change speed give the same run: the AdamW implementation
(``optimizer_impl``) and the chunked cross-entropy (``loss_chunk``) through the loop.

fused, foreach and loop are three implementations of one update (torch's ``_fused_adamw``,
``_multi_tensor_adamw``, ``_single_tensor_adamw``); they order the same float32 operations
differently, so runs agree to rounding, not bitwise. ``compile: true`` is checked the same way in
``test_loop.py::test_compile_gives_the_eager_run``; the chunked loss's values and gradients against
the plain head in ``tests/objectives/test_chunked_ce.py``.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from lmzoo.train import TrainConfig, Trainer
from tests.train.tiny import ProgressionBatches, causal_step, tiny_model


def _run(tmp_path, step_fn=causal_step, **kw):
    cfg = TrainConfig(**(dict(steps=5, lr=1e-2, log_every=1, progress=False, plot=False) | kw))
    tr = Trainer(tiny_model(seed=5), ProgressionBatches(8), step_fn, cfg, tmp_path)
    res = tr.fit()
    return tr, [r["loss"] for r in res.history], tr.full_state_dict()


@pytest.mark.skipif("fused" not in inspect.signature(torch.optim.AdamW).parameters, reason="torch has no fused AdamW")
def test_fused_foreach_and_loop_adamw_give_the_same_run(tmp_path):
    runs = {impl: _run(tmp_path / impl, optimizer_impl=impl) for impl in ("loop", "foreach", "fused")}
    defaults = {impl: tr.optimizer.defaults for impl, (tr, _, _) in runs.items()}
    # each option really picked its implementation (otherwise the comparison below proves nothing)
    assert defaults["fused"]["fused"] and not defaults["loop"]["foreach"] and defaults["foreach"]["foreach"]
    assert not defaults["loop"]["fused"] and not defaults["foreach"]["fused"]
    _, ref_losses, ref_weights = runs["loop"]
    assert ref_losses[-1] < ref_losses[0] - 0.1  # it trained (lr 1e-2, 5 steps): the updates are not no-ops
    for impl in ("foreach", "fused"):
        _, losses, weights = runs[impl]
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=0), impl
        for k, v in ref_weights.items():
            torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-5, msg=f"{impl}: {k}")


def test_chunked_ce_in_the_loop_gives_the_plain_run(tmp_path):
    """5 steps with the head and loss 5 tokens at a time (8 × 15 = 120 predicted tokens: 24 chunks)."""
    def chunked_step(model, batch):
        ids = batch["input_ids"]
        out = model(input_ids=ids, labels=ids, loss_chunk=5)
        assert out.logits is None  # the chunked path ran: no (B, T, V) logits
        return out.loss, {"n_tokens": ids.shape[0] * (ids.shape[1] - 1)}

    _, plain_losses, plain_weights = _run(tmp_path / "plain")
    _, losses, weights = _run(tmp_path / "chunked", step_fn=chunked_step)
    assert losses == pytest.approx(plain_losses, rel=1e-5, abs=0)
    for k, v in plain_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-5, msg=k)
