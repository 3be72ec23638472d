"""ChatGLM2 / ChatGLM3 / GLM-4 configuration, read from either of its two config.json spellings.

1. transformers' ``GlmForCausalLM`` (model_type "glm"): LLaMA-style names plus
   ``rope_parameters.partial_rotary_factor``. Missing fields take ``GlmConfig``'s defaults, which
   are GLM-4-9B's (head_dim 128, 2 KV heads, q/k/v bias on, eps 1.5625e-7), as transformers would.
2. THUDM's own release (model_type "chatglm", ``modeling_chatglm.py`` shipped beside the weights):
   Megatron-style names (num_layers, kv_channels, ffn_hidden_size, multi_query_group_num,
   padded_vocab_size, seq_length, layernorm_epsilon, add_qkv_bias, rope_ratio). ChatGLM-6B v1
   shares the model_type but has ``position_encoding_2d`` and a different architecture: refused.

Both give the same ``ChatGLM2Config``: nothing in it records which spelling it came from.
RoPE is always partial (the first half of each head) and interleaved (pairs (0,1), (2,3), ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmzoo.errors import ConfigError
from lmzoo.interop.hf_config import read_rope, require, write_rope
from lmzoo.models.config_base import DecoderConfig
from lmzoo.nn.position import RopeConfig

_GLM_KNOWN = {"model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
              "rms_norm_eps", "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
              "partial_rotary_factor", "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id",
              "torch_dtype", "dtype", "attention_dropout", "hidden_dropout"}

# transformers' GlmConfig defaults (GLM-4-9B-chat's numbers); a config.json that omits a field means these.
_GLM_DEFAULTS = dict(head_dim=128, num_key_value_heads=2, rms_norm_eps=1.5625e-07, attention_bias=True,
                     max_position_embeddings=131072, partial_rotary_factor=0.5)

# Fields of THUDM's ChatGLMConfig that change only numerics, training or the Python API, never the
# function computed in float32: apply_query_key_layer_scaling divides the scores by the layer number
# and multiplies them back; original_rope is passed to RotaryEmbedding and never read.
_CHATGLM_NUMERICS_ONLY = ("apply_query_key_layer_scaling", "attention_softmax_in_fp32", "fp32_residual_connection",
                          "original_rope", "bias_dropout_fusion")


def is_original_layout(hf: dict | None) -> bool:
    """THUDM's checkpoint layout (transformer.encoder.layers...) rather than GlmForCausalLM's."""
    return bool(hf) and hf.get("model_type") == "chatglm"


def claims(hf: dict) -> bool:
    if hf.get("model_type") == "glm":
        return True
    # ChatGLM-6B (v1) shares model_type "chatglm" but is a different model (2D positions, GeLU,
    # DeepNorm residuals); only its config carries position_encoding_2d.
    return hf.get("model_type") == "chatglm" and "position_encoding_2d" not in hf


@dataclass
class ChatGLM2Config(DecoderConfig):
    family = "chatglm2"
    rope: RopeConfig = field(default_factory=lambda: RopeConfig(rotary_fraction=0.5, interleaved=True))
    act: str = "silu"
    attention_bias: bool = True  # bias on q, k and v only; the output projection and the MLP have none
    # Training-only dropouts, where THUDM's modeling_chatglm.py applies them: attention_dropout on the
    # attention probabilities (CoreAttention; transformers' Glm has this one only), hidden_dropout on
    # each attention / MLP output before it joins the residual (GLMBlock). None on the embeddings.
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.rope.max_positions = self.max_positions

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ChatGLM2Config":
        if hf.get("model_type") == "glm":
            return cls._from_glm(hf, source)
        if hf.get("model_type") == "chatglm":
            return cls._from_chatglm(hf, source)
        raise ConfigError(f"{source}: model_type '{hf.get('model_type')}' is not ChatGLM2's ('glm' or 'chatglm')")

    @classmethod
    def _from_glm(cls, hf: dict, source: str) -> "ChatGLM2Config":
        def get(k):
            return hf[k] if hf.get(k) is not None else _GLM_DEFAULTS[k]

        n_heads = require(hf, "num_attention_heads", source)
        max_pos = get("max_position_embeddings")
        return cls(vocab_size=require(hf, "vocab_size", source), d_model=require(hf, "hidden_size", source),
                   n_layers=require(hf, "num_hidden_layers", source), n_heads=n_heads,
                   n_kv_heads=get("num_key_value_heads"), head_dim=get("head_dim"),
                   d_ff=require(hf, "intermediate_size", source), max_positions=max_pos,
                   norm_eps=get("rms_norm_eps"), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   rope=read_rope(hf, rotary_fraction=_GLM_DEFAULTS["partial_rotary_factor"], interleaved=True,
                                  max_positions=max_pos, source=source),
                   act=hf.get("hidden_act", "silu"), attention_bias=bool(get("attention_bias")),
                   attention_dropout=float(hf.get("attention_dropout", 0.0)),
                   hidden_dropout=float(hf.get("hidden_dropout", 0.0)),  # lmzoo's key: GlmConfig has none
                   hf_extra={k: v for k, v in hf.items() if k not in _GLM_KNOWN}, **cls.common_from_hf(hf))

    @classmethod
    def _from_chatglm(cls, hf: dict, source: str) -> "ChatGLM2Config":
        _refuse_unsupported_chatglm(hf, source)
        d = require(hf, "hidden_size", source)
        n_heads = require(hf, "num_attention_heads", source)
        # multi_query_attention false: every head has its own K/V (and query_key_value is laid out per head).
        n_kv = require(hf, "multi_query_group_num", source) if hf.get("multi_query_attention") else n_heads
        max_pos = int(hf.get("seq_length") or 2048)
        return cls(vocab_size=require(hf, "padded_vocab_size", source), d_model=d,
                   n_layers=require(hf, "num_layers", source), n_heads=n_heads, n_kv_heads=n_kv,
                   head_dim=hf.get("kv_channels") or d // n_heads, d_ff=require(hf, "ffn_hidden_size", source),
                   max_positions=max_pos, norm_eps=float(hf.get("layernorm_epsilon", 1e-5)), tie_embeddings=False,
                   rope=_chatglm_rope(hf, max_pos), act="silu", attention_bias=bool(hf.get("add_qkv_bias", False)),
                   attention_dropout=float(hf.get("attention_dropout", 0.0)),
                   hidden_dropout=float(hf.get("hidden_dropout", 0.0)),
                   **cls.common_from_hf(hf))

    def to_hf(self) -> dict:
        """Always transformers' ``GlmForCausalLM`` spelling, whatever the checkpoint was read from."""
        if not self.rope.interleaved:
            raise ConfigError("chatglm2: GlmForCausalLM always rotates interleaved pairs; "
                              "rope.interleaved must be True")
        # Written even when None: GlmConfig would otherwise fill in GLM-4's ids (pad 151329).
        tokens = {k: getattr(self, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return {**self.hf_extra, "model_type": "glm", "architectures": ["GlmForCausalLM"],
                "vocab_size": self.vocab_size, "hidden_size": self.d_model, "intermediate_size": self.d_ff,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "hidden_act": self.act,
                "max_position_embeddings": self.max_positions, "rms_norm_eps": self.norm_eps,
                "tie_word_embeddings": self.tie_embeddings, "attention_bias": self.attention_bias,
                "attention_dropout": self.attention_dropout, "hidden_dropout": self.hidden_dropout,
                **write_rope(self.rope, with_fraction=True), **tokens, "dtype": self.dtype}


def _refuse_unsupported_chatglm(hf: dict, source: str) -> None:
    if "position_encoding_2d" in hf:
        raise ConfigError(f"{source}: 'position_encoding_2d' marks ChatGLM-6B (v1), whose 2D positions, GeLU MLP and "
                          "DeepNorm residuals are not ChatGLM2's; the chatglm2 family loads ChatGLM2/3 and GLM-4 only")
    bad = [("rmsnorm", False, "LayerNorm instead of RMSNorm"),
           ("post_layer_norm", False, "no final norm"),
           ("apply_residual_connection_post_layernorm", True, "residuals taken after the norm"),
           ("add_bias_linear", True, "biases on the attention output and MLP, which GlmForCausalLM cannot hold")]
    for key, value, what in bad:
        if key in hf and bool(hf[key]) == value:
            raise ConfigError(f"{source}: '{key}': {str(value).lower()} ({what}) is not supported; "
                              f"ChatGLM2/3 and GLM-4 use {str(not value).lower()}")
    if hf.get("pre_seq_len") is not None:
        raise ConfigError(f"{source}: 'pre_seq_len' is {hf['pre_seq_len']}: P-tuning v2 prefix-encoder checkpoints are "
                          "not supported; merge or drop the prefix encoder and set pre_seq_len to null")
    if hf.get("quantization_bit"):
        raise ConfigError(f"{source}: 'quantization_bit' is {hf['quantization_bit']}: THUDM's int4/int8 weight packing "
                          "is not supported; load the float16/bfloat16 release")
    if hf.get("vision_config") is not None:
        raise ConfigError(f"{source}: 'vision_config' is set: GLM-4V's vision tower is not supported")


def _chatglm_rope(hf: dict, max_pos: int) -> RopeConfig:
    ratio = float(hf.get("rope_ratio") or 1.0)
    rope = RopeConfig(theta=10000.0 * ratio, rotary_fraction=0.5, interleaved=True, max_positions=max_pos)
    if ratio != 1.0 and "chatglm2" in str(hf.get("_name_or_path", "")).lower():
        # ChatGLM2-6B-32K's modeling code divides the positions by rope_ratio (position interpolation)
        # where ChatGLM3 and GLM-4 multiply the base by it; dividing positions = "linear" scaling.
        rope = RopeConfig(theta=10000.0, rotary_fraction=0.5, interleaved=True, scaling_type="linear",
                          scaling={"factor": ratio}, max_positions=max_pos)
    return rope


def _chatglm(layers: int, vocab: int, max_pos: int, eps: float, theta: float, **tokens) -> ChatGLM2Config:
    return ChatGLM2Config(vocab_size=vocab, d_model=4096, n_layers=layers, n_heads=32, n_kv_heads=2, head_dim=128,
                          d_ff=13696, max_positions=max_pos, norm_eps=eps, attention_bias=True,
                          rope=RopeConfig(theta=theta, rotary_fraction=0.5, interleaved=True), **tokens)


# Numbers from the published config.json files (THUDM/chatglm2-6b, THUDM/chatglm3-6b, THUDM/glm-4-9b-chat).
PRESETS = {
    "chatglm2-6b": _chatglm(28, 65024, 32768, 1e-5, 10000.0, eos_token_id=2, pad_token_id=0, dtype="float16"),
    "chatglm3-6b": _chatglm(28, 65024, 8192, 1e-5, 10000.0, eos_token_id=2, pad_token_id=0, dtype="float16"),
    "glm-4-9b": _chatglm(40, 151552, 131072, 1.5625e-07, 10000.0 * 500, eos_token_id=[151329, 151336, 151338],
                         pad_token_id=151329, dtype="bfloat16"),
}
