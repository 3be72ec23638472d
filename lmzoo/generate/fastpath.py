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
- the rest (o_proj, down_proj: fewer outputs than inputs) stay as they are, and so do DeepSeek-V2's MLA
  projections (its absorbed decode reads their weights) and cross-attention.

Outputs equal the plain model's to float rounding (the same products, summed in another order): tested
for every causal family with greedy ids equal. The model is changed in place and marked
``decode_fused``: it is for generating, not for training or saving (``lmzoo.save`` refuses it).
Quantized and LoRA layers are left alone (they are not plain ``nn.Linear``).
"""

from __future__ import annotations

import torch
from torch import nn


class WideLinear(nn.Module):
    """y = x @ weight_t + bias, with ``weight_t`` the (in, out) transpose of an ``nn.Linear`` weight."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight_t = nn.Parameter(weight_t.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = weight_t.shape

    @classmethod
    def of(cls, *linears: nn.Linear) -> "WideLinear":
        """One WideLinear whose outputs are those of ``linears`` side by side."""
        with torch.no_grad():
            w = torch.cat([m.weight for m in linears], 0).t()  # (in, sum of outs)
            biases = [m.bias for m in linears]
            b = None if all(x is None for x in biases) else torch.cat(
                [x if x is not None else torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device)
                 for x, m in zip(biases, linears)])
        return cls(w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y + self.bias if self.bias is not None else y


def _plain(m) -> bool:
    return type(m) is nn.Linear


def fuse_for_decode(model: nn.Module) -> dict:
    """Lay ``model``'s weights out for decoding, in place (see the module docstring); what it changed."""
    from lmzoo.nn.attention import Attention, CrossAttention
    from lmzoo.nn.mla import MLA
    from lmzoo.nn.mlp import GatedMLP

    if getattr(model, "decode_fused", False):
        return {"qkv": 0, "gate_up": 0, "wide": 0}
    done = {"qkv": 0, "gate_up": 0, "wide": 0}
    for mod in list(model.modules()):
        if type(mod) is Attention and all(_plain(getattr(mod, n)) for n in ("q_proj", "k_proj", "v_proj")):
            mod.qkv_fused = WideLinear.of(mod.q_proj, mod.k_proj, mod.v_proj)
            del mod.q_proj, mod.k_proj, mod.v_proj
            done["qkv"] += 1
        elif type(mod) is GatedMLP and _plain(mod.gate_proj) and _plain(mod.up_proj):
            mod.gate_up_fused = WideLinear.of(mod.gate_proj, mod.up_proj)
            del mod.gate_proj, mod.up_proj
            done["gate_up"] += 1
    for parent in list(model.modules()):
        if isinstance(parent, (CrossAttention, MLA)):  # MLA reads its projections' weights (absorbed decode)
            continue
        for name, child in list(parent.named_children()):
            if _plain(child) and child.out_features > child.in_features:
                setattr(parent, name, WideLinear.of(child))
                done["wide"] += 1
    model.decode_fused = True
    return done
