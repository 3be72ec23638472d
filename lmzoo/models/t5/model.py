"""T5 (Raffel et al. 2020) = pre-norm encoder-decoder with no position embeddings at all: a learned
bias per (distance bucket, head) is added to the attention scores, bidirectional buckets in the
encoder and causal ones in the decoder, each computed once per forward and shared by its stack.

diff from the original Transformer: pre-norm instead of post-norm; the norm is RMS-style (no mean
subtraction, no bias, statistics in float32, i.e. ``RMSNorm``); no biases anywhere; attention scores
are not divided by sqrt(head_dim) (the initialisation absorbs it); one embedding matrix shared by
encoder input, decoder input and (v1.0) the head, whose input is then rescaled by d_model**-0.5.
v1.1 swaps the ReLU MLP for GeGLU and unties the head.
diff from BERT (the other encoder here): pre-norm, relative instead of learned absolute positions,
no segment embeddings, and a decoder.
"""

from __future__ import annotations

from torch import nn

from lmzoo.models.t5.config import T5Config
from lmzoo.nn.attention import Attention, CrossAttention
from lmzoo.nn.mlp import MLP, GatedMLP
from lmzoo.nn.norms import RMSNorm
from lmzoo.nn.position import RelativePositionBias
from lmzoo.nn.transformer import CrossDecoderLayer, Encoder, EncoderDecoderLM, TransformerLayer


def build(cfg: T5Config) -> EncoderDecoderLM:
    d = cfg.d_model

    def attn(cls=Attention):
        return cls(d, cfg.n_heads, head_dim=cfg.head_dim, kernel=cfg.attn_kernel, scale=1.0,  # T5: no 1/sqrt(d)
                   dropout=cfg.dropout)

    def mlp():
        kind = GatedMLP if cfg.gated else MLP
        return kind(d, cfg.d_ff, act=cfg.act, bias=False, dropout=cfg.dropout)

    def norm():
        return RMSNorm(d, eps=cfg.norm_eps)

    def bias(bidirectional: bool):
        return RelativePositionBias(cfg.n_heads, cfg.num_buckets, cfg.max_distance, bidirectional=bidirectional)

    p = cfg.dropout
    encoder = Encoder([TransformerLayer(attn(), mlp(), norm(), norm(), placement="pre", dropout=p)
                       for _ in range(cfg.n_layers)],
                      final_norm=norm(), position_bias=bias(True), input_dropout=p, output_dropout=p)
    decoder = [CrossDecoderLayer(attn(), attn(CrossAttention), mlp(), norm(), norm(), norm(), placement="pre",
                                 dropout=p) for _ in range(cfg.n_decoder_layers)]
    return EncoderDecoderLM(cfg, embed=nn.Embedding(cfg.vocab_size, d), encoder=encoder, decoder_layers=decoder,
                            decoder_final_norm=norm(), decoder_position_bias=bias(False),
                            tie_embeddings=cfg.tie_embeddings, head_scale=d ** -0.5 if cfg.scale_head else 1.0,
                            decoder_start_token_id=cfg.decoder_start_token_id,
                            pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0,
                            decoder_dropout=p)
