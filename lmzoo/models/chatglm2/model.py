"""ChatGLM2 = LLaMA-like pre-RMSNorm decoder with SwiGLU and grouped-query attention (ChatGLM2/3, GLM-4).

diff from LLaMA:
- partial RoPE: only the first half of each head rotates (rotary_dim = head_dim / 2), the rest
  passes through unchanged;
- the rotated half pairs adjacent channels (0,1), (2,3), ... (GPT-J's interleaved layout), where
  LLaMA pairs channel i with i + d/2;
- "multi-query" attention with multi_query_group_num K/V heads (2 in every release: GQA-2);
- a bias on q, k and v but none on the output projection or the MLP;
- the head is never tied; GLM-4-9B's RMSNorm eps is 1.5625e-7.
"""

from __future__ import annotations

from torch import nn

from lmzoo.models.chatglm2.config import ChatGLM2Config
from lmzoo.nn.attention import Attention
from lmzoo.nn.mlp import GatedMLP
from lmzoo.nn.norms import RMSNorm
from lmzoo.nn.position import RotaryEmbedding
from lmzoo.nn.transformer import DecoderLM, TransformerLayer


def build(cfg: ChatGLM2Config) -> DecoderLM:
    rope = RotaryEmbedding(cfg.head_dim, cfg.rope)  # rope.rotary_fraction 0.5, rope.interleaved True
    layers = [
        TransformerLayer(
            attn=Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, qkv_bias=cfg.attention_bias,
                           out_bias=False, rope=rope, kernel=cfg.attn_kernel,
                           dropout=cfg.attention_dropout),
            mlp=GatedMLP(cfg.d_model, cfg.d_ff, act=cfg.act, bias=False),
            attn_norm=RMSNorm(cfg.d_model, cfg.norm_eps),
            mlp_norm=RMSNorm(cfg.d_model, cfg.norm_eps),
            dropout=cfg.hidden_dropout,
        )
        for _ in range(cfg.n_layers)
    ]
    return DecoderLM(cfg, embed=nn.Embedding(cfg.vocab_size, cfg.d_model), layers=layers,
                     final_norm=RMSNorm(cfg.d_model, cfg.norm_eps), positions=rope, tie_embeddings=cfg.tie_embeddings)
