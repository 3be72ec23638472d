"""BERT (Devlin et al. 2019) = post-LayerNorm bidirectional encoder over token + segment + learned
position embeddings, with a LayerNorm on their sum; pretraining heads for masked-LM and
next-sentence prediction, and a tanh pooler over the [CLS] state.

diff from GPT-2: bidirectional attention (pads are masked as keys, nothing else); post-norm,
norm(x + f(x)), so no final norm; segment embeddings and an embedding LayerNorm; exact (erf) GeLU;
the MLM head is a dense + GeLU + LayerNorm transform before the tied decoder, which has its own bias.
diff from T5's encoder: learned absolute positions instead of a relative bias, post- not pre-norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from lmzoo.models.bert.config import BertConfig
from lmzoo.nn.attention import Attention
from lmzoo.nn.mlp import MLP, activation
from lmzoo.nn.norms import LayerNorm
from lmzoo.nn.position import LearnedPositions
from lmzoo.nn.transformer import Encoder, TransformerLayer


@dataclass
class BertOutput:
    last_hidden_state: torch.Tensor  # (B, T, D)
    pooler_output: torch.Tensor | None = None  # (B, D): tanh(W·h[CLS] + b)
    prediction_logits: torch.Tensor | None = None  # (B, T, V), the MLM head
    seq_relationship_logits: torch.Tensor | None = None  # (B, 2), the NSP head: 0 = B follows A
    loss: torch.Tensor | None = None


class MLMHead(nn.Module):
    """logits = LN(act(dense(h))) · Eᵀ + b: a transform, then the decoder tied to the word embedding."""

    def __init__(self, d_model: int, vocab_size: int, act: str, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.act = activation(act)
        self.norm = LayerNorm(d_model, eps=eps)
        self.decoder = nn.Linear(d_model, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(h)))) + self.bias


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as sentence-transformers makes it: the mean of the real tokens' states, (B, D)."""
    m = attention_mask.to(last_hidden_state.dtype)[..., None]  # (B, T, 1)
    return (last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)


class Bert(nn.Module):
    """embed + segment + position -> LayerNorm -> post-norm Encoder -> [pooler] -> [MLM head] [NSP head]."""

    def __init__(self, config: BertConfig, *, embed: nn.Embedding, segment_embed: nn.Embedding,
                 positions: LearnedPositions, embed_norm: nn.Module, encoder: Encoder):
        super().__init__()
        self.config = config
        self.embed, self.segment_embed, self.positions, self.embed_norm = embed, segment_embed, positions, embed_norm
        self.encoder = encoder
        d, V = config.d_model, config.vocab_size
        self.pooler = nn.Linear(d, d) if config.pooler else None
        self.mlm_head = MLMHead(d, V, config.act, config.norm_eps) if config.mlm_head else None
        if self.mlm_head is not None and config.tie_embeddings:
            self.mlm_head.decoder.weight = self.embed.weight
        self.nsp_head = nn.Linear(d, 2) if config.nsp_head else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, next_sentence_label: torch.Tensor | None = None) -> BertOutput:
        """``labels``: MLM targets, -100 where not masked; ``next_sentence_label``: (B,) 0/1. The loss is
        the sum of the two cross-entropies that are given."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]  # right padding: no shift needed
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embed(input_ids) + self.segment_embed(token_type_ids) + self.positions(position_ids.expand(B, T))
        h = self.encoder(self.embed_norm(x), attention_mask)  # (B, T, D)
        out = BertOutput(last_hidden_state=h)
        if self.pooler is not None:
            out.pooler_output = torch.tanh(self.pooler(h[:, 0]))  # (B, D)
        if self.mlm_head is not None:
            out.prediction_logits = self.mlm_head(h)
        if self.nsp_head is not None:
            out.seq_relationship_logits = self.nsp_head(out.pooler_output)
        losses = []
        if labels is not None:
            if out.prediction_logits is None:
                raise ValueError("labels need the MLM head; this BERT was loaded without one")
            losses.append(F.cross_entropy(out.prediction_logits.reshape(-1, self.config.vocab_size).float(),
                                          labels.reshape(-1), ignore_index=-100))
        if next_sentence_label is not None:
            if out.seq_relationship_logits is None:
                raise ValueError("next_sentence_label needs the NSP head; this BERT was loaded without one")
            losses.append(F.cross_entropy(out.seq_relationship_logits.float(), next_sentence_label.reshape(-1)))
        if losses:
            out.loss = sum(losses)
        return out

    # -- introspection used by the zoo table -------------------------------------------------
    def describe(self) -> dict:
        enc = self.encoder.describe()
        heads = [n for n, m in (("MLM", self.mlm_head), ("NSP", self.nsp_head), ("pooler", self.pooler)) if m is not None]
        return {**enc, "position": "learned absolute + segment", "norm": enc["norm"] + " + embedding norm",
                "heads": "+".join(heads) or "none"}

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 0  # an encoder keeps no cache: every forward sees the whole input

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build(cfg: BertConfig) -> Bert:
    d = cfg.d_model
    layers = [
        TransformerLayer(
            attn=Attention(d, cfg.n_heads, qkv_bias=True, out_bias=True, kernel=cfg.attn_kernel,
                           dropout=cfg.attention_dropout),
            mlp=MLP(d, cfg.d_ff, act=cfg.act, bias=True),
            attn_norm=LayerNorm(d, eps=cfg.norm_eps),
            mlp_norm=LayerNorm(d, eps=cfg.norm_eps),
            placement="post",
            dropout=cfg.hidden_dropout,
        )
        for _ in range(cfg.n_layers)
    ]
    return Bert(cfg, embed=nn.Embedding(cfg.vocab_size, d), segment_embed=nn.Embedding(cfg.type_vocab_size, d),
                positions=LearnedPositions(cfg.max_positions, d), embed_norm=LayerNorm(d, eps=cfg.norm_eps),
                encoder=Encoder(layers, input_dropout=cfg.hidden_dropout))
