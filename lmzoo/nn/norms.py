"""Normalisation layers: LayerNorm (GPT-2, Bloom, BERT) and RMSNorm (LLaMA, ChatGLM2, T5).

RMSNorm differs from LayerNorm by skipping the mean and the bias: y = x / rms(x) · g.
Both compute their statistics in float32 whatever the input dtype, so bf16 runs stay stable.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm, with its statistics in float32 under reduced precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x · rsqrt(mean(x²) + eps) · g."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm '{kind}'; known: {sorted(NORMS)}")
