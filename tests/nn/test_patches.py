"""The patch embedding: the stride-p convolution is "flatten each patch, one linear map"; positions and
[CLS] are added; other image sizes interpolate the position grid (equality with transformers'
interpolate_pos_encoding: tests/models/vit and tests/models/clip)."""

import pytest
import torch

from lmzoo.nn.patches import PatchEmbedding


def test_convolution_is_a_linear_map_of_flattened_patches():
    torch.manual_seed(0)
    pe = PatchEmbedding(d_model=16, image_size=12, patch_size=4, num_channels=3, bias=True)
    x = torch.randn(2, 3, 12, 12)
    out = pe(x)  # (2, 1 + 9, 16)
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, 3, 3, 4, 4)
    flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 9, 3 * 16)  # row-major patches, (C, p, p) each
    ref = flat @ pe.proj.weight.reshape(16, -1).t() + pe.proj.bias
    assert torch.allclose(out[:, 1:], ref + pe.positions[1:], atol=1e-5)
    assert torch.allclose(out[:, 0], (pe.cls + pe.positions[0]).expand(2, 16))


def test_other_sizes_interpolate_and_bad_inputs_fail():
    pe = PatchEmbedding(d_model=8, image_size=16, patch_size=4)
    assert pe(torch.randn(1, 3, 16, 16)).shape == (1, 17, 8)
    assert pe(torch.randn(1, 3, 24, 20)).shape == (1, 1 + 6 * 5, 8)
    assert pe(torch.randn(1, 3, 18, 18)).shape == (1, 17, 8)  # the remainder rows are dropped, as by the conv
    with pytest.raises(ValueError, match="4 channels"):
        pe(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="smaller than one 4x4 patch"):
        pe(torch.randn(1, 3, 3, 16))
