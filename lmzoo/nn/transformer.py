"""Transformer layers and the causal-decoder stack every decoder-only family is built from.

A family builds a ``DecoderLM`` by handing it parts: the token embedding, an optional learned
position table or embedding norm, the per-layer attention/MLP/norms, the position encoding that
the attention consumes (RoPE tables or an ALiBi bias), the final norm and the head.

``Encoder`` is the bidirectional stack (BERT, the T5 encoder), ``EncoderDecoderLM`` adds a decoder
whose ``CrossDecoderLayer``s attend to the encoder output (T5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from lmzoo.nn.attention import Attention, AttnInputs, CrossAttention
from lmzoo.nn.kv_cache import EncoderDecoderCache, KVCache
from lmzoo.nn.masks import build_mask, decoder_mask, padding_mask, positions_from_mask, to_additive
from lmzoo.nn.position import ALiBi, LearnedPositions, RelativePositionBias, RotaryEmbedding


class TransformerLayer(nn.Module):
    """One residual block. ``placement='pre'``: x + f(norm(x)) (GPT-2, LLaMA, Bloom, ChatGLM2);
    ``'post'``: norm(x + f(x)) (original Transformer, BERT); ``'deepnorm'``: y = norm(x), then
    α·y + f(y) (GLM-130B, ChatGLM-6B), which is DeepNorm's norm(α·x + f(x)) with each norm moved to
    the start of the next sublayer; the stack's final norm closes the last one."""

    def __init__(self, attn: Attention, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module,
                 placement: str = "pre", alpha: float = 1.0):
        super().__init__()
        if placement not in ("pre", "post", "deepnorm"):
            raise ValueError(f"norm placement must be 'pre', 'post' or 'deepnorm', got '{placement}'")
        if alpha != 1.0 and placement != "deepnorm":
            raise ValueError(f"alpha ({alpha}) scales the residual of placement 'deepnorm' only, not '{placement}'")
        self.attn, self.mlp = attn, mlp
        self.attn_norm, self.mlp_norm = attn_norm, mlp_norm
        self.placement = placement
        self.alpha = alpha

    def forward(self, x: torch.Tensor, inp: AttnInputs, layer_idx: int) -> torch.Tensor:
        if self.placement == "pre":
            x = x + self.attn(self.attn_norm(x), inp, layer_idx)
            return x + self.mlp(self.mlp_norm(x))
        if self.placement == "deepnorm":
            y = self.attn_norm(x)
            y = self.mlp_norm(self.alpha * y + self.attn(y, inp, layer_idx))
            return self.alpha * y + self.mlp(y)
        x = self.attn_norm(x + self.attn(x, inp, layer_idx))
        return self.mlp_norm(x + self.mlp(x))


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # final (normed) hidden states, (B, T, D)
    aux_loss: torch.Tensor | None = None  # MoE balance loss summed over layers (training forwards only)


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
                 tie_embeddings: bool = False, head_bias: bool = False, max_positions: int | None = None,
                 aux_loss_alpha: float = 0.0):
        super().__init__()
        self.config = config
        self.embed = embed
        self.positions, self.embed_norm = positions, embed_norm
        self.rope, self.alibi = rope, alibi
        self.layers = nn.ModuleList(layers)
        self.final_norm = final_norm
        self.tie_embeddings = tie_embeddings
        self.max_positions = max_positions
        self.aux_loss_alpha = aux_loss_alpha  # weight of the MoE layers' aux_loss in .loss (DeepSeek's α1)
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

    def _packed_inputs(self, doc_ids, attention_mask, position_ids, cache, dtype) -> tuple[AttnInputs, torch.Tensor]:
        """Attention inputs for packed documents: the causal same-document mask, positions per document."""
        if cache is not None:
            raise ValueError("doc_ids (packed documents) is for training forwards; it takes no cache")
        T = doc_ids.shape[-1]
        if position_ids is None:  # index minus the index where the token's document starts
            idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
            starts = torch.cat([torch.ones_like(doc_ids[:, :1], dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], 1)
            position_ids = idx - torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=-1).values  # (B, T)
        mask = build_mask("packed", T, doc_ids=doc_ids, attention_mask=attention_mask)  # (B, 1, T, T)
        inp = AttnInputs(mask=mask)
        if self.alibi is not None:  # keys are the queries here, so both sides use the reset positions
            inp.mask = (to_additive(mask, torch.float32) + self.alibi(position_ids, position_ids)).to(dtype)
        if self.rope is not None:
            inp.rope = self.rope(position_ids, dtype)
        return inp, position_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0, doc_ids: torch.Tensor | None = None) -> CausalLMOutput:
        """``logits_to_keep=n`` computes the head for the last n positions only (0 = all); the
        generation engine passes 1, since a prefill needs only the next token's logits.
        ``doc_ids`` (B, T): a packed row of several documents (training, no cache); each token
        attends only to earlier tokens of its own document, and positions restart per document."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T = x.shape[:2]
        past = cache.length if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, expected "
                             f"{past} cached + {T} new = {past + T}")
        if self.max_positions is not None and past + T > self.max_positions and self.positions is not None:
            raise ValueError(f"sequence of {past + T} tokens is longer than the model's context "
                             f"of {self.max_positions}")
        if doc_ids is not None:
            inp, position_ids = self._packed_inputs(doc_ids, attention_mask, position_ids, cache, x.dtype)
        else:
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
        # MoE mlps leave their balance loss in .aux_loss after a training forward (None otherwise)
        aux = [a for a in (getattr(layer.mlp, "aux_loss", None) for layer in self.layers) if a is not None]
        aux_loss = torch.stack(aux).sum() if aux else None
        if loss is not None and aux_loss is not None and self.aux_loss_alpha:
            loss = loss + self.aux_loss_alpha * aux_loss
        return CausalLMOutput(logits=logits, loss=loss, hidden_states=x, aux_loss=aux_loss)

    # -- introspection used by the zoo table and kv-cache accounting ---------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------------
# Encoder and encoder-decoder stacks
# --------------------------------------------------------------------------------------------


def describe_layer(layer: nn.Module) -> dict[str, str]:
    """The zoo table's activation / norm / attention cells for one layer."""
    mlp, a = layer.mlp, layer.attn
    return {"activation": mlp.kind if hasattr(mlp, "kind") else f"{mlp.act_name} MLP",
            "norm": f"{type(layer.attn_norm).__name__} "
                    + (f"(DeepNorm, α={layer.alpha:.2f})" if layer.placement == "deepnorm" else f"({layer.placement}-norm)"),
            "attention": f"{a.kind} ({a.n_heads}q/{a.n_kv_heads}kv)"}


