"""Fields every decoder family's config shares, and their validation.

Family configs are small dataclasses that add only what is theirs (RoPE settings, biases...).
Presets are named instances of them: numbers only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from lmzoo.errors import ConfigError


@dataclass
class DecoderConfig:
    family: ClassVar[str] = ""

    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: = n_heads (MHA)
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 11008
    max_positions: int = 4096
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attn_kernel: str = "sdpa"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # the dtype the checkpoint declares; lmzoo.load may override it
    hf_extra: dict = field(default_factory=dict, repr=False)  # config.json fields carried through untouched

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads <= 0 or self.d_model % self.n_heads:
                raise ConfigError(f"{self.family}: d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads})")
            self.head_dim = self.d_model // self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_positions"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{self.family}: config field '{name}' must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"{self.family}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def special_tokens_hf(self) -> dict:
        return {k: getattr(self, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(self, k) is not None}

    @staticmethod
    def common_from_hf(hf: dict) -> dict:
        return {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None} | {
            "dtype": str(hf.get("dtype") or hf.get("torch_dtype") or "float32")}
