"""Packed rows know their documents; the sampler is deterministic, complete and resumable."""

import numpy as np
import pytest
import torch

from lmzoo.data.packing import PackedRows, split_tokens
from lmzoo.data.sampler import Batches
from lmzoo.errors import LmzooError
from lmzoo.nn.masks import build_mask, doc_ids_from_positions
from tests.data.conftest import make_token_file


@pytest.fixture
def tf(tmp_path):
    # documents of 3, 5, 2 and 6 tokens: tokens 10..25, document starts at 0, 3, 8, 10
    return make_token_file(tmp_path / "t", [3, 5, 2, 6])


def test_rows_by_hand(tf):
    rows = PackedRows(tf, 4)
    assert len(rows) == 4
    r0, r1, r2 = rows.row(0), rows.row(1), rows.row(2)
    assert r0["input_ids"].tolist() == [10, 11, 12, 13]
    assert r0["doc_ids"].tolist() == [0, 0, 0, 1] and r0["position_ids"].tolist() == [0, 1, 2, 0]
    # row 1 is the middle of document 1: positions restart at the row's start
    assert r1["doc_ids"].tolist() == [0, 0, 0, 0] and r1["position_ids"].tolist() == [0, 1, 2, 3]
    assert r2["input_ids"].tolist() == [18, 19, 20, 21]
    assert r2["doc_ids"].tolist() == [0, 0, 1, 1] and r2["position_ids"].tolist() == [0, 1, 0, 1]


def test_rows_agree_with_the_packed_mask(tf):
    b = PackedRows(tf, 4).batch([0, 2])
    assert torch.equal(doc_ids_from_positions(b["position_ids"]), b["doc_ids"])
    mask = build_mask("packed", 4, doc_ids=b["doc_ids"])  # (2, 1, 4, 4)
    # row 2: token 2 opens document 3 and must not see tokens 0, 1 of document 2
    assert mask[1, 0, 2].tolist() == [False, False, True, False]
    assert mask[1, 0, 3].tolist() == [False, False, True, True]
    assert mask[0, 0, 2].tolist() == [True, True, True, False]


def test_split_tokens_cuts_at_a_document_start(tf):
    (a, b), (c, d) = split_tokens(tf, 0.4, 4)  # want the last 6 tokens: document 3 starts exactly there
    assert (a, b, c, d) == (0, 10, 10, 16)
    (a, b), (c, d) = split_tokens(tf, 0.3, 4)  # want 5 (cut 11): the next start (16) is too far, keep 11
    assert (b, c, d) == (11, 11, 16)
    with pytest.raises(LmzooError, match="too few"):
        split_tokens(tf, 0.9, 4)
    with pytest.raises(LmzooError, match="fewer than one row"):
        PackedRows(tf, 32)


class Rows:
    """n rows whose content is their index."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def batch(self, idx):
        return {"input_ids": torch.tensor([[int(i)] for i in idx])}


def _ids(b):
    return b["input_ids"][:, 0].tolist()


def test_each_epoch_visits_every_row_once_in_a_seeded_order():
    it = Batches(Rows(12), 4, seed=3)
    epoch0 = [i for _ in range(3) for i in _ids(next(it))]
    epoch1 = [i for _ in range(3) for i in _ids(next(it))]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1 and epoch0 != list(range(12))
    again = Batches(Rows(12), 4, seed=3)
    assert [i for _ in range(3) for i in _ids(next(again))] == epoch0
    assert [i for _ in range(3) for i in _ids(next(Batches(Rows(12), 4, seed=4)))] != epoch0
    once = Batches(Rows(10), 4, shuffle=False, epochs=1, drop_last=False)
    assert [_ids(b) for b in once] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_resume_gives_the_same_batches_and_transforms():
    def transform(batch, g):  # a seeded transform (like masking): noise from the batch's generator
        return {**batch, "noise": torch.rand(batch["input_ids"].shape[0], generator=g)}

    ref = Batches(Rows(10), 3, seed=1, transform=transform)
    seq = [next(ref) for _ in range(8)]  # crosses two epoch boundaries (3 batches per epoch)
    run = Batches(Rows(10), 3, seed=1, transform=transform)
    for _ in range(4):
        next(run)
    state = run.state_dict()
    assert state["epoch"] == 1 and state["step"] == 1
    resumed = Batches(Rows(10), 3, seed=1, transform=transform)
    resumed.load_state_dict(state)
    for want in seq[4:]:
        got = next(resumed)
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["noise"], want["noise"])
    with pytest.raises(LmzooError, match="saved seed=1 but this run has seed=2"):
        Batches(Rows(10), 3, seed=2).load_state_dict(state)


def test_ranks_split_the_global_batch():
    one = Batches(Rows(16), 4, seed=0)
    r0, r1 = (Batches(Rows(16), 2, seed=0, rank=r, world_size=2) for r in (0, 1))
    for _ in range(6):
        assert _ids(next(one)) == _ids(next(r0)) + _ids(next(r1))
    with pytest.raises(LmzooError, match="fewer than one global batch"):
        Batches(Rows(3), 2, world_size=2)


def test_real_token_file_end_to_end(tok, tmp_path):
    from lmzoo.data import pretraining_batches

    docs = [f"document {i}: the cat sat on the mat {i}" for i in range(40)]
    train, eval_batches, tf = pretraining_batches(tok, 16, 4, texts=docs, cache_dir=tmp_path, val_fraction=0.1)
    b = next(train)
    assert set(b) == {"input_ids", "doc_ids", "position_ids"} and b["input_ids"].shape == (4, 16)
    val = list(eval_batches())
    assert sum(v["input_ids"].shape[0] for v in val) == len(eval_batches().rows)
    assert len(list(eval_batches())) == len(val)  # a fresh pass each call
    n_val = eval_batches().rows.n_tokens
    assert abs(n_val - 0.1 * tf.n_tokens) <= 2 * 16 + max(np.diff(tf.offsets))
