"""Exporting an lmzoo model that is already quantized (RTN, GPTQ, AWQ, bitsandbytes) to GGUF.

Every quantized linear is first written back as the float matrix it computes with (``dequantize``), so
the family's transforms (permutations, fused q/k/v, split MLA projections, stacked experts) run on it as
on any float model. Re-quantizing those values would round them a second time: GGUF's quantizer picks its
own block scale (max/127 for Q8_0) where lmzoo's RTN chose another (lmzoo's symmetric 8-bit codes span
-128..127). Where the block shapes allow, the codes and scales are written as they are instead:

    Q8_0  value = d · q, blocks of 32, q int8, d f16:      an 8-bit layer whose groups are whole 32-blocks
                                                           (group size a multiple of 32, or one per row of
                                                           a multiple of 32) and every q - z fits in int8
    Q4_0  value = d · (q - 8), blocks of 32, d f16:        a 4-bit layer with such groups and zero point 8
                                                           (lmzoo's symmetric 4-bit)

The codes and the per-element scales are carried through the family's ``tensors`` as two more float
models (codes q - z, scales s; every other weight NaN, which marks what did not come from a quantized
layer), so a transform that moves rows keeps the blocks, and one that moves columns (DeepSeek-V2's
per-head transposed ``attn_k_b``) breaks them: that tensor is re-quantized, and reported as such.
Asymmetric 4-bit (Q4_1: value = d · q + m) would round its minimum m = -s·z to f16: re-quantized too.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from lmzoo.errors import ConfigError

BLOCK = 32


def _linears(model):
    from lmzoo.quant.linear import QuantLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def _as_linear(m, weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if m.bias is not None:
            lin.bias.copy_(m.bias.float())
    return lin.requires_grad_(False)


def split_quantized(model):
    """(float model, codes model or None, scales model or None) of a quantized ``model``."""
    from lmzoo.quant.linear import IntLinear

    layers = _linears(model)
    for name, m in layers:
        if getattr(m, "input_scale", None) is not None:
            raise ConfigError(f"gguf export: {name} divides its input by AWQ input scales that were not folded "
                              "into a preceding layer; GGUF has no tensor for them")
    out = copy.deepcopy(model)
    for attr in ("quantization_config", "decode_fused"):
        out.__dict__.pop(attr, None)
    ints = {n: m.int_weights() for n, m in layers if isinstance(m, IntLinear)}
    for name, m in layers:
        owner, _, attr = name.rpartition(".")
        setattr(out.get_submodule(owner) if owner else out, attr, _as_linear(m, m.dequantize(torch.float32)))
    if not ints:
        return out, None, None
    views = []
    for which in ("codes", "scales"):
        v = copy.deepcopy(out)
        with torch.no_grad():
            for p in v.parameters():
                p.fill_(float("nan"))
            for name, iw in ints.items():
                g = iw.g_idx.long()
                t = iw.codes.float() - iw.zeros.float()[g].t() if which == "codes" else iw.scales.float()[g].t()
                v.get_submodule(name).weight.copy_(t)  # (out, in)
        views.append(v)
    return out, views[0], views[1]


def exact_blocks(codes: torch.Tensor, scales: torch.Tensor, type: str) -> np.ndarray | None:
    """The raw GGUF bytes of ``type`` holding ``scales · codes`` exactly, or None where they cannot
    (NaN codes, which mark weights not from a quantized layer, fail the integer check)."""
    if type not in ("q8_0", "q4_0") or codes.shape[-1] % BLOCK:
        return None
    c = codes.reshape(-1, codes.shape[-1] // BLOCK, BLOCK)  # (rows, blocks, 32)
    s = scales.reshape(c.shape)
    if not torch.equal(s, s[..., :1].expand_as(s)) or not torch.equal(c, c.round()):
        return None
    d = s[..., 0].numpy().astype(np.float16)
    if not np.array_equal(d.astype(np.float32), s[..., 0].numpy()):  # scales are stored f16; a transform may scale
        return None
    if type == "q8_0":
        if c.min() < -128 or c.max() > 127:
            return None
        qs = c.numpy().astype(np.int8).view(np.uint8)
    else:
        q = c + 8
        if q.min() < 0 or q.max() > 15:
            return None
        q = q.numpy().astype(np.uint8)
        qs = q[..., :16] | (q[..., 16:] << 4)  # element j in the low nibble of byte j, j + 16 in the high one
    raw = np.concatenate([d[..., None].view(np.uint8), qs], axis=-1)  # (rows, blocks, 2 + 32 or 16)
    return raw.reshape(*codes.shape[:-1], -1)
