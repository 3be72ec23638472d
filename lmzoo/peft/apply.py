"""``apply_lora`` / ``prepare_qlora``: put adapters on a model's decoder linears and freeze the rest."""

from __future__ import annotations

import torch
from torch import nn

from lmzoo.errors import LmzooError
from lmzoo.peft.layout import Part, Unit, select, units
from lmzoo.peft.lora import LoraAdapter, LoraSettings, adapters, attach, check_settings, new_lora_A
from lmzoo.peft.qlora import quantize_frozen_base


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05, targets=None,
               rslora: bool = False, *, quantize_base: str | None = None, dtype=None) -> nn.Module:
    """Wrap the named linears of ``model`` with LoRA adapters, in place, and freeze everything else.

    ``targets``: None (every attention and MLP projection of the decoder layers), Hugging Face names
    ("q_proj", GPT-2's "c_attn", Bloom's "query_key_value"), lmzoo names ("attn.q_proj", "mlp.up_proj"),
    or one regular expression over full names; see ``layout.select``. ``rslora``: scale α/√r instead
    of α/r. ``quantize_base="nf4"``: QLoRA, the base becomes NF4 with double quantization first.
    ``dtype``: the adapters' dtype (default: the base weight's, float32 over a quantized base).
    """
    check_settings(r, alpha, dropout)
    if adapters(model):
        raise LmzooError("apply_lora: the model already has LoRA adapters; unload_lora(model) first")
    if quantize_base is not None:
        quantize_frozen_base(model, quantize_base)
    chosen = select(units(model), targets)
    install(model, chosen, r, alpha, dropout, rslora, dtype)
    model.lora_config = LoraSettings(r, alpha, dropout, rslora, targets, quantize_base)
    return model


def prepare_qlora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05, targets=None,
                  rslora: bool = False, *, dtype=None) -> nn.Module:
    """QLoRA: the decoder linears to NF4 (blocks of 64, double quantization), then LoRA on top."""
    return apply_lora(model, r, alpha, dropout, targets, rslora, quantize_base="nf4", dtype=dtype)


def _adapter_dtype(base: nn.Module, dtype) -> torch.dtype:
    if dtype is not None:
        from lmzoo.interop.checkpoint import as_dtype

        return as_dtype(dtype)
    w = getattr(base, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32


def install(model: nn.Module, chosen: list[tuple[Unit, tuple[Part, ...]]], r: int, alpha: float, dropout: float,
            rslora: bool, dtype=None) -> None:
    """Freeze ``model`` and give each chosen part an adapter; the parts of one unit share their A."""
    for p in model.parameters():
        p.requires_grad_(False)
    for unit, parts in chosen:
        base = model.get_submodule(parts[0].name)
        device = next(t.device for t in [*base.parameters(), *base.buffers()])
        A = new_lora_A(r, unit.in_features, _adapter_dtype(base, dtype), device)
        for part in parts:
            attach(model.get_submodule(part.name), LoraAdapter(A, len(part.rows), r, alpha, dropout, rslora))
