"""BERT: 15% of positions, replaced 80/10/10, never a special token; NSP pairs; the summed loss by hand."""

import math

import pytest
import torch

import lmzoo
from lmzoo.objectives import make_step_fn, make_transform
from lmzoo.objectives.masked_lm import bert_pretraining_loss, mask_tokens, nsp_pairs

MASK, CLS, SEP, V = 3, 1, 2, 1000


def test_exactly_fifteen_percent_never_specials():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, V, (4, 40))
    ids[:, 0], ids[:, 20], ids[:, -1] = CLS, SEP, SEP
    inputs, labels = mask_tokens(ids, mask_id=MASK, vocab_size=V, generator=g, special_ids=(CLS, SEP))
    chosen = labels != -100
    assert chosen.sum(-1).tolist() == [round(0.15 * 37)] * 4  # 37 candidates per row -> 6 (BERT rounds)
    assert not chosen[:, [0, 20, 39]].any()
    assert torch.equal(labels[chosen], ids[chosen])  # targets are the original tokens
    assert torch.equal(inputs[~chosen], ids[~chosen])  # nothing else changes
    pad = torch.ones_like(ids)
    pad[:, 30:] = 0
    _, labels = mask_tokens(ids, mask_id=MASK, vocab_size=V, generator=g, special_ids=(CLS, SEP), attention_mask=pad)
    assert not (labels[:, 30:] != -100).any()


def test_replacement_is_80_10_10():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, V, (400, 100))
    inputs, labels = mask_tokens(ids, mask_id=MASK, vocab_size=V, generator=g)
    chosen = labels != -100
    n = int(chosen.sum())
    assert n == 400 * 15
    masked = (inputs == MASK) & chosen
    kept = (inputs == ids) & chosen
    changed = chosen & ~masked & ~kept  # random replacements (a random draw equal to the original counts as kept)
    assert masked.sum() / n == pytest.approx(0.8, abs=0.015)
    assert kept.sum() / n == pytest.approx(0.1 + 0.1 / V, abs=0.01)
    assert changed.sum() / n == pytest.approx(0.1 - 0.1 / V, abs=0.01)
    only_mask, _ = mask_tokens(ids[:2], mask_id=MASK, vocab_size=V, generator=g, replace=(1.0, 0.0))
    assert ((only_mask == MASK).sum(-1) == 15).all()


def test_nsp_pairs_layout():
    rows = torch.arange(100, 148).reshape(4, 12)
    g = torch.Generator().manual_seed(0)
    out = nsp_pairs(rows, cls_id=CLS, sep_id=SEP, generator=g)
    ids, types, label = out["input_ids"], out["token_type_ids"], out["next_sentence_label"]
    assert ids.shape == (4, 12) and set(label.tolist()) <= {0, 1}
    for i in range(4):
        row = ids[i].tolist()
        assert row[0] == CLS and row[-1] == SEP and row.count(SEP) == 2
        a_end = row.index(SEP)
        a, b = row[1:a_end], row[a_end + 1:-1]
        assert a == rows[i, :len(a)].tolist() and len(a) >= 1 and len(b) >= 1
        src = i if label[i] == 0 else next(j for j in range(4) if j != i and rows[j, len(a)] == b[0])
        assert b == rows[src, len(a):len(a) + len(b)].tolist()
        assert types[i].tolist() == [0] * (a_end + 1) + [1] * (12 - a_end - 1)
    labels = torch.cat([nsp_pairs(rows, cls_id=CLS, sep_id=SEP, generator=g)["next_sentence_label"] for _ in range(200)])
    assert labels.float().mean().item() == pytest.approx(0.5, abs=0.06)


def test_loss_by_hand():
    # uniform logits: ln V per masked token (V = 4) + ln 2 for NSP = ln 8
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[-100, 2, -100]])
    assert bert_pretraining_loss(logits, labels).item() == pytest.approx(math.log(4))
    nsp = torch.zeros(1, 2)
    assert bert_pretraining_loss(logits, labels, nsp, torch.tensor([1])).item() == pytest.approx(math.log(8))


def test_step_on_a_tiny_bert_equals_the_models_own_loss():
    from lmzoo.models.bert.config import BertConfig

    cfg = BertConfig(vocab_size=60, d_model=32, n_layers=1, n_heads=4, d_ff=48, max_positions=32, nsp_head=True)
    model = lmzoo.build(cfg).train()
    tf = make_transform("masked_lm", config=cfg, mask_id=MASK, cls_id=CLS, sep_id=SEP)
    batch = tf({"input_ids": torch.randint(10, 60, (4, 16))}, torch.Generator().manual_seed(0))
    assert set(batch) == {"input_ids", "token_type_ids", "labels", "next_sentence_label"}
    torch.manual_seed(0)
    loss, metrics = make_step_fn("masked_lm")(model, batch)
    torch.manual_seed(0)  # the same dropout draws
    ref = model(batch["input_ids"], token_type_ids=batch["token_type_ids"], labels=batch["labels"],
                next_sentence_label=batch["next_sentence_label"]).loss
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert metrics["n_tokens"] == int((batch["labels"] != -100).sum()) > 0
