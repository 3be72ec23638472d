"""Supervised fine-tuning: next-token cross-entropy on the tokens the data marks, nothing else.

    L = -1/|A| · Σ_{t+1 ∈ A} log p(x_{t+1} | x_<=t)  (+ α · L_aux for MoE models)

A is the set of labelled positions (``labels != -100``): by default the assistant's tokens of every
turn, each with its end-of-turn token (``lmzoo.data.sft``); the prompt, system and user turns, the
template's role headers and pads are -100. The labels arrive with the batch, already aligned with
the inputs; the shift happens inside the loss, as in pretraining.

Batches are packed (``doc_ids``: each conversation attends only to itself, positions restart) or
padded (``attention_mask``). ``loss_chunk`` computes the head and the loss chunk by chunk
(``objectives.chunked_ce``), so the (tokens × vocabulary) logits never exist for the whole batch.
"""

from __future__ import annotations

from lmzoo.errors import LmzooError
from lmzoo.objectives.causal_lm import with_aux
from lmzoo.nn.transformer import causal_lm_loss as _shifted_ce


def sft_inputs(batch: dict) -> dict:
    """The model's keyword arguments for an SFT batch (packed or padded)."""
    kw = {"input_ids": batch["input_ids"]}
    for key in ("doc_ids", "attention_mask"):
        if key in batch:
            kw[key] = batch[key]
    return kw


def make_step_fn(loss_chunk: int = 0, aux_weight: float | None = None, config=None):
    """``step_fn(model, batch) -> (loss, metrics)`` on a batch with ``labels``; metrics ``ce`` and
    ``n_tokens`` (the trained tokens, so evaluation weighs batches by them)."""
    if loss_chunk < 0:
        raise LmzooError(f"sft: loss_chunk must be 0 (off) or a positive number of tokens, got {loss_chunk}")
    weight = float(getattr(config, "aux_loss_alpha", 0.0) or 0.0) if aux_weight is None else float(aux_weight)

    def step_fn(model, batch):
        labels = batch["labels"]
        kw = sft_inputs(batch)
        if loss_chunk and model.training:  # eval forwards are cheap (no backward): the plain path
            out = model(**kw, labels=labels, loss_chunk=loss_chunk)
            ce = out.loss
            aux = getattr(out, "aux_loss", None)
            if aux is not None and getattr(model, "aux_loss_alpha", 0.0):
                ce = ce - model.aux_loss_alpha * aux.to(ce.dtype)  # DecoderLM added α·aux; add ours below
        else:
            out = model(**kw)
            ce = _shifted_ce(out.logits, labels)
            aux = getattr(out, "aux_loss", None)
        return with_aux(ce, aux, weight, labels)

    return step_fn
