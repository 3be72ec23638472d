"""Packing: fixed-length rows cut from the token stream, with each token's document known.

Documents (each ending with its eos) are laid back to back and the stream is cut every ``seq_len``
tokens, so no token is padding and row ``r`` is ``tokens[start + r·T : start + (r+1)·T]``: random
access in O(log n_docs) with nothing precomputed but the document offsets. A document may run over
a row's end; its rest opens the next row.

Every row carries, besides ``input_ids`` (T,):

- ``doc_ids`` (T,): 0 for the row's first (partial) document, 1 for the next, ...;
- ``position_ids`` (T,): the position inside the document, restarting at 0 where a document
  starts and at the row's start (a model cannot see the part of a document in another row).

They agree with ``lmzoo.nn.masks``: ``doc_ids_from_positions(position_ids) == doc_ids``, and
``build_mask("packed", T, doc_ids=doc_ids)`` is the mask that keeps each document to itself.
A model uses either that mask (with the reset positions) or, more cheaply, only the reset positions;
``objectives.causal_lm`` chooses with ``documents=``.
"""

from __future__ import annotations

import numpy as np
import torch

from lmzoo.data.token_file import TokenFile
from lmzoo.errors import LmzooError


class PackedRows:
    """``len()`` rows of ``seq_len`` tokens from the token range ``span`` (default: all) of a token file."""

    def __init__(self, token_file: TokenFile, seq_len: int, span: tuple[int, int] | None = None):
        if seq_len < 2:
            raise LmzooError(f"seq_len must be at least 2, got {seq_len}")
        self.tf, self.seq_len = token_file, seq_len
        self.start, self.end = span if span is not None else (0, token_file.n_tokens)
        if not 0 <= self.start < self.end <= token_file.n_tokens:
            raise LmzooError(f"{token_file.path}: token range {self.start}..{self.end} is outside "
                             f"0..{token_file.n_tokens}")
        self.n_rows = (self.end - self.start) // seq_len
        if self.n_rows == 0:
            raise LmzooError(f"{token_file.path}: tokens {self.start}..{self.end} are fewer than one row of "
                             f"seq_len={seq_len}")

    def __len__(self) -> int:
        return self.n_rows

    @property
    def n_tokens(self) -> int:
        return self.n_rows * self.seq_len

    def row(self, r: int) -> dict[str, np.ndarray]:
        if not 0 <= r < self.n_rows:
            raise IndexError(f"row {r} of {self.n_rows}")
        a = self.start + r * self.seq_len
        idx = np.arange(a, a + self.seq_len)  # (T,) token indices into the file
        offsets = self.tf.offsets
        doc = np.searchsorted(offsets, idx, side="right") - 1  # (T,) global document of each token
        doc_start = np.maximum(offsets[doc], a)  # where the document starts inside this row
        return {"input_ids": np.asarray(self.tf.tokens[a:a + self.seq_len]).astype(np.int64),
                "doc_ids": doc - doc[0], "position_ids": idx - doc_start}

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """Stack rows into (B, T) int64 tensors."""
        items = [self.row(int(r)) for r in rows]
        return {k: torch.from_numpy(np.stack([it[k] for it in items]).astype(np.int64)) for k in items[0]}


def split_tokens(token_file: TokenFile, val_fraction: float, seq_len: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Token ranges (train, val): about the last ``val_fraction`` of the tokens (at least one row) are
    validation, cut at a document start when one lies in the validation part's first half.
    Deterministic; the sampler shuffles the training rows."""
    if not 0.0 < val_fraction < 1.0:
        raise LmzooError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = token_file.n_tokens
    want = max(int(round(val_fraction * n)), seq_len)
    if n - want < seq_len:
        raise LmzooError(f"{token_file.path}: {n} tokens are too few for training and validation rows of "
                         f"{seq_len} tokens (val_fraction={val_fraction})")
    cut = n - want
    off = token_file.offsets
    nxt = int(off[np.searchsorted(off, cut, side="left")])  # the first document start at or after the cut
    if nxt - cut <= want // 2 and n - nxt >= seq_len:
        cut = nxt
    return (0, cut), (cut, n)
