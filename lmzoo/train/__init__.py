"""The training engine: one loop for every family and every stage.

The loop (``Trainer`` in ``loop.py``) knows nothing about families, objectives or stages. It is
given three things, and this is the whole seam between it and ``lmzoo/data`` / ``lmzoo/objectives``:

(a) ``model``: an ``nn.Module`` (built and seeded by the caller; the loop moves it to the device
    and wraps it for DDP/FSDP when asked). ``Trainer.trained_model()`` hands it back to the stage as
    a plain module on rank 0 (under FSDP gathered from the shards: every rank calls it), to save.

(b) ``batches``: an iterator of batches, each a ``dict[str, Tensor]`` (CPU tensors; the loop moves
    them to the device). It yields forever (or at least ``steps * grad_accum`` batches; running
    out is an error that names the step), and it has
      - ``state_dict() -> dict``: the exact data position *after* the last batch it yielded, made of
        JSON types only (ints, floats, strings, bools, lists, dicts);
      - ``load_state_dict(state)``: continue from that position, so the next batch is the one the
        uninterrupted iterator would have yielded.
    Under DDP/FSDP each rank passes its own iterator (its shard of every global batch); the loop
    saves and restores each rank's position separately.

(c) ``step_fn(model, batch) -> (loss, metrics)``: the objective. ``loss`` is a 0-dim tensor, the
    mean over this batch; ``metrics`` is a ``dict[str, float | Tensor]`` of extras to log (under
    DDP/FSDP their mean over ranks, so every rank returns the same keys). Keys the
    loop reads when present: ``n_tokens`` (the number of predicted tokens, for tokens/s and for
    token-weighted evaluation; default: ``batch['input_ids'].numel()``) and ``n_bytes`` (the bytes
    of text those tokens cover, for bits per byte). ``model`` is what the loop trains (under DDP the
    wrapper): call it, and read the config you need when you build ``step_fn``, not off ``model``.
    Randomness (MLM masking, span corruption) must come from torch's global RNG or a generator
    seeded from the batch: the loop saves and restores the global RNGs in every checkpoint.

Evaluation takes ``eval_batches``: a function that returns a fresh iterable of the same batches on
every call; the loop runs ``step_fn`` over it without gradients and reports the loss, perplexity
and bits per byte (from ``n_bytes``, or from the ``bytes_per_token`` the caller passes).

Files: ``config.py`` (TrainConfig), ``optim.py`` (AdamW, schedules), ``precision.py`` (autocast,
loss scaling), ``checkpoint.py`` (atomic, checksummed, resumable), ``distributed.py`` (DDP, FSDP2),
``metrics.py`` (metrics.jsonl, TensorBoard, progress, loss curve), ``evaluate.py``, ``loop.py``.
"""

from lmzoo.train.config import TrainConfig
from lmzoo.train.loop import Trainer, TrainingError, TrainingInterrupted, TrainResult

__all__ = ["Trainer", "TrainConfig", "TrainResult", "TrainingError", "TrainingInterrupted"]
