"""T5 configuration (transformers' ``T5Config`` field names) and the published sizes as presets.

Two flags that transformers has tangled are kept apart here:

- ``tie_embeddings``: the head *is* the shared token embedding (T5 v1.0) or its own matrix (v1.1, mT5, Flan-T5);
- ``scale_head``: the decoder output is multiplied by d_model**-0.5 before the head. v1.0 does this because
  its head is the embedding; v1.1 does not. transformers 4 derived it from ``tie_word_embeddings``;
  transformers 5 writes ``scale_decoder_outputs`` and always writes ``tie_word_embeddings: true``, so
  whether a file has its own head is settled by the checkpoint's keys (``resolve`` in ``__init__.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmzoo.errors import ConfigError
from lmzoo.interop.hf_config import require
from lmzoo.models.config_base import DecoderConfig
from lmzoo.nn.mlp import ACTIVATIONS

_KNOWN = {"model_type", "architectures", "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
          "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
          "feed_forward_proj", "dense_act_fn", "is_gated_act", "tie_word_embeddings", "scale_decoder_outputs",
          "is_encoder_decoder", "decoder_start_token_id", "n_positions", "bos_token_id", "eos_token_id", "dropout_rate",
          "pad_token_id", "torch_dtype", "dtype"}


def parse_ffn(feed_forward_proj: str, source: str = "t5") -> tuple[str, bool]:
    """'relu' -> ('relu', plain MLP); 'gated-gelu' -> ('gelu_new', gated), as transformers reads it."""
    parts = feed_forward_proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated):
        raise ConfigError(f"{source}: feed_forward_proj '{feed_forward_proj}' is not 'ACT' or 'gated-ACT'")
    act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]  # T5 v1.1's GeGLU uses the tanh GeLU
    if act not in ACTIVATIONS:
        raise ConfigError(f"{source}: feed_forward_proj '{feed_forward_proj}': activation '{act}' is not supported; "
                          f"known: {sorted(ACTIVATIONS)}")
    return act, gated


@dataclass
class T5Config(DecoderConfig):
    family = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    n_layers: int = 6  # encoder layers
    n_decoder_layers: int | None = None  # None: as many as the encoder
    n_heads: int = 8
    head_dim: int | None = 64  # d_kv; n_heads · d_kv need not equal d_model
    d_ff: int = 2048
    max_positions: int = 512  # n_positions: the length T5 was trained on; relative positions set no hard limit
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    scale_head: bool = True
    ffn: str = "relu"  # feed_forward_proj: "relu" (v1.0), "gated-gelu" (v1.1)
    num_buckets: int = 32
    max_distance: int = 128
    decoder_start_token_id: int = 0  # T5 starts decoding from the pad token
    # dropout_rate, where transformers' T5 applies it (training only): on the embedded input of each
    # stack, on every sublayer's output before the residual, inside the MLP after the activation, on
    # the attention probabilities (self and cross) and after each stack's final norm. A config.json
    # without it reads as T5Config's 0.1; lmzoo's own configs default to none.
    dropout: float = 0.0
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1

    def __post_init__(self):
        super().__post_init__()
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        for name in ("n_decoder_layers", "num_buckets", "max_distance"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"t5: config field '{name}' must be a positive integer, got {v!r}")
        if self.n_kv_heads != self.n_heads:
            raise ConfigError(f"t5: n_kv_heads ({self.n_kv_heads}) must equal n_heads ({self.n_heads})")
        if self.num_buckets < 4:
            raise ConfigError(f"t5: num_buckets ({self.num_buckets}) must be at least 4 (exact and log-spaced halves)")
        parse_ffn(self.ffn)

    @property
    def act(self) -> str:
        return parse_ffn(self.ffn)[0]

    @property
    def gated(self) -> bool:
        return parse_ffn(self.ffn)[1]

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "T5Config":
        if hf.get("is_encoder_decoder") is False:
            raise ConfigError(f"{source}: 'is_encoder_decoder' is false; lmzoo's t5 is the full encoder-decoder")
        ffn = hf.get("feed_forward_proj") or "relu"
        parse_ffn(ffn, source)
        tie = hf.get("tie_word_embeddings", True) is not False
        scale = hf.get("scale_decoder_outputs")
        return cls(vocab_size=require(hf, "vocab_size", source), d_model=require(hf, "d_model", source),
                   n_layers=require(hf, "num_layers", source), n_decoder_layers=hf.get("num_decoder_layers"),
                   n_heads=require(hf, "num_heads", source), head_dim=require(hf, "d_kv", source),
                   d_ff=require(hf, "d_ff", source), max_positions=hf.get("n_positions") or 512,
                   norm_eps=hf.get("layer_norm_epsilon", 1e-6), tie_embeddings=tie,
                   scale_head=tie if scale is None else bool(scale), ffn=ffn,
                   num_buckets=hf.get("relative_attention_num_buckets", 32),
                   max_distance=hf.get("relative_attention_max_distance", 128),
                   decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
                   dropout=float(hf.get("dropout_rate", 0.1)),
                   hf_extra={k: v for k, v in hf.items() if k not in _KNOWN},
                   **{"pad_token_id": 0, "eos_token_id": 1, **cls.common_from_hf(hf)})

    def to_hf(self) -> dict:
        return {**self.hf_extra, "model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
                "vocab_size": self.vocab_size, "d_model": self.d_model, "d_kv": self.head_dim, "d_ff": self.d_ff,
                "num_layers": self.n_layers, "num_decoder_layers": self.n_decoder_layers, "num_heads": self.n_heads,
                "relative_attention_num_buckets": self.num_buckets,
                "relative_attention_max_distance": self.max_distance, "layer_norm_epsilon": self.norm_eps,
                "feed_forward_proj": self.ffn, "tie_word_embeddings": self.tie_embeddings,
                "scale_decoder_outputs": self.scale_head, "is_encoder_decoder": True,
                "decoder_start_token_id": self.decoder_start_token_id, "n_positions": self.max_positions,
                "dropout_rate": self.dropout,
                **self.special_tokens_hf(), "dtype": self.dtype}


def _t5(d: int, d_ff: int, layers: int, heads: int, v1_1: bool = False) -> T5Config:
    return T5Config(vocab_size=32128, d_model=d, n_layers=layers, n_heads=heads, head_dim=64, d_ff=d_ff,
                    ffn="gated-gelu" if v1_1 else "relu", tie_embeddings=not v1_1, scale_head=not v1_1,
                    dtype="float32", dropout=0.1)  # the published dropout_rate


PRESETS = {
    "t5-small": _t5(512, 2048, 6, 8),  # 60.5M
    "t5-base": _t5(768, 3072, 12, 12),  # 223M
    "t5-large": _t5(1024, 4096, 24, 16),  # 738M
    "t5-v1_1-small": _t5(512, 1024, 8, 6, v1_1=True),  # 77M
    "t5-v1_1-base": _t5(768, 2048, 12, 12, v1_1=True),  # 248M
}
