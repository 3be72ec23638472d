"""Initial weights for training from scratch (the builders' PyTorch defaults are for loading into).

``init_weights``: every matrix (linear, embedding, position table, stacked experts, router) drawn
from N(0, std²), every bias zero, norm gains left at one. std = 0.02 is the recipe of GPT-2, BERT
(initializer_range), LLaMA and most of their descendants. PyTorch's default N(0, 1) embedding
instead gives a tied head logits of size ~sqrt(d_model) and a first loss far above ln(V).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> nn.Module:
    for name, p in model.named_parameters():  # a tied weight is visited once
        if p.dim() >= 2:
            p.normal_(0.0, std)
        elif name.endswith("bias"):
            p.zero_()
    return model
