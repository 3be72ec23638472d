"""GPT-2 configuration (transformers' ``GPT2Config`` field names) and the four published sizes."""

from __future__ import annotations

from dataclasses import dataclass

from lmzoo.errors import ConfigError
from lmzoo.interop.hf_config import require
from lmzoo.models.config_base import DecoderConfig
from lmzoo.nn.mlp import ACTIVATIONS

# Fields this config reads; everything else in config.json (dropouts, summary_*, n_ctx, ...) is kept
# in hf_extra and written back untouched.
_KNOWN = {"model_type", "architectures", "vocab_size", "n_embd", "hidden_size", "n_layer", "num_hidden_layers",
          "n_head", "num_attention_heads", "n_positions", "max_position_embeddings", "n_inner",
          "activation_function", "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
          "reorder_and_upcast_attn", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
          "torch_dtype", "dtype", "embd_pdrop", "attn_pdrop", "resid_pdrop"}

GPT2_EOS = 50256  # <|endoftext|>: GPT-2's bos and eos are the same token


def _first(hf: dict, names: tuple[str, ...], source: str):
    # transformers' GPT2Config also accepts the generic spellings (hidden_size, ...) via attribute_map.
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    return require(hf, names[0], source)


@dataclass
class GPT2Config(DecoderConfig):
    family = "gpt2"
    vocab_size: int = 50257
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    max_positions: int = 1024
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    bos_token_id: int | None = GPT2_EOS
    eos_token_id: int | list[int] | None = GPT2_EOS
    act: str = "gelu_new"  # tanh approximation of GeLU
    scale_attn_weights: bool = True  # False: scores are q·k without the 1/sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # scores additionally divided by layer_idx + 1
    reorder_and_upcast_attn: bool = False  # numerics of mixed-precision training only; kept for the round trip
    # Dropouts (training forwards only), where transformers' GPT-2 applies them: embd_pdrop on token +
    # position embeddings, attn_pdrop on the attention probabilities, resid_pdrop on the output of
    # each attention and MLP before it joins the residual. lmzoo's own configs default to none; a
    # config.json without them reads as GPT2Config's 0.1.
    embed_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.n_kv_heads != self.n_heads:
            raise ConfigError(f"gpt2: n_kv_heads ({self.n_kv_heads}) must equal n_heads ({self.n_heads}); "
                              "GPT-2 has no grouped-query attention")
        if self.head_dim * self.n_heads != self.d_model:
            raise ConfigError(f"gpt2: head_dim ({self.head_dim}) · n_heads ({self.n_heads}) must equal "
                              f"d_model ({self.d_model})")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"gpt2: activation_function '{self.act}' is not supported; known: {sorted(ACTIVATIONS)}")

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "GPT2Config":
        if hf.get("add_cross_attention"):
            raise ConfigError(f"{source}: 'add_cross_attention' is true; lmzoo's gpt2 is a plain causal decoder "
                              "without cross-attention layers")
        d = _first(hf, ("n_embd", "hidden_size"), source)
        n_inner = hf.get("n_inner")
        act = hf.get("activation_function") or "gelu_new"
        if act not in ACTIVATIONS:
            raise ConfigError(f"{source}: activation_function '{act}' is not supported; known: {sorted(ACTIVATIONS)}")
        # Missing fields take GPT2Config's defaults so one file means the same model in both libraries.
        tokens = {k: hf.get(k, GPT2_EOS) for k in ("bos_token_id", "eos_token_id")}
        return cls(vocab_size=require(hf, "vocab_size", source), d_model=d,
                   n_layers=_first(hf, ("n_layer", "num_hidden_layers"), source),
                   n_heads=_first(hf, ("n_head", "num_attention_heads"), source),
                   d_ff=n_inner if n_inner is not None else 4 * d,
                   max_positions=hf.get("n_positions") or hf.get("max_position_embeddings") or 1024,
                   norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", True)), act=act,
                   scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
                   scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
                   reorder_and_upcast_attn=bool(hf.get("reorder_and_upcast_attn", False)),
                   embed_dropout=float(hf.get("embd_pdrop", 0.1)), attn_dropout=float(hf.get("attn_pdrop", 0.1)),
                   resid_dropout=float(hf.get("resid_pdrop", 0.1)),
                   hf_extra={k: v for k, v in hf.items() if k not in _KNOWN},
                   **{**cls.common_from_hf(hf), **tokens})

    def to_hf(self) -> dict:
        return {**self.hf_extra, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "vocab_size": self.vocab_size, "n_embd": self.d_model, "n_layer": self.n_layers,
                "n_head": self.n_heads, "n_positions": self.max_positions,
                "n_inner": None if self.d_ff == 4 * self.d_model else self.d_ff,
                "activation_function": self.act, "layer_norm_epsilon": self.norm_eps,
                "scale_attn_weights": self.scale_attn_weights,
                "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
                "reorder_and_upcast_attn": self.reorder_and_upcast_attn,
                "tie_word_embeddings": self.tie_embeddings, "embd_pdrop": self.embed_dropout,
                "attn_pdrop": self.attn_dropout, "resid_pdrop": self.resid_dropout,
                # written even when None: an absent field would read back as GPT2Config's 50256
                "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id, "dtype": self.dtype}


def _gpt2(d: int, layers: int, heads: int) -> GPT2Config:
    return GPT2Config(vocab_size=50257, d_model=d, n_layers=layers, n_heads=heads, d_ff=4 * d, max_positions=1024,
                      norm_eps=1e-5, tie_embeddings=True, dtype="float32",
                      embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)  # the published config.json's


PRESETS = {
    "gpt2": _gpt2(768, 12, 12),  # 124M
    "gpt2-medium": _gpt2(1024, 24, 16),  # 355M
    "gpt2-large": _gpt2(1280, 36, 20),  # 774M
    "gpt2-xl": _gpt2(1600, 48, 25),  # 1.5B
}
