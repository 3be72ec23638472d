"""A tiny model, a tiny learnable dataset and a causal-LM step function for the loop's tests.

The data is made here, not read from disk: row r of global batch i is an arithmetic progression
mod V with a start and stride drawn from a generator seeded by (seed, i, r), so the next token is
predictable from the previous two and the loss falls quickly. A rank of N takes its slice of every
global batch, which is what makes the distributed runs comparable to one process.
"""

from __future__ import annotations

import torch

import lmzoo
from lmzoo.models.llama.config import LlamaConfig

VOCAB = 48


class ProgressionBatches:
    """Global batch i: ``batch_size`` rows of length ``seq_len``; this rank yields rows [r·B/N, (r+1)·B/N)."""

    def __init__(self, batch_size: int = 8, seq_len: int = 16, seed: int = 0, rank: int = 0, world_size: int = 1,
                 limit: int | None = None):
        if batch_size % world_size:
            raise ValueError("batch_size must be divisible by world_size")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.limit = rank, world_size, limit
        self.index = 0

    def global_batch(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = torch.randint(0, VOCAB, (self.batch_size, 1), generator=g)
        stride = torch.randint(1, 4, (self.batch_size, 1), generator=g)
        return (start + stride * torch.arange(self.seq_len)) % VOCAB  # (B, T)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.limit is not None and self.index >= self.limit:
            raise StopIteration
        rows = self.global_batch(self.index)
        self.index += 1
        per = self.batch_size // self.world_size
        return {"input_ids": rows[self.rank * per:(self.rank + 1) * per]}

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def eval_batches(n: int = 2, batch_size: int = 8, seq_len: int = 16, rank: int = 0, world_size: int = 1):
    def make():
        return list(ProgressionBatches(batch_size, seq_len, seed=12345, rank=rank, world_size=world_size, limit=n))
    return make


def causal_step(model, batch):
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    B, T = batch["input_ids"].shape
    return out.loss, {"n_tokens": B * (T - 1), "n_bytes": 2 * B * (T - 1)}


def tiny_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_positions=64)
    return LlamaConfig(**(base | kw))


def tiny_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return lmzoo.build(tiny_config(**kw))
