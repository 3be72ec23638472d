"""T5 span corruption: the T5 paper's lengths, sentinels from the end of the vocabulary, mean span 3."""

import pytest
import torch

import lmzoo
from lmzoo.objectives import make_step_fn, make_transform
from lmzoo.objectives.span_corruption import corrupt, noise_counts, random_spans_noise_mask, seq2seq_loss

V, EOS = 100, 1


def test_docstring_example_by_hand():
    tokens = torch.arange(10, 18)  # x0..x7
    noise = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    inp, tgt = corrupt(tokens, noise, V, EOS)
    assert inp.tolist() == [10, 11, 99, 14, 15, 98, EOS]  # <X0> = 99, <X1> = 98
    assert tgt.tolist() == [99, 12, 13, 98, 16, 17, EOS]
    noise[7] = False  # a kept span at the end: the target closes with one more sentinel (T5's code does too)
    inp, tgt = corrupt(tokens, noise, V, EOS)
    assert inp.tolist() == [10, 11, 99, 14, 15, 98, 17, EOS] and tgt.tolist() == [99, 12, 13, 98, 16, 97, EOS]


def test_lengths_match_t5s_published_setting():
    # T5 pretrains on 568 raw tokens so that, with 15% noise and mean span 3, inputs are 512 and targets 114
    n_noise, n_spans = noise_counts(568)
    assert (n_noise, n_spans) == (85, 28)
    assert (568 - n_noise + n_spans + 1, n_noise + n_spans + 1) == (512, 114)
    g = torch.Generator().manual_seed(0)
    out = make_transform("span_corruption", vocab_size=V, eos_id=EOS)({"input_ids": torch.randint(2, 90, (3, 568))}, g)
    assert out["input_ids"].shape == (3, 512) and out["labels"].shape == (3, 114)


def test_noise_mask_statistics():
    g = torch.Generator().manual_seed(0)
    runs, lengths = 0, []
    for _ in range(200):
        m = random_spans_noise_mask(100, g)
        assert int(m.sum()) == 15 and not bool(m[0])  # 15% exactly; starts with a kept token
        starts = (m & ~torch.nn.functional.pad(m[:-1], (1, 0))).nonzero().flatten().tolist()
        assert len(starts) == 5  # round(15 / 3) spans
        runs += len(starts)
        lengths += [int(m[s:].long().cumprod(0).sum()) for s in starts]
    assert sum(lengths) / runs == pytest.approx(3.0)  # mean span length 3 by construction (15 tokens, 5 spans)
    assert len(set(lengths)) > 3  # but the lengths vary
    assert random_spans_noise_mask(1, g).tolist() == [False]  # T5 pads tiny inputs to 2 and cuts back


def test_every_token_appears_once_across_input_and_target():
    g = torch.Generator().manual_seed(3)
    row = torch.arange(10, 60)
    m = random_spans_noise_mask(50, g)
    inp, tgt = corrupt(row, m, V, EOS)
    real = [t for t in inp.tolist() + tgt.tolist() if 10 <= t < 60]
    assert sorted(real) == list(range(10, 60))
    assert [t for t in inp.tolist() if t >= 90] == [t for t in tgt.tolist() if t >= 90]  # same sentinels, in order


def test_step_on_a_tiny_t5():
    from lmzoo.models.t5.config import T5Config

    cfg = T5Config(vocab_size=V, d_model=32, n_layers=1, n_heads=4, head_dim=8, d_ff=48, eos_token_id=EOS)
    model = lmzoo.build(cfg).eval()
    batch = make_transform("span_corruption", config=cfg)({"input_ids": torch.randint(2, 90, (2, 30))},
                                                          torch.Generator().manual_seed(0))
    loss, metrics = make_step_fn("span_corruption")(model, batch)
    ref = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss  # the model's own cross-entropy
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert metrics["n_tokens"] == batch["labels"].numel()
    assert seq2seq_loss(torch.zeros(1, 2, 4), torch.tensor([[1, -100]])).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
