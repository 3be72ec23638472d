"""Decode fast path: the same weights laid out for matrix-vector products (``fuse_for_decode``).

At batch 1 a decode step is a chain of GEMVs that read every weight once from memory. Measured on the
development CPU (AMD EPYC, 2 threads, float32, weights out of cache), torch's ``F.linear`` reads an
(out, in) weight with few columns slowly: 6-8 GB/s for 1408×512 and 8192×512, where ``x @ Wᵀ`` on the
same weight stored (in, out) reads 13-15 GB/s; for (512, 1408) the (out, in) layout is the faster one
(11 vs 9 GB/s). So, for inference only:

- each ``Attention``'s q/k/v projections become one ``WideLinear`` (one GEMV instead of three; the
  outputs split back into q, k, v), each ``GatedMLP``'s gate/up one ``WideLinear``;
- every other plain ``nn.Linear`` with more outputs than inputs (GPT-2's up projection, the LM head,
  tied or not) becomes a ``WideLinear`` with the transposed copy;
- in 16-bit dtypes nothing is transposed (on the AVX2 CPU measured, a transposed bf16 product is 5× slower
  than ``F.linear``'s): the fused projections keep the (out, in) layout (``WideLinear``);
- the rest (o_proj, down_proj: fewer outputs than inputs) stay as they are, and so do DeepSeek-V2's MLA
  projections (its absorbed decode reads their weights) and cross-attention.

Outputs equal the plain model's to float rounding (the same products, summed in another order): tested
for every causal family with greedy ids equal. The model is changed in place and marked
``decode_fused``: it is for generating, not for training or saving (``lmzoo.save`` refuses it).
LoRA layers are left alone. Quantized ``IntLinear`` layers (RTN, GPTQ, AWQ at 8 or 4 bits) become torch's
weight-only int8/int4 kernels (``lmzoo/quant/kernels.py``: the packed codes are read, no float copy),
fused the same way where q/k/v or gate/up share a spec; layers those kernels cannot take (act-order,
other widths and bit counts) and LLM.int8()/NF4 keep dequantize-then-matmul. The kernels take bf16
activations and give bf16 outputs (about 2^-9 relative), so a quantized model's decode differs from its
``IntLinear`` forward by that rounding, far inside the quantization's own.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class WideLinear(nn.Module):
    """y = x Wᵀ + b for one or more ``nn.Linear`` side by side, stored in the layout its dtype reads fastest:
    float32 as the (in, out) transpose ``weight_t`` (``x @ weight_t``: 2× F.linear's rate on the CPUs
    measured, module docstring), 16-bit dtypes as the (out, in) ``weight`` through ``F.linear`` (the
    transposed bf16 product ran 5× slower than F.linear on an AVX2 CPU without bf16 units, 2711 vs 518 µs
    for 2816×512)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape  # weight: (out, in), as nn.Linear's
        self.transposed = weight.dtype == torch.float32
        if self.transposed:
            self.weight_t = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        else:
            self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def of(cls, *linears: nn.Linear) -> "WideLinear":
        """One WideLinear whose outputs are those of ``linears`` side by side."""
        with torch.no_grad():
            w = torch.cat([m.weight for m in linears], 0)  # (sum of outs, in)
            b = _cat_biases(linears, w.dtype)
        return cls(w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        y = x @ self.weight_t
        return y + self.bias if self.bias is not None else y


def _cat_biases(mods, dtype) -> torch.Tensor | None:
    """The biases of ``mods`` side by side in ``dtype`` (zeros for a module without one); None if none has one."""
    device = next((m.bias.device for m in mods if m.bias is not None), None)
    if device is None:
        return None
    return torch.cat([m.bias.detach().to(dtype) if m.bias is not None else
                      torch.zeros(m.out_features, dtype=dtype, device=device) for m in mods])


def _plain(m) -> bool:
    return type(m) is nn.Linear


def _int_weights(mods):
    """The IntWeights of ``mods`` if every one is an ``IntLinear`` a decode kernel takes, with one spec."""
    from lmzoo.quant.kernels import supported
    from lmzoo.quant.linear import IntLinear

    if not all(type(m) is IntLinear and m.input_scale is None and m.kernel != "dequant" for m in mods):
        return None
    if len({(m.bits, m.group_size, m.in_features) for m in mods}) != 1:
        return None
    iws = [m.int_weights() for m in mods]
    return iws if all(supported(iw) is None for iw in iws) else None


def _lowbit_of(*mods):
    """One int8/int4 kernel module for ``mods`` side by side (None if they cannot share one)."""
    from lmzoo.quant.kernels import concat, lowbit

    iws = _int_weights(mods)
    if iws is None:
        return None
    return lowbit(concat(iws) if len(iws) > 1 else iws[0], _cat_biases(mods, torch.float32))


def fuse_for_decode(model: nn.Module) -> dict:
    """Lay ``model``'s weights out for decoding, in place (see the module docstring); what it changed."""
    from lmzoo.nn.attention import Attention, CrossAttention
    from lmzoo.nn.mla import MLA
    from lmzoo.nn.mlp import GatedMLP

    if getattr(model, "decode_fused", False):
        return {"qkv": 0, "gate_up": 0, "wide": 0, "lowbit": 0}
    done = {"qkv": 0, "gate_up": 0, "wide": 0, "lowbit": 0}
    for mod in list(model.modules()):
        if type(mod) is Attention:
            qkv = [getattr(mod, n) for n in ("q_proj", "k_proj", "v_proj")]
            fused = WideLinear.of(*qkv) if all(map(_plain, qkv)) else _lowbit_of(*qkv)
            if fused is not None:
                mod.qkv_fused = fused
                del mod.q_proj, mod.k_proj, mod.v_proj
                done["qkv"] += 1
        elif type(mod) is GatedMLP:
            gu = [mod.gate_proj, mod.up_proj]
            fused = WideLinear.of(*gu) if all(map(_plain, gu)) else _lowbit_of(*gu)
            if fused is not None:
                mod.gate_up_fused = fused
                del mod.gate_proj, mod.up_proj
                done["gate_up"] += 1
    for parent in list(model.modules()):
        if isinstance(parent, (CrossAttention, MLA)):  # MLA reads its projections' weights (absorbed decode)
            continue
        for name, child in list(parent.named_children()):
            if _plain(child) and child.out_features > child.in_features:
                setattr(parent, name, WideLinear.of(child))
                done["wide"] += 1
            else:
                k = _lowbit_of(child)
                if k is not None:
                    setattr(parent, name, k)
                    done["lowbit"] += 1
    model.decode_fused = True
    return done
