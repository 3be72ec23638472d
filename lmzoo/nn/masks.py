"""Attention masks. Convention: boolean, True = may attend; shape broadcastable to (B, H, Tq, Tk).

The query at absolute position p may see keys at positions <= p (causal). With a cache, the Tq
new queries sit at the end of Tk keys, so the causal diagonal is offset by Tk - Tq.

One builder, ``build_mask(kind, ...)``, makes every shape the notes draw (query i, key j):

    causal         j <= i                                   GPT, LLaMA (causal decoder)
    bidirectional  every j                                  BERT, the T5 encoder
    prefix         j < prefix_len  or  j <= i               GLM / ChatGLM-6B, UniLM (prefix decoder)
    cross          every encoder key j (Tq decoder queries) T5's encoder-decoder attention
    padding        every j that is a real token             any of the above on a padded batch
    packed         doc(j) == doc(i)  and  j <= i            several documents packed in one row

``attention_mask`` (1 = real token, 0 = pad) removes pad keys from any kind. The kinds are
registered by name in ``MASK_KINDS``; ``lmzoo masks --kind ... --png`` draws them.
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


# --------------------------------------------------------------------------------------------
# The builder: one function per kind, registered by name
# --------------------------------------------------------------------------------------------


def bidirectional_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """(Tq, Tk) all True: every query sees every key (encoders)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device)


def prefix_mask(q_len: int, k_len: int, prefix_len: int | torch.Tensor, device=None) -> torch.Tensor:
    """(B|1, 1, Tq, Tk): keys before ``prefix_len`` are seen by every query, the rest causally.

    ``prefix_len`` is an int or a (B,) tensor of key indices (one prefix per row). Queries are the
    last Tq of the Tk keys, as in ``causal_mask``; a prefix longer than the query's own position
    is still fully visible to it (that is what makes the prefix bidirectional).
    """
    p = torch.as_tensor(prefix_len, device=device).reshape(-1, 1, 1, 1)  # (B|1, 1, 1, 1)
    keys = torch.arange(k_len, device=device)[None, None, None, :]  # (1, 1, 1, Tk)
    return causal_mask(q_len, k_len, device)[None, None] | (keys < p)


def cross_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """(Tq, Tk) all True: each decoder query sees every encoder key (pads are removed by
    ``attention_mask``, the encoder's mask)."""
    return bidirectional_mask(q_len, k_len, device)


def doc_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of every token of a packed row, (B, T): a new document starts wherever the
    position ids restart at 0 (0 1 2 0 1 0 1 2 -> 0 0 0 1 1 2 2 2)."""
    return (position_ids == 0).long().cumsum(-1) - 1


def packed_mask(doc_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """(B, 1, T, T): a token sees only tokens of its own document (and, if causal, earlier ones)."""
    T = doc_ids.shape[-1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    if causal:
        same = same & causal_mask(T, T, doc_ids.device)
    return same[:, None]


def _as_4d(mask: torch.Tensor) -> torch.Tensor:
    return mask[None, None] if mask.ndim == 2 else mask


def _need(value, kind: str, name: str):
    if value is None:
        raise ValueError(f"mask kind '{kind}' needs '{name}'")
    return value


MASK_KINDS = {
    "causal": lambda q, k, a: causal_mask(q, k, a["device"]),
    "bidirectional": lambda q, k, a: bidirectional_mask(q, k, a["device"]),
    "prefix": lambda q, k, a: prefix_mask(q, k, _need(a["prefix_len"], "prefix", "prefix_len"), a["device"]),
    "cross": lambda q, k, a: cross_mask(q, k, a["device"]),
    "padding": lambda q, k, a: bidirectional_mask(q, k, a["device"]),  # + the key padding below
    "packed": lambda q, k, a: packed_mask(a["doc_ids"]),
}


def build_mask(kind: str, q_len: int, k_len: int | None = None, *, prefix_len: int | torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """The boolean (B|1, 1, Tq, Tk) mask of ``kind`` (see the module docstring).

    ``attention_mask`` (B, Tk), 1 = real token, removes pad keys from every kind ("padding" is
    "bidirectional" with it); a query row left with no key (a pad query) is opened to all keys so
    that softmax stays finite, as ``decoder_mask`` does. "packed" takes ``doc_ids`` (B, T) or
    ``position_ids`` that restart at 0 for each document.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind '{kind}'; known: {sorted(MASK_KINDS)}")
    k_len = q_len if k_len is None else k_len
    if kind == "packed":
        if doc_ids is None:
            doc_ids = doc_ids_from_positions(_need(position_ids, kind, "doc_ids or position_ids"))
        if doc_ids.shape[-1] != q_len or q_len != k_len:
            raise ValueError(f"packed mask: doc_ids cover {doc_ids.shape[-1]} tokens, expected q_len = k_len = {q_len}")
        device = doc_ids.device
    if kind == "padding" and attention_mask is None:
        raise ValueError("mask kind 'padding' needs 'attention_mask'")
    mask = _as_4d(MASK_KINDS[kind](q_len, k_len, {"device": device, "prefix_len": prefix_len, "doc_ids": doc_ids}))
    if attention_mask is not None:
        if attention_mask.shape[-1] != k_len:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} keys, expected {k_len}")
        mask = mask & padding_mask(attention_mask.to(mask.device))
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask
