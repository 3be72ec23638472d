"""Transformer layers and the causal-decoder stack every decoder-only family is built from.

A family builds a ``DecoderLM`` by handing it parts: the token embedding, an optional learned
position table or embedding norm, the per-layer attention/MLP/norms, the position encoding that
the attention consumes (RoPE tables or an ALiBi bias), the final norm and the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from lmzoo.nn.attention import Attention, AttnInputs
from lmzoo.nn.kv_cache import KVCache
from lmzoo.nn.masks import decoder_mask, positions_from_mask, to_additive
from lmzoo.nn.position import ALiBi, LearnedPositions, RotaryEmbedding


class TransformerLayer(nn.Module):
    """One residual block. ``placement='pre'``: x + f(norm(x)) (GPT-2, LLaMA, Bloom, ChatGLM2);
    ``'post'``: norm(x + f(x)) (original Transformer, BERT)."""

    def __init__(self, attn: Attention, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module,
                 placement: str = "pre"):
        super().__init__()
        if placement not in ("pre", "post"):
            raise ValueError(f"norm placement must be 'pre' or 'post', got '{placement}'")
        self.attn, self.mlp = attn, mlp
        self.attn_norm, self.mlp_norm = attn_norm, mlp_norm
        self.placement = placement

    def forward(self, x: torch.Tensor, inp: AttnInputs, layer_idx: int) -> torch.Tensor:
        if self.placement == "pre":
            x = x + self.attn(self.attn_norm(x), inp, layer_idx)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, inp, layer_idx))
        return self.mlp_norm(x + self.mlp(x))


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # final (normed) hidden states, (B, T, D)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: logits at t predict labels at t+1; ``ignore_index`` is skipped.

    The labels are shifted, not the logits: slicing (B, T, V) logits would copy all of them (and
    make a full-size zero gradient in backward); the last position gets ``ignore_index`` instead.
    """
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index).to(logits.device)  # (B, T)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shift_labels.reshape(-1),
                           ignore_index=ignore_index)


class DecoderLM(nn.Module):
    """Causal decoder: embed -> [positions] -> [embed norm] -> layers -> norm -> head."""

    def __init__(self, config, *, embed: nn.Embedding, layers: list[TransformerLayer], final_norm: nn.Module,
                 rope: RotaryEmbedding | None = None, alibi: ALiBi | None = None,
                 positions: LearnedPositions | None = None, embed_norm: nn.Module | None = None,
                 tie_embeddings: bool = False, head_bias: bool = False, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.embed = embed
        self.positions, self.embed_norm = positions, embed_norm
        self.rope, self.alibi = rope, alibi
        self.layers = nn.ModuleList(layers)
        self.final_norm = final_norm
        self.tie_embeddings = tie_embeddings
        self.max_positions = max_positions
        V, D = embed.weight.shape
        self.lm_head = nn.Linear(D, V, bias=head_bias)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # -- cache ---------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        p = self.embed.weight
        return self.layers[0].attn.new_cache(len(self.layers), batch, max_len, dtype or p.dtype, device or p.device)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes one token costs across all layers (batch 1)."""
        return sum(layer.attn.kv_bytes_per_token(dtype_bytes) for layer in self.layers)

    # -- forward -------------------------------------------------------------------------------
    def _attn_inputs(self, attention_mask, position_ids, q_len, past, dtype, cache) -> tuple[AttnInputs, torch.Tensor]:
        k_len = past + q_len
        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, -q_len:] if padded else None
            if position_ids is None:
                position_ids = torch.arange(past, k_len, device=self.embed.weight.device)[None]
        inp = AttnInputs(cache=cache)
        if padded or self.alibi is not None:
            inp.mask = decoder_mask(attention_mask if padded else None, q_len, k_len, position_ids.device)
        elif q_len > 1:
            inp.is_causal = past == 0
            if past:
                inp.mask = decoder_mask(None, q_len, k_len, position_ids.device)
        if self.alibi is not None:
            if padded:
                k_pos = positions_from_mask(attention_mask)
            else:
                k_pos = torch.arange(k_len, device=position_ids.device)[None]
            bias = self.alibi(position_ids, k_pos)  # (B, H, Tq, Tk)
            inp.mask = to_additive(inp.mask, torch.float32) + bias
            inp.mask = inp.mask.to(dtype)
        if self.rope is not None:
            inp.rope = self.rope(position_ids, dtype)
        return inp, position_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> CausalLMOutput:
        """``logits_to_keep=n`` computes the head for the last n positions only (0 = all); the
        generation engine passes 1, since a prefill needs only the next token's logits."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T = x.shape[:2]
        past = cache.length if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, expected "
                             f"{past} cached + {T} new = {past + T}")
        if self.max_positions is not None and past + T > self.max_positions and self.positions is not None:
            raise ValueError(f"sequence of {past + T} tokens is longer than the model's context "
                             f"of {self.max_positions}")
        inp, position_ids = self._attn_inputs(attention_mask, position_ids, T, past, x.dtype, cache)
        if self.positions is not None:
            x = x + self.positions(position_ids.expand(B, T))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, inp, i)
        if cache is not None:
            cache.commit()
        x = self.final_norm(x)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss, hidden_states=x)

    # -- introspection used by the zoo table and kv-cache accounting ---------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
