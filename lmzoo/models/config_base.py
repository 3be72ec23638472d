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
        check_integer_fields(self, self.family)
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


# -- one rule for integer fields ------------------------------------------------------------------
# A field annotated ``int`` takes an integer: not a bool (YAML ``true``), not a float (``64.5``, or
# ``64.0``), not a string (``"64"``). ``int | None`` also takes None, ``int | list[int]`` a list of
# integers. Every config section uses it: the model configs here, ``TrainConfig`` and the ``data``
# and ``tokenizer`` sections of a run config (lmzoo/train/config.py, lmzoo/stages/pretrain.py).


def _annotation_parts(annotation) -> set[str]:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if not isinstance(annotation, str) and " | " in str(annotation):
        text = str(annotation)
    return {part.strip() for part in text.split("|")}


def integer_fields(cls) -> dict[str, set[str]]:
    """{field name: the parts of its annotation} for every dataclass field whose annotation has ``int``."""
    out = {}
    for f in dataclasses.fields(cls):
        parts = _annotation_parts(f.type)
        if "int" in parts:
            out[f.name] = parts
    return out


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_integer(where: str, value, *, allow_none: bool = False, allow_list: bool = False) -> None:
    """``where`` names the field (``data.seq_len``, ``llama.n_layers``) in the one-line error."""
    if is_int(value) or (allow_none and value is None):
        return
    if allow_list and isinstance(value, (list, tuple)) and value and all(is_int(v) for v in value):
        return
    kinds = "an integer" + (" or null" if allow_none else "") + (" or a list of integers" if allow_list else "")
    raise ConfigError(f"{where} must be {kinds}, got {value!r} ({type(value).__name__})")


def check_integer_fields(obj, section: str, values: dict | None = None) -> None:
    """Every integer field of the dataclass ``obj`` (or of ``values``, the fields about to be given to
    it) holds an integer."""
    cls = obj if isinstance(obj, type) else type(obj)
    for name, parts in integer_fields(cls).items():
        if values is not None:
            if name not in values:
                continue
            value = values[name]
        else:
            value = getattr(obj, name)
        check_integer(f"{section}.{name}", value, allow_none="None" in parts,
                      allow_list=any(p.startswith("list[int]") for p in parts))
