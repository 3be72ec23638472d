"""KV caches: objects the generation engine owns and hands to the model on every step.

``KVCache`` preallocates K and V for every layer at their final length, so a decode step writes
one slot instead of concatenating (which would copy the whole cache every token). Its ``nbytes``
is the cache memory, exactly: 2 · n_kv_heads · head_dim · n_tokens · layers · bytes per value
(MHA: n_kv_heads = n_heads; MQA: 1; GQA: n_groups).

``LatentCache`` is MLA's cache (DeepSeek-V2): per token only the compressed c_KV and the one RoPE
key all heads share, (d_c + d_h^R) · n_tokens · layers values, whatever the number of heads.

``EncoderDecoderCache`` is an encoder-decoder's: the decoder's ``KVCache`` plus the cross-attention
K/V of the encoder output, computed once per input.
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
        if start + t > self.k[layer].shape[2]:  # the buffer's size, not max_len: a compiled step keeps it symbolic
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

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens and forget the rest (speculative decoding's rejected drafts).
        Nothing is zeroed: a forward reads only ``[:length + new]``, and the next update overwrites the rest.
        Shared by every subclass (``LatentCache``: the latents and RoPE keys are cropped alike)."""
        if not 0 <= length <= self.length:
            raise LmzooError(f"KV cache crop: length {length} is outside 0..{self.length} (the cached tokens)")
        self.length = length
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
    """The formula for one token: 2·n_kv·d_head·layers (times bytes per value)."""
    return n_layers * n_kv_heads * (head_dim + (v_head_dim or head_dim)) * dtype_bytes


class LatentCache(KVCache):
    """MLA's cache: per layer c_KV (B, 1, max_len, kv_lora_rank) and k_rope (B, 1, max_len, rope_dim).

    The storage is a one-head ``KVCache`` whose "K" is the latent c_KV and whose "V" is the RoPE key,
    so update/commit/reorder/nbytes are shared: nbytes = (d_c + d_h^R) · n_tokens · layers · batch · bytes.
    """

    def __init__(self, n_layers: int, batch: int, kv_lora_rank: int, rope_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(n_layers, batch, 1, kv_lora_rank, max_len, dtype=dtype, device=device, v_head_dim=rope_dim)

    def update(self, layer: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, 1, T, d_c) latents and (B, 1, T, d_h^R) RoPE keys; return all cached ones."""
        return super().update(layer, c_kv, k_rope)

    @property
    def c_kv(self) -> list[torch.Tensor]:
        return self.k

    @property
    def k_rope(self) -> list[torch.Tensor]:
        return self.v


class EncoderDecoderCache:
    """An encoder-decoder model's decoding state: the decoder's self-attention ``KVCache``, grown one
    token per step, plus per layer the cross-attention K/V of the encoder output and the encoder's
    padding mask, which are filled on the first decoder forward and then only read.

    Cross K/V cost 2 · n_kv_heads · head_dim per *source* token per layer, once per input, however
    many tokens are generated.
    """

    def __init__(self, self_attn: KVCache):
        self.self_attn = self_attn
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (K, V), (B, Hkv, S, D)
        self.encoder_mask: torch.Tensor | None = None  # (B, S) 1/0, None when nothing is padded

    @property
    def length(self) -> int:
        return self.self_attn.length

    @property
    def batch(self) -> int:
        return self.self_attn.batch

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.self_attn.update(layer, k, v)

    def commit(self) -> None:
        self.self_attn.commit()

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/reorder batch rows (beam search): the decoder's K/V and the source's alike."""
        self.self_attn.reorder(index)
        if self.cross is not None:
            self.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross]
        if self.encoder_mask is not None:
            self.encoder_mask = self.encoder_mask.index_select(0, index)

    @property
    def nbytes(self) -> int:
        cross = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.cross or [])
        return self.self_attn.nbytes + cross
