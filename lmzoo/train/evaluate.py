"""Held-out evaluation: mean loss per token, perplexity and bits per byte.

  loss = Σ_batches loss_b · n_b / Σ n_b          (nats per predicted token; n_b = n_tokens)
  ppl  = exp(loss)
  bpb  = Σ loss_b · n_b / (ln 2 · Σ bytes_b)     (bits per byte of text: comparable across tokenizers)

The bytes come from the objective's ``n_bytes`` metric, or from a corpus-wide ``bytes_per_token``.
Evaluation runs inside a forked RNG, so how often it runs never changes the training run.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Callable, Iterable

import numpy as np
import torch

from lmzoo.train.distributed import all_reduce


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def count_tokens(metrics: dict, batch: dict) -> float:
    if "n_tokens" in metrics:
        return float(metrics["n_tokens"])
    ids = batch.get("input_ids")
    return float(ids.numel()) if torch.is_tensor(ids) else 1.0


@contextlib.contextmanager
def forked_rng(device: torch.device):
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def evaluate(model: torch.nn.Module, batches: Iterable[dict], step_fn: Callable, *, device: torch.device,
             autocast=contextlib.nullcontext, bytes_per_token: float | None = None) -> dict:
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss·tokens, tokens, bytes
    with forked_rng(device), torch.no_grad():
        for batch in batches:
            batch = to_device(batch, device)
            with autocast():
                loss, metrics = step_fn(model, batch)
            n = count_tokens(metrics, batch)
            totals[0] += loss.detach().double() * n
            totals[1] += n
            totals[2] += float(metrics.get("n_bytes", 0.0))
    model.train(was_training)
    all_reduce(totals)
    loss_sum, tokens, n_bytes = totals.tolist()
    if tokens == 0:
        return {}
    loss = loss_sum / tokens
    out = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
    if n_bytes > 0:
        out["bpb"] = loss_sum / (math.log(2) * n_bytes)
    elif bytes_per_token:
        out["bpb"] = loss / (math.log(2) * bytes_per_token)
    return out
