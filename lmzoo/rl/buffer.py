"""The training loop's batches for RL: prompts in, rollouts made with the current policy, then
minibatches of them for a few optimisation epochs, then fresh rollouts.

    prompts (a resumable ``Batches``) --make(prompt batch, generator)--> one rollout buffer (dict of
    per-row tensors + 0-dim statistics) --> ``epochs × minibatches`` minibatches --> next prompts

This is the loop's seam (``lmzoo.train``: an iterator of batches with ``state_dict`` /
``load_state_dict``) grown once for PPO and GRPO, so neither stage keeps a private loop: each loop
step is one optimizer step on one minibatch, and a new buffer is made when the last one is used up.
``make`` is the stage's: sample with the policy (``lmzoo.rl.rollout``), score, compute the reference
log-probs and the advantages, and return tensors whose first dimension is the rollout's rows
(``input_ids``, ``response_mask``, ``old_logps``, ``advantages``, ...) plus 0-dim tensors (the
rollout's statistics: ``reward/mean``, ...), which every minibatch carries for logging.

**Resume.** The sampling generator of a buffer is seeded from its prompt batch's position (seed,
epoch, step, rank) alone, and the minibatch order within a buffer comes from the same generator. The
saved position is the buffer's prompt batch plus how many of its minibatches were used, so a run
resumed at a rollout boundary (every ``epochs × minibatches`` steps) draws exactly the samples the
uninterrupted run would have. Resumed mid-buffer (a crash or Ctrl-C between boundaries), the buffer is
made again from the same prompts and generator and the run continues at the same minibatch; the
samples can differ there, since the policy that made the original buffer no longer exists (its
weights moved since), which only the buffer itself could restore.
"""

from __future__ import annotations

from typing import Callable

import torch

from lmzoo.data.sampler import _mix
from lmzoo.errors import ConfigError, LmzooError

Make = Callable[[dict, torch.Generator], dict]


class RolloutBatches:
    """Iterator of minibatch dicts for the training loop; see the module docstring."""

    def __init__(self, prompts, make: Make, *, epochs: int = 1, minibatches: int = 1, seed: int = 0):
        if epochs < 1 or minibatches < 1:
            raise ConfigError(f"epochs and minibatches must be at least 1, got {epochs} and {minibatches}")
        self.prompts, self.make = prompts, make
        self.epochs, self.minibatches, self.seed = epochs, minibatches, seed
        self._buffer: dict | None = None
        self._order: list[torch.Tensor] = []
        self._pos = 0  # minibatches of the current buffer already handed out
        self._start: dict = {}
        self.rollouts = 0  # buffers made since this object was built (for tests and logs)

    @property
    def steps_per_rollout(self) -> int:
        return self.epochs * self.minibatches

    def __iter__(self):
        return self

    def _refill(self) -> None:
        self._start = self.prompts.state_dict()  # the position of the prompt batch about to be drawn
        rank = getattr(self.prompts, "rank", 0)
        gen = torch.Generator().manual_seed(_mix(self.seed, 7, int(self._start["epoch"]), int(self._start["step"]),
                                                 rank))
        buffer = self.make(next(self.prompts), gen)
        rows = {k: v for k, v in buffer.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if not rows:
            raise LmzooError("a rollout buffer holds no per-row tensors")
        n = {int(v.shape[0]) for v in rows.values()}
        if len(n) != 1:
            raise LmzooError(f"a rollout buffer's tensors disagree on the number of rows: "
                             f"{ {k: tuple(v.shape) for k, v in rows.items()} }")
        (n,) = n
        if n < self.minibatches:
            raise ConfigError(f"a rollout of {n} rows cannot be cut into {self.minibatches} minibatches")
        self._buffer, self._pos = buffer, 0
        self._order = [torch.randperm(n, generator=gen) if self.minibatches > 1 else torch.arange(n)
                       for _ in range(self.epochs)]
        self.rollouts += 1

    def __next__(self) -> dict:
        if self._buffer is None or self._pos == self.steps_per_rollout:
            self._refill()
        epoch, k = divmod(self._pos, self.minibatches)
        rows = self._order[epoch].tensor_split(self.minibatches)[k]  # (b,) near-equal parts of a permutation
        self._pos += 1
        return {key: (v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                for key, v in self._buffer.items()}

    def state_dict(self) -> dict:
        if self._buffer is None or self._pos == self.steps_per_rollout:  # a boundary: the next buffer is next
            return {"prompts": self.prompts.state_dict(), "used": 0}
        return {"prompts": self._start, "used": self._pos}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self._buffer, self._pos = None, 0
        used = int(state.get("used", 0))
        if used:  # mid-buffer: make it again from the same prompts and generator, and skip what was used
            self._refill()
            self._pos = used
