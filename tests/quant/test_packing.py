"""Packing: known answers worked out by hand, and agreement with plain-Python loops written from the
AutoGPTQ / AutoAWQ / bitsandbytes packing code (read, not imported), for every supported width."""

import pytest
import torch

from lmzoo.quant.packing import (AWQ_ORDER, pack_cols, pack_nibbles, pack_rows, unpack_cols, unpack_nibbles,
                                 unpack_rows)


def as_int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def ref_gptq_qweight(q, bits):
    """AutoGPTQ QuantLinear.pack: qweight[row] |= intweight[j] << (bits * (j - i)), j over 32/bits input rows."""
    K, N = len(q), len(q[0])
    per = 32 // bits
    return [[as_int32(sum(q[r * per + j][n] << (bits * j) for j in range(per))) for n in range(N)]
            for r in range(K // per)]


def ref_gptq_qzeros(z, bits):
    """AutoGPTQ: qzeros[:, col] |= zeros[:, j] << (bits * (j - i)), j over 32/bits output columns."""
    per = 32 // bits
    return [[as_int32(sum(row[c * per + j] << (bits * j) for j in range(per))) for c in range(len(row) // per)]
            for row in z]


def ref_awq(q):
    """AutoAWQ WQLinear_GEMM.from_linear: qweight[:, col] |= intweight[:, col*8 + order_map[i]] << (i * 4)."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    return [[as_int32(sum(row[col * 8 + order_map[i]] << (4 * i) for i in range(8))) for col in range(len(row) // 8)]
            for row in q]


def test_known_answers():
    col = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [8]])  # 8 input rows of one output
    assert pack_rows(col, 4).item() == as_int32(0x87654321)  # first row in the lowest nibble
    assert pack_rows(torch.tensor([[1], [2], [3], [4]]), 8).item() == 0x04030201
    assert pack_rows(torch.tensor([[3]] + [[0]] * 14 + [[1]]), 2).item() == as_int32(0x40000003)
    row = torch.arange(8)[None]  # one row of 8 output columns holding 0..7
    assert pack_cols(row, 4).item() == 0x76543210
    assert pack_cols(row, 4, AWQ_ORDER).item() == 0x75316420  # nibble i holds column (0, 2, 4, 6, 1, 3, 5, 7)[i]
    assert pack_nibbles(torch.tensor([1, 2, 3])).tolist() == [0x12, 0x30]  # first code in the high nibble
    assert unpack_nibbles(torch.tensor([0x12, 0x30], dtype=torch.uint8), 3).tolist() == [1, 2, 3]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_layout_matches_reference_loops(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (64, 24), generator=g)
    assert pack_rows(q, bits).tolist() == ref_gptq_qweight(q.tolist(), bits)
    assert pack_cols(q.t(), bits).tolist() == ref_gptq_qzeros(q.t().tolist(), bits)
    assert torch.equal(unpack_rows(pack_rows(q, bits), bits), q.int())
    assert torch.equal(unpack_cols(pack_cols(q.t(), bits), bits), q.t().int())


def test_awq_layout_matches_reference_loops():
    q = torch.randint(0, 16, (16, 32), generator=torch.Generator().manual_seed(1))
    assert pack_cols(q, 4, AWQ_ORDER).tolist() == ref_awq(q.tolist())
    assert torch.equal(unpack_cols(pack_cols(q, 4, AWQ_ORDER), 4, AWQ_ORDER), q.int())


def test_nibbles_round_trip_odd_length():
    q = torch.randint(0, 16, (101,), generator=torch.Generator().manual_seed(2))
    packed = pack_nibbles(q)
    assert packed.numel() == 51 and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed, 101), q.to(torch.uint8))


def test_out_of_range_and_ragged_inputs_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_rows(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match="whole int32 words"):
        pack_rows(torch.zeros(6, 1, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="bits in"):
        pack_cols(torch.zeros(1, 32, dtype=torch.long), 3)
