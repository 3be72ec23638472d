"""LLaMA-2 / LLaMA-3 configuration and the published sizes as presets."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmzoo.errors import ConfigError
from lmzoo.interop.hf_config import read_rope, require, write_rope
from lmzoo.models.config_base import DecoderConfig
from lmzoo.nn.position import RopeConfig

_KNOWN = {"model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
          "rms_norm_eps", "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
          "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "pretraining_tp",
          "attention_dropout"}


@dataclass
class LlamaConfig(DecoderConfig):
    family = "llama"
    rope: RopeConfig = field(default_factory=RopeConfig)
    act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0  # on the attention probabilities, the only dropout transformers' LLaMA has

    def __post_init__(self):
        super().__post_init__()
        self.rope.max_positions = self.max_positions

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "LlamaConfig":
        n_heads = require(hf, "num_attention_heads", source)
        d = require(hf, "hidden_size", source)
        return cls(vocab_size=require(hf, "vocab_size", source), d_model=d,
                   n_layers=require(hf, "num_hidden_layers", source), n_heads=n_heads,
                   n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim") or d // n_heads,
                   d_ff=require(hf, "intermediate_size", source),
                   max_positions=hf.get("max_position_embeddings", 4096), norm_eps=hf.get("rms_norm_eps", 1e-6),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   rope=read_rope(hf, source=source), act=hf.get("hidden_act", "silu"),
                   attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
                   attention_dropout=float(hf.get("attention_dropout", 0.0)),
                   hf_extra={k: v for k, v in hf.items() if k not in _KNOWN}, **cls.common_from_hf(hf))

    def to_hf(self) -> dict:
        if self.rope.rotary_fraction != 1.0 or self.rope.interleaved:
            raise ConfigError("llama: transformers' LlamaConfig has no partial or interleaved RoPE")
        return {**self.hf_extra, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "vocab_size": self.vocab_size, "hidden_size": self.d_model, "intermediate_size": self.d_ff,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "hidden_act": self.act,
                "max_position_embeddings": self.max_positions, "rms_norm_eps": self.norm_eps,
                "tie_word_embeddings": self.tie_embeddings, "attention_bias": self.attention_bias,
                "mlp_bias": self.mlp_bias, "attention_dropout": self.attention_dropout, **write_rope(self.rope), **self.special_tokens_hf(), "dtype": self.dtype}


def _llama2(d, layers, heads, kv, ff):
    return LlamaConfig(vocab_size=32000, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, d_ff=ff,
                       max_positions=4096, norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
                       bos_token_id=1, eos_token_id=2, dtype="float16")


_LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

PRESETS = {
    "llama2-7b": _llama2(4096, 32, 32, 32, 11008),
    "llama2-13b": _llama2(5120, 40, 40, 40, 13824),
    "llama2-70b": _llama2(8192, 80, 64, 8, 28672),
    "llama3-8b": LlamaConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                             max_positions=8192, norm_eps=1e-5, rope=RopeConfig(theta=500000.0),
                             bos_token_id=128000, eos_token_id=128001, dtype="bfloat16"),
    "llama3.1-8b": LlamaConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                               max_positions=131072, norm_eps=1e-5,
                               rope=RopeConfig(theta=500000.0, scaling_type="llama3", scaling=dict(_LLAMA3_ROPE)),
                               bos_token_id=128000, eos_token_id=128001, dtype="bfloat16"),
    "llama3.2-1b": LlamaConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                               max_positions=131072, norm_eps=1e-5, tie_embeddings=True, head_dim=64,
                               rope=RopeConfig(theta=500000.0, scaling_type="llama3",
                                               scaling=dict(_LLAMA3_ROPE, factor=32.0)),
                               bos_token_id=128000, eos_token_id=128001, dtype="bfloat16"),
}
