"""Multi-head attention in one module: MHA, GQA and MQA are the same code, ``n_kv_heads`` decides.

    n_kv_heads == n_heads      -> MHA (GPT-2, LLaMA-2-7B, Bloom)
    1 < n_kv_heads < n_heads   -> GQA (LLaMA-2-70B, LLaMA-3, ChatGLM2's multi_query_group_num=2)
    n_kv_heads == 1            -> MQA

Each group of n_heads / n_kv_heads query heads shares one K/V head, which shrinks the KV cache by
that ratio. The kernel that computes softmax(q·kᵀ·scale + bias)·v is chosen by name from
``KERNELS``: ``eager`` (written out, float32 softmax), ``sdpa`` (torch's fused kernel), ``flash``
(the flash-attn package, GPU only).

``CrossAttention`` is the encoder-decoder variant: queries from the decoder, keys and values
projected once from the encoder's output.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
import torch.nn.functional as F

from lmzoo.nn.kv_cache import KVCache

if TYPE_CHECKING:  # position.py's schemes build AttnInputs, so it imports this module, not the reverse
    from lmzoo.nn.position import RotaryEmbedding


@dataclass
class AttnInputs:
    """What every layer's attention needs, computed once per model forward."""

    mask: torch.Tensor | None = None  # bool (True = attend) or additive float, (B|1, 1|H, Tq, Tk)
    is_causal: bool = False  # plain causal over equal q/k lengths; mask is None then
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), each (B, 1, T, rotary_dim)
    cache: KVCache | None = None


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv·n_rep, T, D), each K/V head serving n_rep query heads."""
    if n_rep == 1:
        return x
    B, Hkv, T, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, T, D).reshape(B, Hkv * n_rep, T, D)


def _eager(q, k, v, mask, is_causal, scale, dropout_p):
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, v)  # (B, H, Tq, D)


def _sdpa(q, k, v, mask, is_causal, scale, dropout_p):
    gqa = q.shape[1] != k.shape[1]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          dropout_p=dropout_p, scale=scale, enable_gqa=gqa)


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


_FLASH_FALLBACKS_WARNED: set[str] = set()  # each reason is said once per process


def flash_fallback_reasons(q: torch.Tensor, mask: torch.Tensor | None) -> list[str]:
    """Why flash-attn cannot run this call (empty: it can). It takes no arbitrary mask, only
    float16/bfloat16, only CUDA tensors; plain causal (is_causal) and cached decode it does itself."""
    reasons = []
    if mask is not None:
        reasons.append("an explicit attention mask (padding, ALiBi bias, prefix or packed-document mask)")
    if q.device.type != "cuda":
        reasons.append(f"tensors on '{q.device.type}', not CUDA")
    if q.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {q.dtype}, not float16/bfloat16")
    return reasons


def _flash(q, k, v, mask, is_causal, scale, dropout_p):
    reasons = flash_fallback_reasons(q, mask)
    if reasons:  # run this call with sdpa, and say so (once per reason)
        for r in reasons:
            if r not in _FLASH_FALLBACKS_WARNED:
                _FLASH_FALLBACKS_WARNED.add(r)
                warnings.warn(f"attn_kernel 'flash' was asked for but runs sdpa instead: {r}", stacklevel=3)
        return _sdpa(q, k, v, mask, is_causal, scale, dropout_p)
    from flash_attn import flash_attn_func

    # flash-attn wants (B, T, H, D); it handles GQA itself and aligns causal to the key end.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                          softmax_scale=scale, causal=is_causal or q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


Kernel = Callable[..., torch.Tensor]
KERNELS: dict[str, Kernel] = {"eager": _eager, "sdpa": _sdpa, "flash": _flash}


def get_kernel(name: str) -> Kernel:
    if name not in KERNELS:
        raise ValueError(f"attn_kernel '{name}' is unknown; known: {sorted(KERNELS)}")
    if name == "flash" and not flash_available():
        raise ValueError("attn_kernel 'flash' needs the flash-attn package and a CUDA GPU; use 'sdpa'")
    return KERNELS[name]


class Attention(nn.Module):
    """Self-attention given its projections' shapes, its position encoding and its kernel."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 *, qkv_bias: bool = False, out_bias: bool = False, rope: RotaryEmbedding | None = None,
                 kernel: str = "sdpa", dropout: float = 0.0, scale: float | None = None):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        head_dim = head_dim or d_model // n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if rope is not None and rope.rotary_dim > head_dim:
            raise ValueError(f"rope rotary_dim ({rope.rotary_dim}) is wider than head_dim ({head_dim})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)
        # A plain attribute, not a submodule: the model owns the one RoPE table all layers share.
        self.__dict__["rope"] = rope
        self.kernel_name = kernel
        self.kernel = get_kernel(kernel)
        self.dropout = dropout
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)

    @property
    def kind(self) -> str:
        if self.n_kv_heads == self.n_heads:
            return "MHA"
        # GQA-G is named by its G groups, one per K/V head (Ainslie et al. 2023), not by the query heads per group
        return "MQA" if self.n_kv_heads == 1 else f"GQA-{self.n_kv_heads}"

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """This layer's cache per token: K and V, n_kv_heads · head_dim each."""
        return 2 * self.n_kv_heads * self.head_dim * dtype_bytes

    def new_cache(self, n_layers: int, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        """The cache this kind of attention fills (other attentions, e.g. MLA, bring their own)."""
        return KVCache(n_layers, batch, self.n_kv_heads, self.head_dim, max_len, dtype=dtype, device=device)

    def set_kernel(self, name: str) -> None:
        self.kernel, self.kernel_name = get_kernel(name), name

    def forward(self, x: torch.Tensor, inp: AttnInputs, layer_idx: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        if "qkv_fused" in self._modules:  # lmzoo.generate.fastpath: one matmul, split into q, k, v
            q, k, v = self.qkv_fused(x).split([self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                                               self.n_kv_heads * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.rope is not None:
            cos, sin = inp.rope
            q, k = self.rope.rotate(q, cos, sin), self.rope.rotate(k, cos, sin)
        if inp.cache is not None:
            k, v = inp.cache.update(layer_idx, k, v)  # (B, Hkv, Tpast+T, D)
        p = self.dropout if self.training else 0.0
        out = self.kernel(q, k, v, inp.mask, inp.is_causal, self.scale, p)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class CrossAttention(Attention):
    """Encoder-decoder attention: queries from the decoder, keys and values from the encoder output.

    diff from ``Attention``: K/V are projected from the encoder's output ("memory") by
    ``memory_kv``, once per input, and reused at every decoding step (the cache keeps them; see
    ``EncoderDecoderCache``); no position encoding (the source positions were encoded already) and no
    causal mask, only the encoder's padding.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None, *,
                 qkv_bias: bool = False, out_bias: bool = False, kernel: str = "sdpa", dropout: float = 0.0,
                 scale: float | None = None):
        super().__init__(d_model, n_heads, n_kv_heads, head_dim, qkv_bias=qkv_bias, out_bias=out_bias,
                         rope=None, kernel=kernel, dropout=dropout, scale=scale)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, D) encoder output -> K and V, each (B, Hkv, S, head_dim)."""
        B, S, _ = memory.shape
        k = self.k_proj(memory).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.v_proj(memory).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: the encoder's padding, boolean (B, 1, 1, S) or additive; None when nothing is padded."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k, v = kv
        p = self.dropout if self.training else 0.0
        # _flash reads unequal q/k lengths as a cached causal decode; cross-attention is never causal.
        kernel = _sdpa if self.kernel is _flash else self.kernel
        out = kernel(q, k, v, mask, False, self.scale, p)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
