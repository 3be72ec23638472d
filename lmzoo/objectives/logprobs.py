"""Log-probabilities of responses: what DPO, IPO, SimPO, KTO and the RL stages compare.

    log π(y | x) = Σ_{t+1 ∈ A} log p(x_{t+1} | x_<=t)          (DPO, Rafailov et al. 2023, eq. 7's π terms)

A is the set of labelled positions (``labels != -100``): the response's tokens and its end-of-turn
token, never the prompt or the padding (``lmzoo.data.preference`` makes such labels). The shift is
the one of ``causal_lm_loss``: the logits at t score the label at t + 1, so a label at position 0 is
never scored. ``average=True`` divides by |A|, the length-normalised log-likelihood of SimPO (eq. 4)
and of IPO/ORPO-style variants; a row with no label gives 0, never NaN.

Computed in float32 whatever the logits' dtype, as ``gather(logits) - logsumexp(logits)``: no
(B, T, V) log-softmax is kept for backward beyond what logsumexp needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE):
    """((B, T) log p of each next label, (B, T) bool mask of the scored positions): position t holds
    log p(labels[t + 1] | ...) from ``logits[:, t]``; the last position is never scored."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in (B, T)")
    target = F.pad(labels[:, 1:], (0, 1), value=ignore_index).to(logits.device)  # (B, T), shifted left
    mask = target != ignore_index
    logits = logits.float()
    picked = logits.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return logps, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False,
                   ignore_index: int = IGNORE) -> torch.Tensor:
    """(B,) summed (``average``: mean) log-probabilities of the labelled tokens of each row."""
    logps, mask = token_logps(logits, labels, ignore_index)
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def response_logps(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   average: bool = False) -> torch.Tensor:
    """(B,) ``sequence_logps`` of a forward of ``model`` on (B, T) ``input_ids`` (right padding and its
    ``attention_mask``)."""
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    return sequence_logps(model(input_ids, **kw).logits, labels, average=average)
