"""Supervised classification (ViT: image -> one of ``num_labels`` classes over the [CLS] state).

    L = -1/B · Σ_i log softmax(logits_i)[y_i]        (optionally with label smoothing ε:
        the target is (1 - ε) on y_i and ε / K spread over all K classes)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of (B, K) logits against (B,) class ids."""
    return F.cross_entropy(logits.float(), labels.reshape(-1), label_smoothing=label_smoothing)


def make_step_fn(label_smoothing: float = 0.0):
    """``step_fn(model, batch)`` with ``batch = {"pixel_values": (B, C, H, W), "labels": (B,)}``."""

    def step_fn(model, batch):
        out = model(pixel_values=batch["pixel_values"])
        loss = classification_loss(out.logits, batch["labels"], label_smoothing)
        acc = (out.logits.argmax(-1) == batch["labels"].reshape(-1)).float().mean()
        return loss, {"accuracy": float(acc), "n_tokens": int(batch["labels"].numel())}

    return step_fn
