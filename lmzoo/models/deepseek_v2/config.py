"""DeepSeek-V2 configuration (transformers' ``DeepseekV2Config`` and DeepSeek's original release)
and the two published sizes as presets.

Both config.json spellings read the same: transformers 5 writes ``rope_parameters``, the original
release ``rope_theta`` + ``rope_scaling`` {"type": "yarn", ...} plus fields transformers drops
(``moe_layer_freq``, ``scoring_func``, ``aux_loss_alpha``, ``seq_aux``, ``ep_size``, ``auto_map``).
RoPE always pairs adjacent channels (0,1),(2,3).. of the rope part (transformers multiplies them as
complex numbers; the original code permutes them into halves first, the same function up to a
channel order that q and k share).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmzoo.errors import ConfigError
from lmzoo.interop.hf_config import read_rope, require, write_rope
from lmzoo.models.config_base import DecoderConfig
from lmzoo.nn.moe import ROUTINGS
from lmzoo.nn.position import RopeConfig

_KNOWN = {"model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
          "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "qk_head_dim", "hidden_act",
          "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_theta", "rope_scaling",
          "rope_parameters", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
          "torch_dtype", "dtype", "attention_dropout", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
          "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace", "topk_method",
          "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "aux_loss_alpha", "seq_aux",
          "moe_layer_freq", "scoring_func",
          # remote-code loader of the original release: lmzoo.save writes the transformers layout instead
          "auto_map"}


@dataclass
class DeepseekV2Config(DecoderConfig):
    family = "deepseek_v2"
    rope: RopeConfig = field(default_factory=lambda: RopeConfig(interleaved=True))
    act: str = "silu"
    attention_bias: bool = False  # on q_a_proj, kv_a_proj and o_proj only (as transformers)
    attention_dropout: float = 0.0  # on the attention probabilities, transformers' only dropout here
    mlp_bias: bool = False  # dense and shared-expert MLPs only
    # MLA
    q_lora_rank: int | None = 1536  # None: one full-rank q_proj (the Lite model)
    kv_lora_rank: int = 512  # d_c
    qk_nope_head_dim: int = 128  # d_h
    qk_rope_head_dim: int = 64  # d_h^R
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int | None = 160  # None: every layer dense
    n_shared_experts: int = 2
    top_k: int = 6  # num_experts_per_tok
    d_expert: int = 1536  # moe_intermediate_size; the shared experts are n_shared_experts of these fused
    first_k_dense_replace: int = 1  # layers 0..k-1 keep a dense MLP of width d_ff
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    aux_loss_alpha: float = 0.001  # α1 of the expert-level balance loss
    seq_aux: bool = True  # balance loss per sequence (the released models) or per batch

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim  # the q·k width, for reference
        if self.n_kv_heads is not None and self.n_kv_heads != self.n_heads:
            raise ConfigError(f"deepseek_v2: MLA has no K/V head groups; num_key_value_heads ({self.n_kv_heads}) "
                              f"must equal num_attention_heads ({self.n_heads})")
        super().__post_init__()
        self.rope.max_positions = self.max_positions
        if not self.rope.interleaved or self.rope.rotary_fraction != 1.0:
            raise ConfigError("deepseek_v2: RoPE must be interleaved over the whole rope part "
                              f"(interleaved=True, rotary_fraction=1), got {self.rope}")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"deepseek_v2: config field '{name}' must be positive, got {getattr(self, name)}")
        if self.n_routed_experts is not None:
            if self.topk_method not in ROUTINGS:
                raise ConfigError(f"deepseek_v2: topk_method '{self.topk_method}' is not supported; known: "
                                  f"{sorted(ROUTINGS)}")
            if not 0 < self.top_k <= self.n_routed_experts:
                raise ConfigError(f"deepseek_v2: num_experts_per_tok ({self.top_k}) must be in 1..n_routed_experts "
                                  f"({self.n_routed_experts})")
            if self.topk_method == "group_limited_greedy" and (
                    not self.n_group or self.n_routed_experts % self.n_group or not self.topk_group
                    or self.topk_group * (self.n_routed_experts // self.n_group) < self.top_k):
                raise ConfigError(f"deepseek_v2: group_limited_greedy needs n_group ({self.n_group}) dividing "
                                  f"n_routed_experts ({self.n_routed_experts}) and topk_group ({self.topk_group}) "
                                  f"groups holding at least num_experts_per_tok ({self.top_k}) experts")

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts is not None and i >= self.first_k_dense_replace

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "DeepseekV2Config":
        if (hf.get("moe_layer_freq") or 1) != 1:
            raise ConfigError(f"{source}: moe_layer_freq {hf['moe_layer_freq']} is not supported (every released "
                              "DeepSeek-V2 has 1: all layers from first_k_dense_replace on are MoE)")
        if (hf.get("scoring_func") or "softmax") != "softmax":
            raise ConfigError(f"{source}: scoring_func '{hf['scoring_func']}' is not supported; DeepSeek-V2 uses "
                              "'softmax'")
        n_heads = require(hf, "num_attention_heads", source)
        return cls(
            vocab_size=require(hf, "vocab_size", source), d_model=require(hf, "hidden_size", source),
            n_layers=require(hf, "num_hidden_layers", source), n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_ff=require(hf, "intermediate_size", source),
            max_positions=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope=read_rope(hf, interleaved=True, source=source), act=hf.get("hidden_act", "silu"),
            attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
            q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf.get("kv_lora_rank", 512),
            qk_nope_head_dim=hf.get("qk_nope_head_dim", 128), qk_rope_head_dim=hf.get("qk_rope_head_dim", 64),
            v_head_dim=hf.get("v_head_dim", 128), n_routed_experts=hf.get("n_routed_experts"),
            n_shared_experts=hf.get("n_shared_experts") or 0, top_k=hf.get("num_experts_per_tok") or 1,
            d_expert=hf.get("moe_intermediate_size", 1407),
            first_k_dense_replace=hf.get("first_k_dense_replace", 0),
            topk_method=hf.get("topk_method") or "greedy", n_group=hf.get("n_group"),
            topk_group=hf.get("topk_group"), routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            aux_loss_alpha=float(hf.get("aux_loss_alpha", 0.001)), seq_aux=bool(hf.get("seq_aux", True)),
            attention_dropout=float(hf.get("attention_dropout", 0.0)),
            hf_extra={k: v for k, v in hf.items() if k not in _KNOWN}, **cls.common_from_hf(hf))

    def to_hf(self) -> dict:
        moe = {"n_routed_experts": self.n_routed_experts, "num_experts_per_tok": self.top_k,
               "first_k_dense_replace": self.first_k_dense_replace}
        if self.n_routed_experts is None:  # transformers has no "no experts": every layer below first_k is dense
            moe = {"first_k_dense_replace": self.n_layers}
        return {**self.hf_extra, "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"],
                "vocab_size": self.vocab_size, "hidden_size": self.d_model, "intermediate_size": self.d_ff,
                "moe_intermediate_size": self.d_expert, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_heads, "hidden_act": self.act,
                "max_position_embeddings": self.max_positions, "rms_norm_eps": self.norm_eps,
                "tie_word_embeddings": self.tie_embeddings, "attention_bias": self.attention_bias,
                "mlp_bias": self.mlp_bias, "q_lora_rank": self.q_lora_rank, "kv_lora_rank": self.kv_lora_rank,
                "qk_nope_head_dim": self.qk_nope_head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
                "v_head_dim": self.v_head_dim, "n_shared_experts": self.n_shared_experts, **moe,
                "topk_method": self.topk_method, "n_group": self.n_group, "topk_group": self.topk_group,
                "routed_scaling_factor": self.routed_scaling_factor, "norm_topk_prob": self.norm_topk_prob,
                "aux_loss_alpha": self.aux_loss_alpha, "seq_aux": self.seq_aux,
                "attention_dropout": self.attention_dropout,
                **write_rope(self.rope), **self.special_tokens_hf(), "dtype": self.dtype}


# Both releases extend a 4K pretraining context to 128K+ with YaRN (section 3.1.4 of the paper).
_YARN = dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=0.707,
             mscale_all_dim=0.707)


def _preset(**kw) -> DeepseekV2Config:
    return DeepseekV2Config(vocab_size=102400, max_positions=163840, norm_eps=1e-6, kv_lora_rank=512,
                            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=2, top_k=6,
                            first_k_dense_replace=1, aux_loss_alpha=0.001, seq_aux=True,
                            rope=RopeConfig(theta=10000.0, interleaved=True, scaling_type="yarn", scaling=dict(_YARN)),
                            bos_token_id=100000, eos_token_id=100001, dtype="bfloat16", **kw)


PRESETS = {
    # deepseek-ai/DeepSeek-V2: 236B total, 21B activated per token
    "deepseek-v2": _preset(d_model=5120, n_layers=60, n_heads=128, d_ff=12288, d_expert=1536, n_routed_experts=160,
                           q_lora_rank=1536, topk_method="group_limited_greedy", n_group=8, topk_group=3,
                           routed_scaling_factor=16.0),
    # deepseek-ai/DeepSeek-V2-Lite: 15.7B total, 2.4B activated; no low-rank query path
    "deepseek-v2-lite": _preset(d_model=2048, n_layers=27, n_heads=16, d_ff=10944, d_expert=1408, n_routed_experts=64,
                                q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                                routed_scaling_factor=1.0),
}
