"""A deterministic, resumable batch iterator over packed rows: what the training loop consumes.

The position is two integers, ``(epoch, step)``: epoch e visits the rows in the order of
``permutation(seed, e)`` (a fresh NumPy generator seeded with ``[seed, e]``), and step s takes global
batch s of it. Nothing else is remembered, so ``load_state_dict(state_dict())`` continues with exactly
the batch an uninterrupted run would have drawn next, on any machine.

Each batch's transform (masking, span corruption, ...) draws from a ``torch.Generator`` seeded by
``(seed, epoch, step, rank)`` alone, so a transformed batch is also the same after a resume.

Distributed: with ``world_size`` ranks, a global batch of ``batch_size · world_size`` rows is drawn
and rank r takes its r-th slice; together the ranks see exactly what one process with the global
batch would see. The last incomplete global batch of an epoch is dropped.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from lmzoo.errors import LmzooError

Transform = Callable[[dict, torch.Generator], dict]


def _mix(*ints: int) -> int:
    """One 64-bit seed from several integers (NumPy's SeedSequence hashes them together)."""
    return int(np.random.SeedSequence(list(ints)).generate_state(1, np.uint64)[0])


class Batches:
    """Iterator of dicts of (B, T) tensors over ``rows`` (anything with ``len`` and ``batch(indices)``).

    ``epochs=None`` repeats forever (training); ``epochs=1, shuffle=False`` visits every row once in
    order (evaluation). ``state_dict()`` / ``load_state_dict()`` save and restore the exact position.
    """

    def __init__(self, rows, batch_size: int, *, seed: int = 0, shuffle: bool = True, epochs: int | None = None,
                 transform: Transform | None = None, rank: int = 0, world_size: int = 1, drop_last: bool = True):
        if batch_size < 1:
            raise LmzooError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise LmzooError(f"rank {rank} is outside world_size {world_size}")
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle
        self.epochs, self.transform, self.rank, self.world_size = epochs, transform, rank, world_size
        self.global_batch = batch_size * world_size
        n = len(rows)
        self.steps_per_epoch = n // self.global_batch if drop_last else -(-n // self.global_batch)
        if self.steps_per_epoch == 0:
            raise LmzooError(f"{n} rows are fewer than one global batch of {self.global_batch} "
                             f"({batch_size} x {world_size} ranks); use more data or a smaller batch")
        self.epoch, self.step = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps_per_epoch

    def __iter__(self):
        return self

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.rows)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        order = self._permutation(self.epoch)
        glob = order[self.step * self.global_batch:(self.step + 1) * self.global_batch]  # (B·world,)
        mine = glob[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        batch = self.rows.batch(mine)
        if self.transform is not None:
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, self.step, self.rank))
            batch = self.transform(batch, g)
        self.step += 1
        return batch

    # -- the exact position ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "n_rows": len(self.rows),
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("n_rows", len(self.rows)), ("global_batch", self.global_batch)):
            if key in state and state[key] != mine:
                raise LmzooError(f"data position: saved {key}={state[key]} but this run has {key}={mine}; "
                                 "resuming would draw different batches (same data, seed and batch size needed)")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
