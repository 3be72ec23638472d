"""Uniform (affine) integer quantization of weight groups: the grid RTN, GPTQ and AWQ share.

For a group of weights w with range [x_min, x_max] (widened to contain 0) and maxq = 2^bits - 1:

    asymmetric:  s = (x_max - x_min) / maxq,          z = round(-x_min / s)
    symmetric:   s = 2·max(|x_min|, x_max) / maxq,    z = (maxq + 1) / 2
    q = clamp(round(w / s) + z, 0, maxq),             ŵ = s · (q - z)

(the convention of GPTQ's and AutoGPTQ's ``Quantizer``; AWQ's asymmetric grid is the same). The
scale is rounded to float16 *before* the codes are computed, because checkpoints store float16
scales: the weights a model computes with are then exactly the ones it saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmzoo.errors import LmzooError

FP16_TINY = 2.0**-24  # the smallest positive float16 (subnormal); smaller scales would round to 0


def affine_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero of ``w`` (rows, n): both (rows,), scale float32 (fp16-exact), zero float32."""
    maxq = 2**bits - 1
    w = w.float()
    x_min = w.amin(dim=1).clamp(max=0)
    x_max = w.amax(dim=1).clamp(min=0)
    if sym:
        x_max = torch.maximum(x_min.abs(), x_max)
        x_min = torch.where(x_min < 0, -x_max, x_min)
    empty = (x_min == 0) & (x_max == 0)  # an all-zero group still needs a usable scale
    x_min, x_max = torch.where(empty, -1.0, x_min), torch.where(empty, 1.0, x_max)
    scale = ((x_max - x_min) / maxq).clamp(min=FP16_TINY).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-x_min / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits - 1]; ``scale``/``zero`` broadcast against ``w``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return scale * (quantize_codes(w, scale, zero, bits) - zero)


@dataclass
class IntWeights:
    """A quantized weight in plain form: what every packed layout is written from and read into."""

    codes: torch.Tensor  # (out, in) uint8, in the original column order
    scales: torch.Tensor  # (groups, out) float16
    zeros: torch.Tensor  # (groups, out) int32
    g_idx: torch.Tensor  # (in,) int32, group of each input column
    bits: int
    group_size: int  # in_features when there is one group per row

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """(out, in) weight: s[g(i)] · (q - z[g(i)]) for input column i."""
        g = self.g_idx.long()
        s = self.scales.float()[g].t()  # (out, in)
        z = self.zeros.float()[g].t()  # (out, in)
        return (s * (self.codes.float() - z)).to(dtype)


def check_group_size(group_size: int | None, in_features: int, where: str, whole: bool = False) -> int:
    """The group size a layer uses (``None`` -> one group per row). GPTQ's layout allows a last,
    shorter group (AutoGPTQ counts ceil(in / group_size) groups); ``whole`` demands groups that tile
    the row exactly (AWQ's GEMM layout)."""
    gs = in_features if group_size in (None, -1) else group_size
    if gs <= 0 or (whole and in_features % gs):
        raise LmzooError(f"{where}: group_size {group_size} does not divide in_features {in_features}, "
                         "which this layout needs; use a group size that does, or None for one scale per row")
    return gs


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def rtn(weight: torch.Tensor, bits: int, group_size: int | None, sym: bool, where: str = "weight") -> IntWeights:
    """Round-to-nearest: each group's own range, no error correction; the baseline every method beats."""
    out_f, in_f = weight.shape
    gs = check_group_size(group_size, in_f, where)
    G = n_groups(in_f, gs)
    # A shorter last group is padded with zeros, which leave its range unchanged (it always holds 0).
    padded = torch.nn.functional.pad(weight.detach().float(), (0, G * gs - in_f))
    grouped = padded.reshape(out_f * G, gs)  # (out·G, gs): group g of row o is row o·G + g
    scale, zero = affine_params(grouped, bits, sym)
    codes = quantize_codes(grouped, scale[:, None], zero[:, None], bits).reshape(out_f, G * gs)[:, :in_f]
    return IntWeights(codes=codes.to(torch.uint8),
                      scales=scale.reshape(out_f, G).t().contiguous().half(),
                      zeros=zero.reshape(out_f, G).t().contiguous().to(torch.int32),
                      g_idx=(torch.arange(in_f) // gs).to(torch.int32), bits=bits, group_size=gs)
