"""Normalisation layers: LayerNorm (GPT-2, Bloom, BERT) and RMSNorm (LLaMA, ChatGLM2, T5); DeepNorm's
constants and initialisation (GLM-130B, ChatGLM-6B).

RMSNorm differs from LayerNorm by skipping the mean and the bias: y = x / rms(x) · g.
Both compute their statistics in float32 whatever the input dtype, so bf16 runs stay stable.

DeepNorm (Wang et al. 2022) is post-norm with the residual up-weighted, x = LN(α·x + f(x)), and
the weights of f initialised smaller by β, so that very deep post-norm stacks train stably. The
residual itself is ``TransformerLayer(placement="deepnorm", alpha=...)`` in transformer.py.
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


# --------------------------------------------------------------------------------------------
# DeepNorm
# --------------------------------------------------------------------------------------------


def deepnorm_alpha(n_layers: int) -> float:
    """α = (2N)^(1/2), GLM-130B's choice for N layers (the DeepNet paper's decoder-only value is
    (2N)^(1/4); GLM-130B, section 2.1, and ChatGLM-6B's code use the square root)."""
    return (2 * n_layers) ** 0.5


def deepnorm_beta(n_layers: int) -> float:
    """β = (2N)^(-1/2): the Xavier-normal gain of the value, output and feed-forward weights."""
    return (2 * n_layers) ** -0.5


def deepnorm_init_(scaled: list[nn.Linear], plain: list[nn.Linear], beta: float) -> None:
    """DeepNorm's initialisation: Xavier normal with gain β for ``scaled`` (v, o and the MLP),
    gain 1 for ``plain`` (q and k), biases zero."""
    for lin, gain in [(m, beta) for m in scaled] + [(m, 1.0) for m in plain]:
        nn.init.xavier_normal_(lin.weight, gain=gain)
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
