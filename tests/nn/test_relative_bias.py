"""T5's bucketed relative position bias: bucket ids by hand, against Mesh TensorFlow's rule as
transformers implements it, and the cached (offset) bias equal to a slice of the full one."""

import math

import pytest
import torch

from lmzoo.nn.position import RelativePositionBias, relative_position_bucket


def _bucket(rel, bidirectional, n=32, max_distance=128):
    return relative_position_bucket(torch.tensor([rel]), bidirectional, n, max_distance).item()


def test_buckets_by_hand():
    # bidirectional, 32 buckets: 16 per direction, distances 0..7 exact, 8..127 log-spaced into 8..15
    assert [_bucket(r, True) for r in (0, -1, -7, -8)] == [0, 1, 7, 8]
    assert _bucket(-16, True) == 8 + math.floor(math.log(2) / math.log(16) * 8) == 10
    assert _bucket(-127, True) == 15 and _bucket(-128, True) == 15 and _bucket(-5000, True) == 15
    assert [_bucket(r, True) for r in (1, 7, 16, 5000)] == [17, 23, 26, 31]  # keys after the query: +16
    # causal, 32 buckets: every later key is bucket 0; distances 0..15 exact, 16..127 log-spaced into 16..31
    assert [_bucket(r, False) for r in (5, 1, 0, -3, -15, -16)] == [0, 0, 0, 3, 15, 16]
    assert _bucket(-32, False) == 16 + math.floor(math.log(2) / math.log(8) * 16) == 21
    assert _bucket(-127, False) == 31 and _bucket(-1000, False) == 31


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("n,max_distance", [(32, 128), (8, 16), (6, 20)])
def test_buckets_match_transformers(bidirectional, n, max_distance):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = torch.arange(-400, 401)[None]
    ref = t5.T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=n,
                                                   max_distance=max_distance)
    assert torch.equal(relative_position_bucket(rel, bidirectional, n, max_distance), ref)


def test_bias_is_shared_per_bucket_and_offset_by_the_cache():
    torch.manual_seed(0)
    pb = RelativePositionBias(n_heads=3, num_buckets=8, max_distance=16, bidirectional=False)
    full = pb(10, 10)
    assert full.shape == (1, 3, 10, 10)
    # the value for (query i, key j) is weight[bucket(j - i)]: equal along each diagonal
    assert torch.equal(full[0, :, 4, 2], pb.weight[relative_position_bucket(torch.tensor(-2), False, 8, 16)])
    assert torch.equal(full[0, :, 9, 7], full[0, :, 4, 2])
    # a decode step at position 6 with 7 keys is row 6 of the full table
    assert torch.equal(pb(1, 7, past=6), full[:, :, 6:7, :7])
