"""Attention masks. Convention: boolean, True = may attend; shape broadcastable to (B, H, Tq, Tk).

The query at absolute position p may see keys at positions <= p (causal). With a cache, the Tq
new queries sit at the end of Tk keys, so the causal diagonal is offset by Tk - Tq.
"""

from __future__ import annotations

import torch


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """(Tq, Tk) lower-triangular mask aligned to the end of the keys."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, Tk) 1/0 mask of real/pad tokens -> (B, 1, 1, Tk) boolean key mask."""
    return attention_mask.bool()[:, None, None, :]


def decoder_mask(attention_mask: torch.Tensor | None, q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Causal and padding together: (B|1, 1, Tq, Tk) boolean.

    A query row with no visible key (a left-pad query) is opened to all keys so that softmax stays
    finite; its output belongs to a pad position and is never used.
    """
    mask = causal_mask(q_len, k_len, device)[None, None]
    if attention_mask is not None:
        mask = mask & padding_mask(attention_mask)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive float mask (0 where allowed, dtype's min where not)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: the first real token of each row is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
