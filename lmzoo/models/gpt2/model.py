"""GPT-2 = pre-LayerNorm causal decoder with learned absolute positions and a plain GeLU MLP.

diff from LLaMA: positions are a learned table added to the token embeddings (no RoPE), LayerNorm
with bias instead of RMSNorm, a two-layer MLP (gelu_new, the tanh approximation) instead of SwiGLU,
biases on every projection, full multi-head attention, and the head tied to the token embedding.
The context is hard-capped at n_positions: past it there is no learned position to add.
Neighbour: Bloom has the same block but ALiBi instead of learned positions and a norm after the embedding.
"""

from __future__ import annotations

import math

from torch import nn

from lmzoo.models.gpt2.config import GPT2Config
from lmzoo.nn.attention import Attention
from lmzoo.nn.mlp import MLP
from lmzoo.nn.norms import LayerNorm
from lmzoo.nn.position import LearnedPositions
from lmzoo.nn.transformer import DecoderLM, TransformerLayer


def attn_scale(cfg: GPT2Config, layer_idx: int) -> float:
    """softmax scale of layer ``layer_idx``: 1/sqrt(head_dim) unless scale_attn_weights is off,
    divided by layer_idx + 1 with scale_attn_by_inverse_layer_idx (Mistral/Stanford CRFM's stability trick)."""
    scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
        scale /= float(layer_idx + 1)
    return scale


def build(cfg: GPT2Config) -> DecoderLM:
    d = cfg.d_model
    layers = [
        TransformerLayer(
            attn=Attention(d, cfg.n_heads, qkv_bias=True, out_bias=True, kernel=cfg.attn_kernel,
                           scale=attn_scale(cfg, i), dropout=cfg.attn_dropout),
            mlp=MLP(d, cfg.d_ff, act=cfg.act, bias=True),
            attn_norm=LayerNorm(d, eps=cfg.norm_eps),
            mlp_norm=LayerNorm(d, eps=cfg.norm_eps),
            dropout=cfg.resid_dropout,
        )
        for i in range(cfg.n_layers)
    ]
    return DecoderLM(cfg, embed=nn.Embedding(cfg.vocab_size, d), layers=layers,
                     final_norm=LayerNorm(d, eps=cfg.norm_eps), positions=LearnedPositions(cfg.max_positions, d),
                     tie_embeddings=cfg.tie_embeddings, embed_dropout=cfg.embed_dropout)
