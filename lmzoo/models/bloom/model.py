"""Bloom = GPT-style pre-LayerNorm causal decoder with ALiBi instead of positions and a LayerNorm
after the word embeddings.

diff from GPT-2: no position table (ALiBi biases each head's scores by -slope·distance, so there is
no context limit), an extra LayerNorm on the embeddings (BigScience added it for training stability),
Linear layers instead of Conv1D, and q/k/v fused per head in the checkpoint (see convert.py).
diff from LLaMA: LayerNorm instead of RMSNorm, a plain tanh-GeLU MLP of width 4·d instead of SwiGLU,
biases everywhere, a tied head, multi-head attention only.
"""

from __future__ import annotations

from torch import nn

from lmzoo.models.bloom.config import BloomConfig
from lmzoo.nn.attention import Attention
from lmzoo.nn.mlp import MLP
from lmzoo.nn.norms import LayerNorm
from lmzoo.nn.position import ALiBi
from lmzoo.nn.transformer import DecoderLM, TransformerLayer


def build(cfg: BloomConfig) -> DecoderLM:
    d, eps = cfg.d_model, cfg.norm_eps
    layers = [
        TransformerLayer(
            attn=Attention(d, cfg.n_heads, qkv_bias=True, out_bias=True, kernel=cfg.attn_kernel,
                           dropout=cfg.attention_dropout),
            mlp=MLP(d, cfg.d_ff, act="gelu_tanh", bias=True),  # Bloom's gelu is the tanh approximation
            attn_norm=LayerNorm(d, eps=eps),
            mlp_norm=LayerNorm(d, eps=eps),
            dropout=cfg.hidden_dropout,
        )
        for _ in range(cfg.n_layers)
    ]
    # No max_positions: ALiBi extrapolates, so a forward refuses no length; generate still keeps to
    # cfg.max_positions (seq_length, the trained context). The core builds the bias from positions
    # that skip left padding.
    return DecoderLM(cfg, embed=nn.Embedding(cfg.vocab_size, d), layers=layers, final_norm=LayerNorm(d, eps=eps),
                     positions=ALiBi(cfg.n_heads), embed_norm=LayerNorm(d, eps=eps), tie_embeddings=cfg.tie_embeddings)
