"""Greedy and sampled replies through the one inference engine."""

from __future__ import annotations

import torch

from lmzoo.eval import greedy_replies, sampled_replies
from tests.stages.test_sft import tiny_decoder, tok  # noqa: F401  (tok: the shared tokenizer fixture)


def test_sampled_replies_are_seeded_and_greedy_at_temperature_zero(tok):
    torch.manual_seed(0)
    model = tiny_decoder("llama", tok).eval()
    convs = [[{"role": "user", "content": q}] for q in ("Sort ascending: 3 1 2", "2 加 2 等于几？")]
    kw = dict(max_new_tokens=6, stop_ids=[tok.eos_id], batch_size=3)  # batches cut across the repeated prompts
    greedy = greedy_replies(model, tok, convs, "chatml", **kw)
    assert sampled_replies(model, tok, convs, "chatml", n=2, temperature=0.0, **kw) == [[g, g] for g in greedy]
    a = sampled_replies(model, tok, convs, "chatml", n=4, temperature=1.5, seed=1, **kw)
    assert a == sampled_replies(model, tok, convs, "chatml", n=4, temperature=1.5, seed=1, **kw)  # seeded
    assert len(a) == 2 and all(len(r) == 4 for r in a)
    assert len({x for r in a for x in r}) > 2  # a random model at T=1.5 says different things
    b = sampled_replies(model, tok, convs, "chatml", n=4, temperature=1.5, seed=2, **kw)
    assert a != b
    assert model.training is False
