"""Feed-forward blocks: the plain two-layer MLP (GPT-2, Bloom, BERT) and gated MLPs (SwiGLU, GeGLU).

Plain:  down(act(up(x)))
Gated:  down(act(gate(x)) * up(x))   (Shazeer 2020, "GLU Variants Improve Transformer")
SwiGLU uses SiLU as the gate's activation (LLaMA, ChatGLM2), GeGLU uses GeLU (GLM-130B, T5 v1.1).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # "gelu_new" (GPT-2) and Bloom's gelu: the tanh approximation of Hendrycks & Gimpel.
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # CLIP's "quick_gelu": x·σ(1.702x), the sigmoid approximation of GeLU (Hendrycks & Gimpel, section 2).
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_tanh": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,  # for poolers (ViT's pooler_act)
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """down(act(up(x))): the classic transformer feed-forward. ``dropout``: on the activations before
    ``down`` (T5's DenseReluDense), training forwards only."""

    def __init__(self, d_model: int, d_ff: int, act: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.act_name = act
        self.act = activation(act)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.dropout(self.act(self.up_proj(x)), self.dropout, self.training and self.dropout > 0))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with act='silu', GeGLU with act='gelu'."""

    def __init__(self, d_model: int, d_ff: int, act: str = "silu", bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.act_name = act
        self.act = activation(act)
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = dropout  # on the gated product before down (T5 v1.1's DenseGatedActDense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "gate_up_fused" in self._modules:  # lmzoo.generate.fastpath: one matmul for both
            gate, up = self.gate_up_fused(x).chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(F.dropout(h, self.dropout, self.training and self.dropout > 0))

    @property
    def kind(self) -> str:
        return {"silu": "SwiGLU", "swish": "SwiGLU", "gelu": "GeGLU",
                "gelu_new": "GeGLU (tanh)"}.get(self.act_name, f"{self.act_name}-GLU")  # T5 v1.1: tanh GeLU