def _bias_and_mask(bias: torch.Tensor | None, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A position bias (1, H, Tq, Tk) and a boolean mask in one additive mask; either may be None."""
    if bias is None:
        return mask
    bias = bias.to(dtype)
    return bias if mask is None else bias + to_additive(mask, dtype)


class Encoder(nn.Module):
    """Bidirectional stack: every token sees every real token of its input; pads are masked as keys.

    Given its layers (pre- or post-norm ``TransformerLayer``s), an optional final norm (pre-norm stacks
    need one; BERT's post-norm stack does not) and an optional relative position bias that is computed
    once here and shared by all layers (T5). Absolute positions, if any, are the embedder's business.
    ``causal=True`` makes each token see only itself and earlier tokens: a cache-less causal stack used as
    an encoder (CLIP's text tower, read at its EOS token).
    """

    def __init__(self, layers: list[TransformerLayer], final_norm: nn.Module | None = None,
                 position_bias: RelativePositionBias | None = None, causal: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.final_norm, self.position_bias = final_norm, position_bias
        self.causal = causal

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        T = x.shape[1]
        if attention_mask is not None and attention_mask.shape[-1] != T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, the input has {T}")
        padded = attention_mask is not None and not bool(attention_mask.all())
        pad = padding_mask(attention_mask) if padded else None
        bias = self.position_bias(T, T) if self.position_bias is not None else None
        if self.causal and (padded or bias is not None):
            pad = decoder_mask(attention_mask if padded else None, T, T, x.device)  # (B|1, 1, T, T) causal & pads
        inp = AttnInputs(mask=_bias_and_mask(bias, pad, x.dtype),  # (B|1, 1|H, T, T) or None
                         is_causal=self.causal and pad is None)
        for i, layer in enumerate(self.layers):
            x = layer(x, inp, i)
        return self.final_norm(x) if self.final_norm is not None else x

    def describe(self) -> dict:
        pb = self.position_bias
        pos = f"relative bias ({pb.num_buckets} buckets, max {pb.max_distance})" if pb is not None else "none"
        return {"position": pos, **describe_layer(self.layers[0]), "layers": len(self.layers)}


class CrossDecoderLayer(nn.Module):
    """Decoder block of an encoder-decoder: causal self-attention, cross-attention over the encoder
    output, MLP, each a residual with its own norm. ``'pre'``: x + f(norm(x)) (T5); ``'post'``:
    norm(x + f(x)) (the original Transformer). diff from ``TransformerLayer``: the middle sublayer."""

    def __init__(self, attn: Attention, cross_attn: CrossAttention, mlp: nn.Module, attn_norm: nn.Module,
                 cross_norm: nn.Module, mlp_norm: nn.Module, placement: str = "pre"):
        super().__init__()
        if placement not in ("pre", "post"):
            raise ValueError(f"norm placement must be 'pre' or 'post', got '{placement}'")
        self.attn, self.cross_attn, self.mlp = attn, cross_attn, mlp
        self.attn_norm, self.cross_norm, self.mlp_norm = attn_norm, cross_norm, mlp_norm
        self.placement = placement

    def forward(self, x: torch.Tensor, inp: AttnInputs, memory_kv: tuple[torch.Tensor, torch.Tensor],
                memory_mask: torch.Tensor | None, layer_idx: int) -> torch.Tensor:
        if self.placement == "pre":
            x = x + self.attn(self.attn_norm(x), inp, layer_idx)
            x = x + self.cross_attn(self.cross_norm(x), memory_kv, memory_mask)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, inp, layer_idx))
        x = self.cross_norm(x + self.cross_attn(x, memory_kv, memory_mask))
        return self.mlp_norm(x + self.mlp(x))


@dataclass
class Seq2SeqLMOutput:
    logits: torch.Tensor  # (B, T_dec, V)
    loss: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None  # (B, S, D); None when read from the cache
    hidden_states: torch.Tensor | None = None  # the decoder's final (normed) hidden states


def shift_right(labels: torch.Tensor, start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Teacher forcing: decoder inputs [start, y0, .., y_{T-2}] from labels [y0, .., y_{T-1}]; the
    ignored label -100 becomes the pad token."""
    start = labels.new_full((labels.shape[0], 1), start_token_id)
    shifted = torch.cat([start, labels[:, :-1]], dim=1)  # (B, T)
    return shifted.masked_fill(shifted == -100, pad_token_id)


class EncoderDecoderLM(nn.Module):
    """Encoder-decoder: embed -> Encoder; embed -> [causal self-attn, cross-attn, MLP] x N -> norm -> head.

    The token embedding is shared by both stacks. ``head_scale`` multiplies the decoder output before
    the head (T5 v1.0 rescales by d_model**-0.5 because its head is the tied embedding). The cross
    K/V are computed from the encoder output once per input and kept in the ``EncoderDecoderCache``;
    later decoder steps need neither ``input_ids`` nor the encoder.
    """

    is_encoder_decoder = True

    def __init__(self, config, *, embed: nn.Embedding, encoder: Encoder, decoder_layers: list[CrossDecoderLayer],
                 decoder_final_norm: nn.Module, decoder_position_bias: RelativePositionBias | None = None,
                 tie_embeddings: bool = False, head_scale: float = 1.0, decoder_start_token_id: int = 0,
                 pad_token_id: int = 0):
        super().__init__()
        self.config = config
        self.embed, self.encoder = embed, encoder
        self.decoder_layers = nn.ModuleList(decoder_layers)
        self.decoder_final_norm, self.decoder_position_bias = decoder_final_norm, decoder_position_bias
        self.head_scale = head_scale
        self.decoder_start_token_id, self.pad_token_id = decoder_start_token_id, pad_token_id
        V, D = embed.weight.shape
        self.lm_head = nn.Linear(D, V, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.embed(input_ids), attention_mask)  # (B, S, D)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> EncoderDecoderCache:
        p = self.embed.weight
        attn = self.decoder_layers[0].attn
        return EncoderDecoderCache(attn.new_cache(len(self.decoder_layers), batch, max_len, dtype or p.dtype,
                                                  device or p.device))

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Decoder self-attention cache per generated token (the cross K/V cost as much per source token)."""
        return sum(layer.attn.kv_bytes_per_token(dtype_bytes) for layer in self.decoder_layers)

    def _memory(self, input_ids, attention_mask, encoder_hidden_states, cache):
        """Per-layer cross K/V and the encoder's padding mask: from the cache, or computed (and cached)."""
        if cache is not None and cache.cross is not None:
            return cache.cross, cache.encoder_mask, None
        if encoder_hidden_states is None:
            if input_ids is None:
                raise ValueError("an encoder-decoder forward needs input_ids (or encoder_hidden_states) "
                                 "unless the cache already holds the encoded input")
            encoder_hidden_states = self.encode(input_ids, attention_mask)
        kvs = [layer.cross_attn.memory_kv(encoder_hidden_states) for layer in self.decoder_layers]
        enc_mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        if cache is not None:
            cache.cross, cache.encoder_mask = kvs, enc_mask
        return kvs, enc_mask, encoder_hidden_states

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                cache: EncoderDecoderCache | None = None, logits_to_keep: int = 0) -> Seq2SeqLMOutput:
        """``labels`` without ``decoder_input_ids``: the decoder reads the labels shifted right, and the
        loss is the cross-entropy of the logits against the labels themselves (-100 is ignored)."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("an encoder-decoder forward needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, self.decoder_start_token_id, self.pad_token_id)
        kvs, enc_mask, enc_out = self._memory(input_ids, attention_mask, encoder_hidden_states, cache)
        cross_mask = padding_mask(enc_mask) if enc_mask is not None else None  # (B, 1, 1, S)
        x = self.embed(decoder_input_ids)  # (B, T, D)
        T = x.shape[1]
        past = cache.length if cache is not None else 0
        if decoder_attention_mask is not None and decoder_attention_mask.shape[-1] != past + T:
            raise ValueError(f"decoder_attention_mask covers {decoder_attention_mask.shape[-1]} tokens, expected "
                             f"{past} cached + {T} new = {past + T}")
        padded = decoder_attention_mask is not None and not bool(decoder_attention_mask.all())
        inp = AttnInputs(cache=cache.self_attn if cache is not None else None)
        bias = self.decoder_position_bias(T, past + T, past) if self.decoder_position_bias is not None else None
        if bias is not None or padded or (past and T > 1):
            causal = decoder_mask(decoder_attention_mask if padded else None, T, past + T, x.device)
            inp.mask = _bias_and_mask(bias, causal, x.dtype)  # (B|1, 1|H, T, past+T)
        else:
            inp.is_causal = T > 1
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, inp, kvs[i], cross_mask, i)
        if cache is not None:
            cache.commit()
        x = self.decoder_final_norm(x)
        h = x[:, -logits_to_keep:] if logits_to_keep else x
        logits = self.lm_head(h * self.head_scale if self.head_scale != 1.0 else h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.to(logits.device).reshape(-1),
                                   ignore_index=-100)
        return Seq2SeqLMOutput(logits=logits, loss=loss, encoder_last_hidden_state=enc_out, hidden_states=x)

    def describe(self) -> dict:
        enc, dec = self.encoder.describe(), describe_layer(self.decoder_layers[0])
        return {**enc, "attention": dec["attention"] + " + cross",
                "layers": f"{len(self.encoder.layers)}+{len(self.decoder_layers)}"}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
