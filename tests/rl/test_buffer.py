"""RolloutBatches: rollouts made at boundaries, minibatches of them, exact resume."""

from __future__ import annotations

import pytest
import torch

from lmzoo.data.sampler import Batches
from lmzoo.errors import ConfigError
from lmzoo.rl.buffer import RolloutBatches


class Prompts:
    def __len__(self):
        return 12

    def batch(self, rows):
        return {"index": torch.as_tensor([int(r) for r in rows])}


def make_fn(calls):
    def make(prompts, gen):  # a "rollout": 2 samples per prompt, with the generator's draws
        calls.append(prompts["index"].tolist())
        idx = prompts["index"].repeat_interleave(2)
        return {"index": idx, "noise": torch.rand(len(idx), generator=gen), "reward/mean": torch.tensor(0.5)}
    return make


def batches(calls, **kw):
    return RolloutBatches(Batches(Prompts(), 3, seed=1), make_fn(calls), seed=4, **kw)


def test_minibatches_cover_each_buffer_every_epoch_then_a_new_rollout():
    calls = []
    it = batches(calls, epochs=2, minibatches=3)
    first = [next(it) for _ in range(6)]
    assert len(calls) == 1 and it.rollouts == 1
    for epoch in (first[:3], first[3:]):  # each epoch sees each of the 6 rows once
        assert sorted(torch.cat([b["noise"] for b in epoch]).tolist()) == sorted(first[0]["noise"].tolist()
                                                                               + first[1]["noise"].tolist()
                                                                               + first[2]["noise"].tolist())
        assert sum(len(b["index"]) for b in epoch) == 6
    assert all(b["reward/mean"].item() == 0.5 for b in first)  # statistics ride along unsliced
    next(it)
    assert len(calls) == 2 and calls[1] != calls[0]


@pytest.mark.parametrize("stop", [4, 5, 7])  # a boundary (4) and mid-buffer (5, 7)
def test_resume_continues_the_same_sequence(stop):
    calls = []
    straight = batches(calls, epochs=1, minibatches=2)
    want = [next(straight) for _ in range(10)]
    run = batches([], epochs=1, minibatches=2)
    for _ in range(stop):
        next(run)
    state = run.state_dict()
    resumed = batches([], epochs=1, minibatches=2)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(10 - stop)]
    for a, b in zip(got, want[stop:]):  # this make() ignores the weights, so even mid-buffer is exact here
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["noise"], b["noise"])


def test_bad_buffers_are_refused():
    with pytest.raises(ConfigError, match="at least 1"):
        batches([], epochs=0)
    it = RolloutBatches(Batches(Prompts(), 3, seed=1), lambda p, g: {"a": torch.zeros(3), "b": torch.zeros(4)})
    with pytest.raises(Exception, match="disagree on the number of rows"):
        next(it)
    it = RolloutBatches(Batches(Prompts(), 3, seed=1), make_fn([]), minibatches=8)
    with pytest.raises(ConfigError, match="cannot be cut into 8 minibatches"):
        next(it)
