"""Bloom configuration (transformers' ``BloomConfig``) and the published BigScience sizes as presets.

Bloom's config.json comes in two spellings: the 176B release writes ``n_embed`` and
``num_attention_heads``, the small releases and transformers itself write ``hidden_size`` and
``n_head``; both read the same. There is no ``max_position_embeddings``: ALiBi has no context limit,
so ``max_positions`` (from ``seq_length``, else 2048, the training length) only sizes caches and the
zoo table. ``pretraining_tp`` and ``slow_but_exact`` only change how transformers sums the output
projections (sliced per tensor-parallel rank); lmzoo computes the same sum unsliced and carries them
through for the round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmzoo.errors import ConfigError
from lmzoo.interop.hf_config import require
from lmzoo.models.config_base import DecoderConfig

_KNOWN = {"model_type", "architectures", "vocab_size", "hidden_size", "n_embed", "n_layer", "num_hidden_layers",
          "n_head", "num_attention_heads", "layer_norm_epsilon", "tie_word_embeddings", "seq_length",
          "apply_residual_connection_post_layernorm", "pretraining_tp", "slow_but_exact",
          "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "hidden_dropout",
          "attention_dropout"}

TRAINED_CONTEXT = 2048  # every BigScience Bloom was trained on 2048-token sequences


def _first(hf: dict, names: tuple[str, ...], source: str):
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    raise ConfigError(f"{source}: required field '{names[0]}' (or '{names[1]}') is missing")


@dataclass
class BloomConfig(DecoderConfig):
    family = "bloom"

    vocab_size: int = 250880
    d_ff: int = 0  # 0: 4·d_model, the only ratio Bloom (and transformers' BloomMLP) has
    max_positions: int = TRAINED_CONTEXT
    tie_embeddings: bool = True
    pretraining_tp: int = 1  # numerics-only, see the module docstring
    slow_but_exact: bool = False
    # transformers' Bloom: hidden_dropout on each attention / MLP output as it joins the residual
    # (dropout_add), attention_dropout on the attention probabilities; none on the embeddings.
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self):
        if not self.d_ff:
            self.d_ff = 4 * self.d_model
        super().__post_init__()
        if self.d_ff != 4 * self.d_model:
            raise ConfigError(f"bloom: d_ff must be 4·d_model = {4 * self.d_model} (transformers' BloomMLP "
                              f"has no other width), got {self.d_ff}")
        if self.n_kv_heads != self.n_heads:
            raise ConfigError(f"bloom: Bloom has multi-head attention only; n_kv_heads must equal n_heads "
                              f"({self.n_heads}), got {self.n_kv_heads}")
        if self.head_dim * self.n_heads != self.d_model:
            raise ConfigError(f"bloom: head_dim must be d_model / n_heads = {self.d_model // self.n_heads}, "
                              f"got {self.head_dim}")

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "BloomConfig":
        if hf.get("apply_residual_connection_post_layernorm"):
            # The residual would be taken after each block's input norm: a block shape lmzoo does not build.
            raise ConfigError(f"{source}: apply_residual_connection_post_layernorm=true is not supported "
                              "(lmzoo's Bloom takes the residual before the norm, as the BigScience releases do)")
        return cls(vocab_size=require(hf, "vocab_size", source),
                   d_model=_first(hf, ("hidden_size", "n_embed"), source),
                   n_layers=_first(hf, ("n_layer", "num_hidden_layers"), source),
                   n_heads=_first(hf, ("n_head", "num_attention_heads"), source),
                   max_positions=int(hf.get("seq_length") or TRAINED_CONTEXT),
                   norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                   pretraining_tp=int(hf.get("pretraining_tp") or 1),
                   slow_but_exact=bool(hf.get("slow_but_exact", False)),
                   hidden_dropout=float(hf.get("hidden_dropout", 0.0)),
                   attention_dropout=float(hf.get("attention_dropout", 0.0)),
                   hf_extra={k: v for k, v in hf.items() if k not in _KNOWN}, **cls.common_from_hf(hf))

    def to_hf(self) -> dict:
        return {**self.hf_extra, "model_type": "bloom", "architectures": ["BloomForCausalLM"],
                "vocab_size": self.vocab_size, "hidden_size": self.d_model, "n_layer": self.n_layers,
                "n_head": self.n_heads, "layer_norm_epsilon": self.norm_eps, "seq_length": self.max_positions,
                "tie_word_embeddings": self.tie_embeddings, "apply_residual_connection_post_layernorm": False,
                "pretraining_tp": self.pretraining_tp, "slow_but_exact": self.slow_but_exact,
                "hidden_dropout": self.hidden_dropout, "attention_dropout": self.attention_dropout,
                **self.special_tokens_hf(), "dtype": self.dtype}


def _bloom(d, layers, heads, tp=1, dtype="float16"):
    return BloomConfig(d_model=d, n_layers=layers, n_heads=heads, norm_eps=1e-5, pretraining_tp=tp,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, dtype=dtype)


PRESETS = {
    "bloom-560m": _bloom(1024, 24, 16),
    "bloom-1b1": _bloom(1536, 24, 16),
    "bloom-1b7": _bloom(2048, 24, 16),
    "bloom-3b": _bloom(2560, 30, 32),
    "bloom-7b1": _bloom(4096, 30, 32),
    "bloom-176b": _bloom(14336, 70, 112, tp=4, dtype="bfloat16"),
}
