"""Multi-head latent attention (MLA, DeepSeek-V2 section 2.1): low-rank joint KV compression.

Per token t (d = d_model, n_h heads, d_c = kv_lora_rank, d_h = qk_nope_head_dim, d_h^R = qk_rope_head_dim):

    c_KV = RMSNorm(W_DKV · h_t)                      (d_c)       eq. 9   kv_a_proj -> kv_a_norm
    k_C  = W_UK · c_KV,  v_C = W_UV · c_KV            (n_h·d_h)   eq. 10-11  kv_b_proj, rows per head [k | v]
    k_R  = RoPE(W_KR · h_t)                           (d_h^R)     eq. 17  one key shared by all heads
    c_Q  = RMSNorm(W_DQ · h_t), q_C = W_UQ · c_Q,  q_R = RoPE(W_QR · c_Q)   eq. 12-13, 16 (or one q_proj)
    o_h  = softmax((q_C,h·k_C,h + q_R,h·k_R) · scale) · v_C,h                eq. 18-19

Only c_KV and k_R are cached: (d_c + d_h^R) values per token and layer, whatever n_h is.

Two equal ways to compute it (``mode``):
- ``naive``: expand the cached latents to per-head keys and values with kv_b_proj, then ordinary
  attention (what training and transformers do);
- ``absorbed``: W_UK is folded into the query (q_C·W_UKᵀ lives in the latent space) and W_UV is
  applied after the attention-weighted sum of latents, so attention runs as MQA over the cached
  (c_KV | k_R) with width d_c + d_h^R and the cache is never expanded. This is why the RoPE key
  must be decoupled: RoPE(W_UK·c) = R_t·W_UK·c puts a position-dependent R_t between q and W_UK, so
  W_UK could not be folded into a fixed query projection (section 2.1.3).
``auto`` (default) uses ``absorbed`` for decode steps (a cache holding earlier tokens: one new
query against many cached latents, where expanding them all every step is the waste MLA avoids) and
``naive`` for training and prefill (as many queries as keys, where the narrower per-head product is
cheaper: d_h + d_h^R = 192 against d_c + d_h^R = 576 in DeepSeek-V2).

diff from ``Attention``: q and k are (nope | rope) concatenations of width d_h + d_h^R, values are
v_head_dim wide, RoPE touches only the rope part, and the softmax scale carries yarn's mscale².
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from lmzoo.nn.attention import AttnInputs, get_kernel
from lmzoo.nn.kv_cache import LatentCache
from lmzoo.nn.norms import RMSNorm
from lmzoo.nn.position import RopeConfig, RotaryEmbedding, yarn_mscale

MODES = ("auto", "naive", "absorbed")


def mla_softmax_scale(qk_head_dim: int, rope: RopeConfig) -> float:
    """1/sqrt(d_h + d_h^R), times mscale(factor, mscale_all_dim)² when the rope is scaled (DeepSeek's
    yarn correction: the logits are rescaled as a whole, not only through the rotated part)."""
    scale = qk_head_dim ** -0.5
    m_all = rope.scaling.get("mscale_all_dim") if rope.scaling_type != "default" else None
    if m_all:
        m = yarn_mscale(float(rope.scaling["factor"]), float(m_all))
        scale *= m * m
    return scale


class MLA(nn.Module):
    """Multi-head latent attention given its ranks, head widths, RoPE table and kernel."""

    def __init__(self, d_model: int, n_heads: int, *, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, q_lora_rank: int | None = None,
                 rope: RotaryEmbedding, bias: bool = False, norm_eps: float = 1e-6, kernel: str = "sdpa",
                 dropout: float = 0.0, scale: float | None = None, mode: str = "auto"):
        super().__init__()
        if rope is None or rope.rotary_dim != qk_rope_head_dim:
            raise ValueError(f"MLA needs a RotaryEmbedding of rotary_dim qk_rope_head_dim ({qk_rope_head_dim}), "
                             f"got {None if rope is None else rope.rotary_dim}")
        if mode not in MODES:
            raise ValueError(f"MLA mode '{mode}' is unknown; known: {list(MODES)}")
        self.n_heads, self.kv_lora_rank, self.q_lora_rank = n_heads, kv_lora_rank, q_lora_rank
        self.nope_dim, self.rope_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        q_out = n_heads * self.qk_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, q_out, bias=False)
        else:  # eq. 12-13: a low-rank query path, normed in the middle
            self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=bias)
            self.q_a_norm = RMSNorm(q_lora_rank, norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, q_out, bias=False)
        # W_DKV and W_KR in one matrix: rows [c_KV (d_c) | k_R (d_h^R)]
        self.kv_a_proj = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_norm = RMSNorm(kv_lora_rank, norm_eps)
        # W_UK and W_UV in one matrix: rows per head [k_C,h (d_h) | v_C,h (d_v)]
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * v_head_dim, d_model, bias=bias)
        self.__dict__["rope"] = rope  # the model owns the one RoPE table all layers share
        self.set_kernel(kernel)
        self.dropout = dropout
        self.scale = scale if scale is not None else 1.0 / math.sqrt(self.qk_head_dim)
        self.mode = mode

    @property
    def kind(self) -> str:
        return f"MLA (d_c {self.kv_lora_rank} + {self.rope_dim} rope)"

    def set_kernel(self, name: str) -> None:
        self.kernel, self.kernel_name = get_kernel(name), name

    # -- cache ---------------------------------------------------------------------------------
    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """This layer's cache per token: c_KV and the shared RoPE key, (d_c + d_h^R) values."""
        return (self.kv_lora_rank + self.rope_dim) * dtype_bytes

    def new_cache(self, n_layers: int, batch: int, max_len: int, dtype: torch.dtype, device) -> LatentCache:
        return LatentCache(n_layers, batch, self.kv_lora_rank, self.rope_dim, max_len, dtype=dtype, device=device)

    # -- forward -------------------------------------------------------------------------------
    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        return q.view(B, T, self.n_heads, self.qk_head_dim).transpose(1, 2)  # (B, H, T, d_h + d_h^R)

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight
        lora = getattr(self.kv_b_proj, "lora", None)
        if lora is not None and not lora.merged:  # an unmerged LoRA adapter (lmzoo/peft): W + s·BA, as forward() sees it
            w = w + lora.delta_weight().to(w.dtype)
        w = w.view(self.n_heads, self.nope_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim:]  # (H, d_h, d_c), (H, d_v, d_c)

    def forward(self, x: torch.Tensor, inp: AttnInputs, layer_idx: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_rope = self._queries(x).split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)  # (B, T, d_c), (B, T, d_R)
        c_kv = self.kv_a_norm(c_kv)[:, None]  # (B, 1, T, d_c)
        k_rope = k_rope[:, None]  # (B, 1, T, d_R): one RoPE key for all heads
        cos, sin = inp.rope
        # diff from LLaMA: RoPE pairs channels (0,1),(2,3).. of the rope part only (DeepSeek's layout).
        q_rope, k_rope = self.rope.rotate(q_rope, cos, sin), self.rope.rotate(k_rope, cos, sin)
        if inp.cache is not None:
            c_kv, k_rope = inp.cache.update(layer_idx, c_kv, k_rope)  # (B, 1, Tk, d_c), (B, 1, Tk, d_R)
        decoding = inp.cache is not None and c_kv.shape[2] > T  # earlier tokens are cached
        absorbed = self.mode == "absorbed" or (self.mode == "auto" and decoding)
        p = self.dropout if self.training else 0.0
        if absorbed:
            out = self._absorbed(q_nope, q_rope, c_kv, k_rope, inp, p)
        else:
            out = self._naive(q_nope, q_rope, c_kv, k_rope, inp, p)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim))

    def _naive(self, q_nope, q_rope, c_kv, k_rope, inp: AttnInputs, p: float) -> torch.Tensor:
        B, _, Tk, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv[:, 0]).view(B, Tk, self.n_heads, self.nope_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_head_dim], dim=-1)  # (B, H, Tk, d_h), (B, H, Tk, d_v)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, d_h + d_R)
        k = torch.cat([k_nope, k_rope.expand(B, self.n_heads, Tk, self.rope_dim)], dim=-1)  # (B, H, Tk, d_h + d_R)
        pad = self.qk_head_dim - self.v_head_dim if self.kernel_name == "flash" else 0
        if pad > 0:  # flash-attn wants one head width for q, k and v: zero columns change nothing
            v = F.pad(v, (0, pad))
        out = self.kernel(q, k, v, inp.mask, inp.is_causal, self.scale, p)  # (B, H, T, d_v [+ pad])
        return out[..., : self.v_head_dim]

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, inp: AttnInputs, p: float) -> torch.Tensor:
        w_uk, w_uv = self._w_uk_uv()
        # q_C,h · k_C,h = q_C,h · (W_UK,h c) = (W_UK,hᵀ q_C,h) · c: the query moves into latent space.
        q_lat = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk)  # (B, H, T, d_c)
        q = torch.cat([q_lat, q_rope], dim=-1)  # (B, H, T, d_c + d_R)
        k = torch.cat([c_kv, k_rope], dim=-1)  # (B, 1, Tk, d_c + d_R): MQA, one shared "head"
        # flash-attn handles no head wider than 256, so the latent path runs on sdpa there.
        kernel = self.kernel if self.kernel_name != "flash" else get_kernel("sdpa")
        out_lat = kernel(q, k, c_kv, inp.mask, inp.is_causal, self.scale, p)  # (B, H, T, d_c)
        return torch.einsum("bhtc,hvc->bhtv", out_lat, w_uv)  # (B, H, T, d_v): W_UV after the sum
