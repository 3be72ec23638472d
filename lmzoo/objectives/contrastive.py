"""Contrastive image-text objective: CLIP's symmetric InfoNCE (Radford et al. 2021, figure 3).

For a batch of N matching pairs, with L2-normalised embeddings t_i (texts) and v_j (images) and a
learned inverse temperature s = exp(logit_scale):

    logits_ij = s · t_i · v_j                                      (N, N), logits_per_text
    loss      = ½ [ CE(logits, diag) + CE(logitsᵀ, diag) ]

Each text must pick its own image among the N (rows) and each image its own text (columns); the
other N - 1 items of the batch are the negatives, so a larger batch is a harder task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_logits(text_embeds: torch.Tensor, image_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """(B_txt, P) and (B_img, P) normalised embeddings -> (B_txt, B_img) logits_per_text, exp(logit_scale)·cos."""
    return torch.matmul(text_embeds, image_embeds.t().to(text_embeds.device)) * logit_scale.exp().to(text_embeds.device)


def symmetric_infonce(logits_per_text: torch.Tensor) -> torch.Tensor:
    """The mean of the text->image and image->text cross-entropies; pair i is (text i, image i)."""
    n = logits_per_text.shape[0]
    if logits_per_text.shape != (n, n):
        raise ValueError(f"symmetric InfoNCE needs a square (N, N) logit matrix, got {tuple(logits_per_text.shape)}")
    target = torch.arange(n, device=logits_per_text.device)
    logits = logits_per_text.float()
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
