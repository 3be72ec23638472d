"""The mask builder, kind by kind, against matrices written out by hand (1 = may attend)."""

import pytest
import torch

from lmzoo.nn.masks import MASK_KINDS, build_mask, decoder_mask, doc_ids_from_positions


def rows(*lines: str) -> list[list[int]]:
    return [[int(c) for c in line] for line in lines]


def m(kind, *a, **kw) -> list:
    return build_mask(kind, *a, **kw).int().tolist()


def test_causal():
    assert m("causal", 4) == [[rows("1000", "1100", "1110", "1111")]]
    # with 3 cached keys the 2 new queries sit at positions 3 and 4
    assert m("causal", 2, 5) == [[rows("11110", "11111")]]


def test_bidirectional():
    assert m("bidirectional", 3) == [[rows("111", "111", "111")]]


def test_prefix():
    assert m("prefix", 6, prefix_len=3) == [[rows("111000", "111000", "111000", "111100", "111110", "111111")]]
    # one prefix per row; a decode step (1 query at index 4 of 5 keys) sees everything before it
    per_row = build_mask("prefix", 4, prefix_len=torch.tensor([1, 3])).int().tolist()
    assert per_row == [[rows("1000", "1100", "1110", "1111")], [rows("1110", "1110", "1110", "1111")]]
    assert m("prefix", 1, 5, prefix_len=2) == [[rows("11111")]]
    # prefix 0 is causal, prefix = length is bidirectional
    assert m("prefix", 3, prefix_len=0) == m("causal", 3)
    assert m("prefix", 3, prefix_len=3) == m("bidirectional", 3)


def test_cross():
    enc = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # the encoder's padding mask
    assert m("cross", 2, 4, attention_mask=enc) == [[rows("1110", "1110")], [rows("0111", "0111")]]


def test_padding():
    am = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert m("padding", 3, attention_mask=am) == [[rows("110", "110", "110")], [rows("011", "011", "011")]]
    with pytest.raises(ValueError, match="attention_mask"):
        build_mask("padding", 3)


def test_padding_combines_with_causal_and_opens_empty_rows():
    am = torch.tensor([[0, 0, 1, 1]])
    # query rows 0 and 1 are pads with no real key at or before them: opened to all keys
    assert m("causal", 4, attention_mask=am) == [[rows("1111", "1111", "0010", "0011")]]
    assert torch.equal(build_mask("causal", 4, attention_mask=am), decoder_mask(am, 4, 4))


def test_packed_from_doc_ids_and_from_position_resets():
    want = [[rows("100000", "110000", "111000", "000100", "000110", "000001")]]
    assert m("packed", 6, doc_ids=torch.tensor([[0, 0, 0, 1, 1, 2]])) == want
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert doc_ids_from_positions(pos).tolist() == [[0, 0, 0, 1, 1, 2]]
    assert m("packed", 6, position_ids=pos) == want


def test_every_kind_is_registered_and_unknown_kinds_fail():
    assert set(MASK_KINDS) == {"causal", "bidirectional", "prefix", "cross", "padding", "packed"}
    with pytest.raises(ValueError, match="unknown mask kind"):
        build_mask("diagonal", 3)
    with pytest.raises(ValueError, match="prefix_len"):
        build_mask("prefix", 3)
