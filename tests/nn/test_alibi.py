"""ALiBi slopes and bias against transformers' Bloom implementation and the paper's formula."""

import math

import pytest
import torch

from lmzoo.nn.position import ALiBi, alibi_slopes


def _bloom_tolerance(n: int) -> float:
    # lmzoo takes the powers in float64 (as the paper's fairseq code does) and rounds once. Bloom
    # rounds the base to float32 first (relative error <= 2^-24) and raises it to powers up to
    # 2^floor(log2 n), which multiplies that error by the power, then rounds again.
    return (2 ** math.floor(math.log2(n)) + 1) * 2.0 ** -24


@pytest.mark.parametrize("n", range(1, 21))
def test_slopes_match_bloom(n):
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    ref = bloom._get_alibi_slopes(n, torch.device("cpu"))
    ours = alibi_slopes(n)
    assert ours.shape == ref.shape == (n,)
    torch.testing.assert_close(ours, ref, atol=0, rtol=_bloom_tolerance(n))
    # build_alibi_tensor multiplies each slope by the key position: position 1 reads the slope back.
    tensor = bloom.build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n, torch.float32)  # (H, 1, 2)
    torch.testing.assert_close(ours, tensor[:, 0, 1], atol=0, rtol=_bloom_tolerance(n))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8])
def test_slopes_equal_bloom_exactly_when_the_base_is_a_power_of_two(n):
    # For n' = 1..8 the bases 2^(-8/n') are exact in float32, so no rounding can separate the two.
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    assert torch.equal(alibi_slopes(n), bloom._get_alibi_slopes(n, torch.device("cpu")))


def test_power_of_two_slopes_are_the_geometric_sequence():
    # Press et al. 2022, section 3: for 8 heads the slopes are 1/2, 1/4, ..., 1/256.
    assert torch.equal(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))


def test_bias_is_minus_slope_times_distance():
    alibi = ALiBi(4)
    q = torch.tensor([[3, 4]])
    k = torch.arange(5)[None]
    bias = alibi(q, k)  # (1, 4, 2, 5)
    s = alibi_slopes(4)
    assert bias.shape == (1, 4, 2, 5)
    assert bias[0, 2, 1, 1].item() == pytest.approx(-s[2].item() * 3)
    assert bias[0, 0, 0, 3].item() == 0.0
