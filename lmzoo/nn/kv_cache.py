"""KV caches: objects the generation engine owns and hands to the model on every step.

``KVCache`` preallocates K and V for every layer at their final length, so a decode step writes
one slot instead of concatenating (which would copy the whole cache every token). Its ``nbytes``
is the cache memory, exactly: 2 · n_kv_heads · head_dim · n_tokens · layers · bytes per value
(MHA: n_kv_heads = n_heads; MQA: 1; GQA: n_groups).
"""

from __future__ import annotations

import torch

from lmzoo.errors import LmzooError


class KVCache:
    """Full K/V per layer, shaped (B, n_kv_heads, max_len, head_dim); ``length`` tokens are filled."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device=None, v_head_dim: int | None = None):
        shape_k = (batch, n_kv_heads, max_len, head_dim)
        shape_v = (batch, n_kv_heads, max_len, v_head_dim or head_dim)
        self.k = [torch.zeros(shape_k, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape_v, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # tokens committed by finished forwards
        self._pending = 0  # tokens written by the forward in progress

    @property
    def n_layers(self) -> int:
        return len(self.k)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, Hkv, T, D) keys/values after the cached ones; return all of them."""
        start, t = self.length, k.shape[2]
        if start + t > self.max_len:
            raise LmzooError(
                f"KV cache is full: {start} cached + {t} new tokens > max_len {self.max_len}"
            )
        self.k[layer][:, :, start:start + t] = k
        self.v[layer][:, :, start:start + t] = v
        self._pending = t
        return self.k[layer][:, :, : start + t], self.v[layer][:, :, : start + t]

    def commit(self) -> None:
        """Called by the model after its last layer: the new tokens become part of the cache."""
        self.length += self._pending
        self._pending = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/reorder batch rows (beam search, dropping finished rows)."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]

    @property
    def nbytes(self) -> int:
        """Bytes held for the filled tokens (what the KV-cache formula counts)."""
        per_token = sum((k.shape[1] * k.shape[3] + v.shape[1] * v.shape[3]) * k.element_size()
                        for k, v in zip(self.k, self.v)) * self.batch
        return per_token * self.length

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype_bytes: int = 2,
                       v_head_dim: int | None = None) -> int:
    """The seed notes' formula for one token: 2·n_kv·d_head·layers (times bytes per value)."""
    return n_layers * n_kv_heads * (head_dim + (v_head_dim or head_dim)) * dtype_bytes
