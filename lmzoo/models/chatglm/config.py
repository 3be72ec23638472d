"""ChatGLM-6B (v1) configuration, read from and written to THUDM's own ``config.json`` spelling.

The release's config.json (model_type "chatglm", shared with ChatGLM2/3) is told apart by
``position_encoding_2d``: only ChatGLM-6B has it. Megatron-style names: num_layers,
inner_hidden_size, layernorm_epsilon, max_sequence_length. The special tokens drive the model, not
only generation: the prompt ends with ``[gMASK]`` (gmask_token_id) and ``<sop>`` (bos_token_id),
and the model finds its bidirectional prefix and its 2D positions from where they sit.

Fields that ChatGLM-6B's code does not have and lmzoo adds: ``glu_activation: "geglu"`` (GLM-130B's
feed-forward, x1 · gelu(x2) over the two halves of dense_h_to_4h), written only when not the
default; ``deepnorm_layers``, the N of DeepNorm's α = √(2N), always written. THUDM's
modeling_chatglm.py builds every ``GLMBlock`` with its default ``num_layers=28`` (``get_layer``
does not pass ``config.num_layers``), so the release code computes α = √56 at any depth: a
config.json without the field reads as 28, which reproduces the release code's numbers for a
checkpoint of any depth. lmzoo's own configs default to N = n_layers (``deepnorm_layers=None``).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmzoo.errors import ConfigError
from lmzoo.interop.hf_config import require
from lmzoo.models.config_base import DecoderConfig

_KNOWN = {"model_type", "architectures", "vocab_size", "hidden_size", "num_layers", "num_attention_heads",
          "inner_hidden_size", "layernorm_epsilon", "max_sequence_length", "position_encoding_2d",
          "bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "gmask_token_id", "glu_activation",
          "tie_word_embeddings", "pre_seq_len", "prefix_projection", "quantization_bit", "torch_dtype", "dtype",
          "deepnorm_layers"}

RELEASE_ALPHA_LAYERS = 28  # GLMBlock(num_layers=28): the release never passes config.num_layers to it

MLP_KINDS = ("gelu", "geglu")


def claims(hf: dict) -> bool:
    """ChatGLM-6B v1: model_type "chatglm" with position_encoding_2d (ChatGLM2/3 have no such field)."""
    return hf.get("model_type") == "chatglm" and "position_encoding_2d" in hf


@dataclass
class ChatGLMConfig(DecoderConfig):
    family = "chatglm"

    vocab_size: int = 130528
    d_model: int = 4096
    n_layers: int = 28
    n_heads: int = 32
    d_ff: int = 16384
    max_positions: int = 2048
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu": tanh-GeLU MLP (ChatGLM-6B); "geglu": x1 · gelu(x2) (GLM-130B)
    rope_theta: float = 10000.0
    # The original keeps RoPE's inverse frequencies as float16 (RotaryEmbedding(..., precision=half)
    # calls inv_freq.half()), also when the model runs in float32; True reproduces its angles exactly.
    inv_freq_fp16: bool = True
    bos_token_id: int | None = 130004  # <sop>: the first token of the causal (generated) part
    eos_token_id: int | None = 130005  # <eop>
    pad_token_id: int | None = 3
    mask_token_id: int = 130000  # [MASK]: fill in a short blank
    gmask_token_id: int = 130001  # [gMASK]: generate to the end (what chat uses)
    # DeepNorm's N (α = √(2N), init gain β = (2N)^-½); None: n_layers. The release layout reads as 28.
    deepnorm_layers: int | None = None

    @property
    def alpha_layers(self) -> int:
        return self.deepnorm_layers if self.deepnorm_layers is not None else self.n_layers

    def __post_init__(self):
        super().__post_init__()
        if self.mlp not in MLP_KINDS:
            raise ConfigError(f"chatglm: mlp must be one of {MLP_KINDS}, got '{self.mlp}'")
        if self.n_kv_heads != self.n_heads:
            raise ConfigError(f"chatglm: ChatGLM-6B has multi-head attention only (query_key_value holds q, k, v "
                              f"per head); n_kv_heads must equal n_heads ({self.n_heads}), got {self.n_kv_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"chatglm: 2D RoPE rotates two halves of each head with half-split pairs, so head_dim "
                              f"must be a multiple of 4, got {self.head_dim}")
        if self.bos_token_id is None:
            raise ConfigError("chatglm: bos_token_id (<sop>) is required: the model finds its prefix from it")
        n = self.deepnorm_layers
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
            raise ConfigError(f"chatglm: deepnorm_layers (DeepNorm's N) must be a positive integer or None, got {n!r}")

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ChatGLMConfig":
        if not claims(hf):
            raise ConfigError(f"{source}: not a ChatGLM-6B config (needs model_type 'chatglm' and "
                              "'position_encoding_2d')")
        _refuse_unsupported(hf, source)
        d, n_heads = require(hf, "hidden_size", source), require(hf, "num_attention_heads", source)
        return cls(vocab_size=require(hf, "vocab_size", source), d_model=d, n_layers=require(hf, "num_layers", source),
                   n_heads=n_heads, head_dim=d // n_heads, d_ff=hf.get("inner_hidden_size") or 4 * d,
                   max_positions=int(hf.get("max_sequence_length") or 2048),
                   norm_eps=float(hf.get("layernorm_epsilon", 1e-5)),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   mlp=hf.get("glu_activation") or "gelu",
                   bos_token_id=require(hf, "bos_token_id", source), eos_token_id=hf.get("eos_token_id"),
                   pad_token_id=hf.get("pad_token_id"),
                   mask_token_id=int(hf.get("mask_token_id", 130000)),
                   gmask_token_id=int(hf.get("gmask_token_id", 130001)),
                   deepnorm_layers=int(hf.get("deepnorm_layers") or RELEASE_ALPHA_LAYERS),
                   hf_extra={k: v for k, v in hf.items() if k not in _KNOWN},
                   dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"))

    def to_hf(self) -> dict:
        """THUDM's spelling, so that the release's own modeling_chatglm.py reads what lmzoo.save writes."""
        out = {**self.hf_extra, "model_type": "chatglm", "architectures": ["ChatGLMModel"],
               "vocab_size": self.vocab_size, "hidden_size": self.d_model, "num_layers": self.n_layers,
               "num_attention_heads": self.n_heads, "inner_hidden_size": self.d_ff,
               "layernorm_epsilon": self.norm_eps, "max_sequence_length": self.max_positions,
               "position_encoding_2d": True, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
               "pad_token_id": self.pad_token_id, "mask_token_id": self.mask_token_id,
               "gmask_token_id": self.gmask_token_id, "pre_seq_len": None, "prefix_projection": False,
               "quantization_bit": 0, "torch_dtype": self.dtype, "dtype": self.dtype,
               "deepnorm_layers": self.alpha_layers}
        if self.tie_embeddings:
            out["tie_word_embeddings"] = True
        if self.mlp != "gelu":
            out["glu_activation"] = self.mlp
        return out


def _refuse_unsupported(hf: dict, source: str) -> None:
    if hf.get("position_encoding_2d") is False:
        raise ConfigError(f"{source}: 'position_encoding_2d': false (one position id per token) is not supported; "
                          "ChatGLM-6B uses 2D positions (position_encoding_2d: true)")
    if hf.get("pre_seq_len") is not None:
        raise ConfigError(f"{source}: 'pre_seq_len' is {hf['pre_seq_len']}: P-tuning v2 prefix-encoder checkpoints "
                          "are not supported; merge or drop the prefix encoder and set pre_seq_len to null")
    if hf.get("quantization_bit"):
        raise ConfigError(f"{source}: 'quantization_bit' is {hf['quantization_bit']}: THUDM's int4/int8 weight "
                          "packing (chatglm-6b-int4/-int8) is not supported; load the float16 release")
    if hf.get("glu_activation") not in (None, *MLP_KINDS):
        raise ConfigError(f"{source}: 'glu_activation' is '{hf['glu_activation']}'; known: {MLP_KINDS}")
    d, h = require(hf, "hidden_size", source), require(hf, "num_attention_heads", source)
    if d % h:
        raise ConfigError(f"{source}: hidden_size ({d}) is not divisible by num_attention_heads ({h})")


# Numbers from THUDM/chatglm-6b's published config.json (28 layers, hidden 4096, 32 heads,
# inner_hidden_size 16384, vocab 130528, max_sequence_length 2048, eps 1e-5; float16).
PRESETS = {
    "chatglm-6b": ChatGLMConfig(vocab_size=130528, d_model=4096, n_layers=28, n_heads=32, d_ff=16384,
                                max_positions=2048, norm_eps=1e-5, bos_token_id=130004, eos_token_id=130005,
                                pad_token_id=3, mask_token_id=130000, gmask_token_id=130001, dtype="float16"),
}
