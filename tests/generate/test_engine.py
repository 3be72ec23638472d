"""Generation: the processors equal transformers' on the same logits; EOS, streaming, seeding, bad input."""

import pytest
import torch

import lmzoo
from lmzoo.errors import LmzooError
from lmzoo.generate.sampling import LogitsProcessor, process_logits
from lmzoo.models.llama.config import LlamaConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_positions=64)
    return lmzoo.build(cfg).eval()


def test_processors_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.generation import logits_process as lp

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=g) * 3
    seen = torch.randint(0, 40, (3, 7), generator=g)
    ours = process_logits(logits.clone(), seen, LogitsProcessor(True, 0.7, 10, 0.8, 1.3))
    ref = logits.clone()
    for p in (lp.RepetitionPenaltyLogitsProcessor(1.3), lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(10),
              lp.TopPLogitsWarper(0.8)):
        ref = p(seen, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_stream_equals_generate_and_eos_pads(model):
    ids = torch.randint(0, 50, (2, 5))
    full = lmzoo.generate(model, ids, max_new_tokens=10)
    steps = torch.stack(list(lmzoo.stream(model, ids, max_new_tokens=10)), 1)
    assert torch.equal(full[:, 5:], steps)
    eos = int(full[0, 7])  # make row 0's third new token its EOS
    out = lmzoo.generate(model, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=49)
    row0 = out[0, 5:].tolist()
    stop = row0.index(eos)
    assert all(t == 49 for t in row0[stop + 1:])
    assert out[0, 5:5 + stop + 1].tolist() == full[0, 5:5 + stop + 1].tolist()


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(model):
    ids = torch.randint(0, 50, (1, 4))
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=30)
    a = lmzoo.generate(model, ids, generator=torch.Generator().manual_seed(1), **kw)
    b = lmzoo.generate(model, ids, generator=torch.Generator().manual_seed(1), **kw)
    c = lmzoo.generate(model, ids, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generate_runs_on_the_serving_engine(model, monkeypatch):
    """``generate`` is the continuous-batching engine under its batch API: one engine step per new token
    (the first prefills every row), rows that stop leave the engine while the stream pads them, and the
    result equals each row generated alone."""
    from lmzoo.generate import continuous

    steps = []
    real = continuous.Engine.step
    monkeypatch.setattr(continuous.Engine, "step", lambda self: steps.append(len(self.running) + len(self.waiting))
                        or real(self))
    ids = torch.tensor([[0, 0, 7, 8, 9], [1, 2, 3, 4, 5]])  # row 0 left-padded
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    full = lmzoo.generate(model, ids, mask, max_new_tokens=8)
    assert steps == [2] * 8
    for i, n in ((0, 3), (1, 5)):
        alone = lmzoo.generate(model, ids[i:i + 1, 5 - n:], max_new_tokens=8)
        assert full[i, 5:].tolist() == alone[0, n:].tolist()
    eos = int(full[1, 6])  # row 1 stops at its second new token
    steps.clear()
    out = lmzoo.generate(model, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=49)
    stop = out[1, 5:].tolist().index(eos)
    assert out[1, 5 + stop + 1:].tolist() == [49] * (8 - stop - 1)
    ends = [row.index(eos) if eos in row else 7 for row in out[:, 5:].tolist()]  # each row's last step
    assert steps == [sum(k <= e for e in ends) for k in range(max(ends) + 1)]  # a row leaves after its EOS


def test_a_sampled_row_is_the_same_alone_or_with_rows_after_it(model):
    """Row i draws with a generator seeded by the i-th draw from ``generator``: the first row's tokens do
    not depend on what else is in the batch, and the model is given back in the mode it came in."""
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.3)
    batch = lmzoo.generate(model, ids, generator=torch.Generator().manual_seed(5), **kw)
    alone = lmzoo.generate(model, ids[:1], generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(batch[:1], alone) and not torch.equal(batch[0], batch[1])
    model.train()
    try:
        lmzoo.generate(model, ids, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()
    with pytest.raises(LmzooError, match="all padding"):
        lmzoo.generate(model, ids[:2], torch.tensor([[0] * 6, [1] * 6]), max_new_tokens=2)


def test_bad_inputs(model):
    with pytest.raises(LmzooError, match="empty"):
        lmzoo.generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(LmzooError, match="context of 64"):
        lmzoo.generate(model, torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match="temperature"):
        lmzoo.generate(model, torch.zeros(1, 3, dtype=torch.long), do_sample=True, temperature=0)


def test_loss_follows_shift_by_one_and_ignores_minus_100(model):
    ids = torch.randint(0, 50, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    logp = out.logits.log_softmax(-1)
    picked = [-logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 8) if labels[b, t] != -100]
    torch.testing.assert_close(out.loss, torch.stack(picked).mean())
