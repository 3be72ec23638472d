"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Weight decay (Loshchilov & Hutter, 2019) goes to parameters with two or more dimensions (linear
and embedding matrices); biases and norm gains get none, as in GPT-2/nanoGPT and LLaMA recipes.
A tied head is one parameter, so it is decayed once.

Schedules (``lr_factor``): linear warmup over ``warmup_steps`` to the peak, then
  cosine:   min + (peak - min) · ½ (1 + cos(π · p)),   p = progress after warmup in [0, 1]
  linear:   min + (peak - min) · (1 - p)
  constant: peak
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from lmzoo.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _impl_kwargs(impl: str, device: torch.device) -> dict:
    """fused where torch implements it for the device (CUDA, and CPU since torch 2.4), else foreach."""
    has_fused = "fused" in inspect.signature(torch.optim.AdamW).parameters
    fused_ok = has_fused and device.type in ("cuda", "cpu", "xpu", "mps")
    if impl == "fused" or (impl == "auto" and fused_ok):
        return {"fused": True}
    if impl == "loop":
        return {"foreach": False}
    return {"foreach": True}


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             **_impl_kwargs(cfg.optimizer_impl, device))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The multiplier of ``cfg.lr`` used for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    p = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr
    shape = 0.5 * (1.0 + math.cos(math.pi * p)) if cfg.schedule == "cosine" else 1.0 - p
    return floor + (1.0 - floor) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # LambdaLR stores no lambda in its state_dict (only counters and base lrs), so it resumes exactly.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
