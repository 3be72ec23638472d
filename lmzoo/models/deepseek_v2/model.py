"""DeepSeek-V2 = pre-RMSNorm causal decoder with multi-head latent attention and DeepSeekMoE.

diff from LLaMA:
- attention is MLA (lmzoo/nn/mla.py): K and V come from a 512-wide latent c_KV that is all the
  cache holds, plus one 64-wide RoPE key shared by the heads; queries go through a 1536-wide
  low-rank path (not in the Lite model); RoPE rotates only the rope part, adjacent channels paired;
- the softmax scale is 1/sqrt(d_h + d_h^R) times yarn's mscale(40, 0.707)², since both releases
  extend the context from 4K to 160K with YaRN;
- the MLP of every layer from ``first_k_dense_replace`` on is a DeepSeekMoE block
  (lmzoo/nn/moe.py): 2 shared experts always on, top-6 of 160 (Lite: 64) fine-grained routed ones;
  the first layer keeps a dense SwiGLU MLP;
- training adds α1 · the expert-level balance loss to the LM loss.
"""

from __future__ import annotations

from torch import nn

from lmzoo.models.deepseek_v2.config import DeepseekV2Config
from lmzoo.nn.mla import MLA, mla_softmax_scale
from lmzoo.nn.mlp import GatedMLP
from lmzoo.nn.moe import MoE, Experts, TopKRouter
from lmzoo.nn.norms import RMSNorm
from lmzoo.nn.position import RotaryEmbedding
from lmzoo.nn.transformer import DecoderLM, TransformerLayer


def _mlp(cfg: DeepseekV2Config, i: int) -> nn.Module:
    if not cfg.is_moe_layer(i):
        return GatedMLP(cfg.d_model, cfg.d_ff, act=cfg.act, bias=cfg.mlp_bias)
    router = TopKRouter(cfg.d_model, cfg.n_routed_experts, cfg.top_k, method=cfg.topk_method, n_group=cfg.n_group,
                        topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
                        norm_topk_prob=cfg.norm_topk_prob)
    shared = (GatedMLP(cfg.d_model, cfg.d_expert * cfg.n_shared_experts, act=cfg.act, bias=cfg.mlp_bias)
              if cfg.n_shared_experts else None)
    return MoE(router, Experts(cfg.n_routed_experts, cfg.d_model, cfg.d_expert, act=cfg.act), shared,
               n_shared=cfg.n_shared_experts, seq_aux=cfg.seq_aux)


def build(cfg: DeepseekV2Config) -> DecoderLM:
    rope = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope)
    scale = mla_softmax_scale(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.rope)
    layers = [
        TransformerLayer(
            attn=MLA(cfg.d_model, cfg.n_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                     qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                     v_head_dim=cfg.v_head_dim, rope=rope, bias=cfg.attention_bias,
                     norm_eps=1e-6,  # the latent norms ignore rms_norm_eps (original code and transformers)
                     kernel=cfg.attn_kernel, scale=scale, dropout=cfg.attention_dropout),
            mlp=_mlp(cfg, i),
            attn_norm=RMSNorm(cfg.d_model, cfg.norm_eps),
            mlp_norm=RMSNorm(cfg.d_model, cfg.norm_eps),
        )
        for i in range(cfg.n_layers)
    ]
    return DecoderLM(cfg, embed=nn.Embedding(cfg.vocab_size, cfg.d_model), layers=layers,
                     final_norm=RMSNorm(cfg.d_model, cfg.norm_eps), positions=rope, tie_embeddings=cfg.tie_embeddings,
                     aux_loss_alpha=cfg.aux_loss_alpha)
