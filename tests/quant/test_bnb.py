"""NF4 and LLM.int8(): the published codebook, bitsandbytes' block and double-quantization rules, and
LLM.int8's outlier decomposition (float on the outlier features, int8 everywhere else)."""

import json

import pytest
import torch

from lmzoo.quant.bnb import NF4_CODE, Int8Linear, NF4Linear, dynamic_code

# QLoRA (Dettmers et al. 2023), appendix E: the NF4 data type.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def test_nf4_codebook_is_the_published_one():
    assert list(NF4_CODE) == PUBLISHED_NF4
    # ...and it is what the construction gives: 8 positive and 7 negative quantiles of N(0, 1) at
    # evenly spaced probabilities from 0.9677083 to 0.5, plus an exact 0, normalised to [-1, 1].
    off = 0.9677083
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8)[:-1].double())
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close(v / v.max(), torch.tensor(PUBLISHED_NF4, dtype=torch.float64), rtol=0, atol=1e-7)


def test_dynamic_map_shape():
    d = dynamic_code()
    assert d.numel() == 256 and torch.equal(d, d.sort().values) and d.unique().numel() == 256
    assert d[-1] == 1.0 and (d == 0).sum() == 1
    assert d[-2].item() == pytest.approx(0.99296875, abs=1e-6)  # midpoint of the top step of [0.1, 1] in 64 steps


def test_nf4_exact_on_codebook_values_and_blocks_of_64():
    code = torch.tensor(NF4_CODE)
    idx = torch.randint(0, 16, (4, 128), generator=torch.Generator().manual_seed(0))
    absmax = torch.tensor([0.5, 2.0, 1.0, 4.0, 0.25, 3.0, 1.5, 0.75])  # one per block of 64
    w = (code[idx].view(-1, 64) * absmax[:, None]).view(4, 128)
    w.view(-1, 64)[:, 0] = absmax  # every block holds its absmax, so the scale is exactly it
    m = NF4Linear.from_weight(w, None, blocksize=64, double_quant=False)
    assert m.absmax.tolist() == absmax.tolist()
    torch.testing.assert_close(m.dequantize(), w, rtol=0, atol=0)
    assert m.weight.shape == (256, 1) and m.weight.dtype == torch.uint8  # two codes per byte


def test_nf4_double_quant_is_close_and_smaller():
    w = torch.randn(128, 512, generator=torch.Generator().manual_seed(1))
    plain = NF4Linear.from_weight(w, None, double_quant=False)
    dq = NF4Linear.from_weight(w, None, double_quant=True)
    assert dq.absmax.dtype == torch.uint8 and dq.nested_absmax.numel() == 1024 // 256
    # the float32 constants come back within the 8-bit dynamic code's resolution
    assert (dq.block_absmax() - plain.absmax).abs().max() < 0.01 * plain.absmax.max()
    assert (dq.dequantize() - w).norm() / w.norm() < 0.11  # 4 bits: ~10% relative error on a Gaussian
    assert dq.weight_bytes() < plain.weight_bytes()
    assert dq.ideal_bytes() == pytest.approx(128 * 512 * (0.5 + 1 / 64) + 4 * 4 + 4)
    state = json.loads(bytes(dq.checkpoint_tensors()[NF4Linear.marker].tolist()))
    assert state["quant_type"] == "nf4" and state["blocksize"] == 64 and state["shape"] == [128, 512]
    assert state["nested_offset"] == pytest.approx(float(plain.absmax.mean()), rel=1e-6)


def _outlier_input(T=6, K=64, cols=(3, 17), value=20.0):
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(2)).clamp(-3, 3)
    x[:, list(cols)] = value * torch.sign(torch.randn(T, len(cols), generator=torch.Generator().manual_seed(3)))
    return x


def test_llm_int8_is_exact_on_outliers():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4)) * 0.1
    m = Int8Linear.from_weight(w, None)
    x = torch.zeros(6, 64)
    x[:, [3, 17]] = _outlier_input()[:, [3, 17]]  # only outlier features
    # the outlier columns bypass activation quantization: y = x · Ŵᵀ in float, to float precision
    torch.testing.assert_close(m(x), x @ m.dequantize().t(), rtol=1e-6, atol=1e-6)
    assert m.dequantize().sub(w).abs().max() <= w.abs().amax(1).max() / 127 / 2 + 1e-7  # half a step per row


def test_llm_int8_decomposition_matches_hand_computation():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5)) * 0.1
    b = torch.randn(32, generator=torch.Generator().manual_seed(6))
    m = Int8Linear.from_weight(w, b)
    x = _outlier_input()
    outl = [3, 17]
    inner = x.clone()
    inner[:, outl] = 0
    sx = inner.abs().amax(1, keepdim=True)
    xq = torch.round(inner * 127 / sx)
    wq = torch.round(w * 127 / w.abs().amax(1, keepdim=True))
    expected = (xq @ wq.t()) * sx * w.abs().amax(1) / 127**2 + x[:, outl] @ (wq[:, outl] * w.abs().amax(1, keepdim=True) / 127).t() + b
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    m.kernel = "dequant"  # the float path computes the same thing
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    # without the decomposition the outliers crush the int8 resolution of every other feature
    ref = x @ w.t() + b
    plain = Int8Linear.from_weight(w, b, threshold=0.0)
    assert (m(x) - ref).norm() < 0.5 * (plain(x) - ref).norm()
