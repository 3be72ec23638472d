"""LoRA (Hu et al. 2021): a frozen linear plus a trainable low-rank update.

    y = W x + b + s · B A dropout(x),   A (r, in), B (out, r),   s = α / r   (rsLoRA: s = α / √r)

A starts as kaiming-uniform(a = √5) and B as zeros, as PEFT initialises them, so a fresh adapter
changes nothing. Merging folds the update into the weight, W' = W + s · B A (eq. 3 of the paper).

An adapter hangs off the linear it changes (``q_proj.lora``) and the linear's forward is wrapped on
the instance, the way the training loop wraps blocks for activation checkpointing: parameter names
(``layers.0.attn.q_proj.weight``), checkpoints, ``lmzoo.save`` and the quantized layouts do not change.
The parts of one fused Hugging Face linear (GPT-2's c_attn -> q, k, v) share one A Parameter.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn
import torch.nn.functional as F

from lmzoo.errors import ConfigError, LmzooError
from lmzoo.quant.linear import QuantLinear, frozen_dequant_linear


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r  # rsLoRA (Kalajdzievski 2023): rank-stable scale


def new_lora_A(r: int, in_features: int, dtype: torch.dtype, device) -> nn.Parameter:
    a = torch.empty(r, in_features, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's init, as PEFT's init_lora_weights=True
    return nn.Parameter(a)


class LoraAdapter(nn.Module):
    """The update s · B A dropout(x) of one linear; ``lora_A`` may be shared with its fused siblings."""

    def __init__(self, lora_A: nn.Parameter, out_features: int, r: int, alpha: float, dropout: float, rslora: bool):
        super().__init__()
        if lora_A.shape[0] != r:
            raise ValueError(f"lora_A has {lora_A.shape[0]} rows; r is {r}")
        self.lora_A = lora_A  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=lora_A.dtype, device=lora_A.device))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = lora_scaling(r, alpha, rslora)
        self.merged = False
        self.disabled = False  # disable_adapters(): the base alone (an RL or DPO reference without a copy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))  # as PEFT: the input is cast to the adapter's dtype
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling  # (..., in) -> (..., r) -> (..., out)

    def delta_weight(self) -> torch.Tensor:
        """s · B A, float32 (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, rslora={self.rslora}, merged={self.merged}"


def _lora_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, QuantLinear) and torch.is_grad_enabled() and x.requires_grad:
        out = frozen_dequant_linear(x, module)  # gradient to x through the dequantized weight (QLoRA)
    else:
        out = type(module).forward(module, x)
    ad = module.lora
    if ad.merged or ad.disabled:
        return out
    return out + ad(x).to(out.dtype)


def attach(module: nn.Module, adapter: LoraAdapter) -> None:
    module.lora = adapter
    module.forward = functools.partial(_lora_forward, module)


def detach(module: nn.Module) -> None:
    del module.lora
    module.__dict__.pop("forward", None)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """``with disable_adapters(model):`` the model computes its frozen base alone (PEFT's context of the same
    name): the reference policy of RL and preference learning, with no second copy of the weights. Merged
    adapters cannot be switched off (their update is in the weights): that is an error."""
    found = list(adapters(model).values())
    if any(m.lora.merged for m in found):
        raise ValueError("disable_adapters: the adapters are merged into the weights; unmerge_lora(model) first")
    for m in found:
        m.lora.disabled = True
    try:
        yield model
    finally:
        for m in found:
            m.lora.disabled = False


def adapters(model: nn.Module) -> dict[str, nn.Module]:
    """name -> linear for every linear of ``model`` that carries an adapter."""
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "lora", None), LoraAdapter)}


@dataclass
class LoraSettings:
    """What apply_lora was asked for; kept on the model as ``model.lora_config`` (save_adapter writes it)."""

    r: int
    alpha: float
    dropout: float
    rslora: bool
    targets: list[str] | str | None = None
    quantize_base: str | None = None
    extra: dict = field(default_factory=dict)


def check_settings(r, alpha, dropout) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"lora: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConfigError(f"lora: alpha must be a positive number, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"lora: dropout must be in [0, 1), got {dropout!r}")


# -- merge / unmerge / unload ----------------------------------------------------------------------

def _float_base(name: str, module: nn.Module) -> nn.Parameter:
    if isinstance(module, QuantLinear) or not isinstance(getattr(module, "weight", None), nn.Parameter):
        raise LmzooError(f"merge_lora: '{name}' is {type(module).__name__}: merging into a quantized base would "
                         "requantize W + sBA and lose the update; keep the adapter unmerged, or merge into a float copy")
    return module.weight


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, W' = W + s · B A (computed in float32); the adapters stay,
    marked merged, so ``unmerge_lora`` can take the update out again."""
    found = adapters(model)
    if not found:
        raise LmzooError("merge_lora: the model has no LoRA adapters")
    for name, m in found.items():
        _float_base(name, m)
    with torch.no_grad():
        for m in found.values():
            if not m.lora.merged:
                m.weight.copy_((m.weight.float() + m.lora.delta_weight()).to(m.weight.dtype))
                m.lora.merged = True
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract the merged updates again: W = W' - s · B A."""
    with torch.no_grad():
        for m in adapters(model).values():
            if m.lora.merged:
                m.weight.copy_((m.weight.float() - m.lora.delta_weight()).to(m.weight.dtype))
                m.lora.merged = False
    return model


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove the adapters, folding them in first when ``merge`` (PEFT's merge_and_unload): what is
    left is the plain lmzoo model, which ``lmzoo.save`` writes as an ordinary checkpoint. Its base
    parameters stay frozen."""
    found = adapters(model)
    if merge and found:
        merge_lora(model)
    elif not merge:
        unmerge_lora(model)
    for m in found.values():
        detach(m)
    model.__dict__.pop("lora_config", None)
    return model


# -- reporting -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamReport:
    trainable: int
    total: int  # a quantized weight counts as its in x out values

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> ParamReport:
    """How many parameters train, and how many the model holds (as PEFT's print_trainable_parameters)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return ParamReport(trainable, total)
