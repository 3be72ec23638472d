"""Causal language modelling: predict token t+1 from tokens <= t (GPT-2, LLaMA, Bloom, ChatGLM2,
DeepSeek-V2), plus the MoE balance loss when the model's output carries one.

    L = -1/N · Σ_t log p(x_{t+1} | x_<=t)  +  α · L_aux          (DeepSeek-V2 eq. 24: α1 · L_ExpBal)

The labels are the inputs; the shift happens inside the loss (``nn.transformer.causal_lm_loss``
shifts labels, not logits), so a row of T tokens gives T - 1 predictions.

Packed rows (``data.packing``) hold several documents. ``documents=`` says what the model is told:

| documents | the model gets | attention across documents |
|---|---|---|
| ``"concat"`` | input_ids only (GPT-2/nanoGPT practice: eos separates documents) | yes |
| ``"positions"`` | position_ids restarting at 0 per document | yes, positions reset |
| ``"mask"`` | doc_ids: the packed-document mask (``build_mask("packed")``) and reset positions | no |

With ``"mask"`` the first token of a document is not a target (nothing before it is visible).
"""

from __future__ import annotations

import torch

from lmzoo.errors import LmzooError
from lmzoo.nn.transformer import causal_lm_loss as _shifted_ce

DOCUMENT_MODES = ("concat", "positions", "mask")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, aux_loss: torch.Tensor | None = None,
                   aux_weight: float = 0.0, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, T, V) ``logits`` against (B, T) ``labels`` (logits at t
    predict labels at t+1; ``ignore_index`` is skipped), plus ``aux_weight · aux_loss`` when given."""
    loss = _shifted_ce(logits, labels, ignore_index)
    if aux_loss is not None and aux_weight:
        loss = loss + aux_weight * aux_loss.to(loss.dtype)
    return loss


def lm_labels(batch: dict, documents: str = "concat") -> torch.Tensor:
    """The labels of a packed batch: its input_ids, with each document's first token ignored when
    the model cannot see the document before it (``documents="mask"``)."""
    labels = batch["input_ids"].clone()
    if documents == "mask":
        labels[batch["position_ids"] == 0] = -100
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    return labels


def model_inputs(batch: dict, documents: str) -> dict:
    if documents not in DOCUMENT_MODES:
        raise LmzooError(f"causal_lm: documents must be one of {DOCUMENT_MODES}, got '{documents}'")
    kw = {"input_ids": batch["input_ids"]}
    if "attention_mask" in batch:
        kw["attention_mask"] = batch["attention_mask"]
    if documents == "positions":
        kw["position_ids"] = batch["position_ids"]
    elif documents == "mask":
        kw["doc_ids"] = batch["doc_ids"]
    return kw


def make_step_fn(documents: str = "concat", aux_weight: float | None = None, config=None):
    """``step_fn(model, batch) -> (loss, metrics)``. ``aux_weight`` defaults to the config's
    ``aux_loss_alpha`` (DeepSeek-V2's α1; 0 for dense models). Metrics: ``ce`` (the LM part),
    ``aux_loss`` when the model has one, ``n_tokens`` (predicted tokens)."""
    if documents not in DOCUMENT_MODES:
        raise LmzooError(f"causal_lm: documents must be one of {DOCUMENT_MODES}, got '{documents}'")
    weight = float(getattr(config, "aux_loss_alpha", 0.0) or 0.0) if aux_weight is None else float(aux_weight)

    def step_fn(model, batch):
        labels = lm_labels(batch, documents)
        out = model(**model_inputs(batch, documents))
        return with_aux(_shifted_ce(out.logits, labels), getattr(out, "aux_loss", None), weight, labels)

    return step_fn


def with_aux(ce: torch.Tensor, aux: torch.Tensor | None, weight: float, labels: torch.Tensor):
    """(ce + weight · aux, metrics ``ce``, ``n_tokens`` (predicted tokens), ``aux_loss``): the step result
    every next-token objective returns."""
    loss = ce + weight * aux.to(ce.dtype) if aux is not None and weight else ce
    metrics = {"ce": ce.detach(), "n_tokens": int((labels[:, 1:] != -100).sum())}
    if aux is not None:
        metrics["aux_loss"] = aux.detach()
    return loss, metrics
