"""LLaMA = pre-RMSNorm causal decoder with RoPE, SwiGLU and grouped-query attention.

diff from GPT-2: no learned positions (RoPE rotates q/k instead), RMSNorm instead of LayerNorm,
a gated SiLU MLP, no biases, an untied head (LLaMA-3.2 small sizes tie it), and n_kv_heads < n_heads
from LLaMA-2-70B on.
"""

from __future__ import annotations

from torch import nn

from lmzoo.models.llama.config import LlamaConfig
from lmzoo.nn.attention import Attention
from lmzoo.nn.mlp import GatedMLP
from lmzoo.nn.norms import RMSNorm
from lmzoo.nn.position import RotaryEmbedding
from lmzoo.nn.transformer import DecoderLM, TransformerLayer


def build(cfg: LlamaConfig) -> DecoderLM:
    rope = RotaryEmbedding(cfg.head_dim, cfg.rope)
    layers = [
        TransformerLayer(
            attn=Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, qkv_bias=cfg.attention_bias,
                           out_bias=cfg.attention_bias, rope=rope, kernel=cfg.attn_kernel,
                           dropout=cfg.attention_dropout),
            mlp=GatedMLP(cfg.d_model, cfg.d_ff, act=cfg.act, bias=cfg.mlp_bias),
            attn_norm=RMSNorm(cfg.d_model, cfg.norm_eps),
            mlp_norm=RMSNorm(cfg.d_model, cfg.norm_eps),
        )
        for _ in range(cfg.n_layers)
    ]
    return DecoderLM(cfg, embed=nn.Embedding(cfg.vocab_size, cfg.d_model), layers=layers,
                     final_norm=RMSNorm(cfg.d_model, cfg.norm_eps), positions=rope, tie_embeddings=cfg.tie_embeddings)
