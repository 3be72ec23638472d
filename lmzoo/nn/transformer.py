"""Transformer layers and the causal-decoder stack every decoder-only family is built from.

A family builds a ``DecoderLM`` by handing it parts: the token embedding, its position part (a
``layout.PositionScheme``: a learned table, RoPE, ALiBi, GLM's 2D positions with a prefix mask...),
an optional embedding norm, the per-layer attention/MLP/norms, the final norm and the head.

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
from lmzoo.nn.layout import NoPositions, PositionScheme, Step
from lmzoo.nn.masks import decoder_mask, padding_mask, to_additive
from lmzoo.nn.position import RelativePositionBias


class TransformerLayer(nn.Module):
    """One residual block. ``placement='pre'``: x + f(norm(x)) (GPT-2, LLaMA, Bloom, ChatGLM2);
    ``'post'``: norm(x + f(x)) (original Transformer, BERT); ``'deepnorm'``: y = norm(x), then
    α·y + f(y) (GLM-130B, ChatGLM-6B), which is DeepNorm's norm(α·x + f(x)) with each norm moved to
    the start of the next sublayer; the stack's final norm closes the last one.

    ``dropout``: residual dropout, on each sublayer's output f(·) before it joins the residual
    (GPT-2's resid_pdrop, Bloom's and ChatGLM2's hidden_dropout, BERT's and ViT's hidden dropout);
    training forwards only."""

    def __init__(self, attn: Attention, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module,
                 placement: str = "pre", alpha: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if placement not in ("pre", "post", "deepnorm"):
            raise ValueError(f"norm placement must be 'pre', 'post' or 'deepnorm', got '{placement}'")
        if alpha != 1.0 and placement != "deepnorm":
            raise ValueError(f"alpha ({alpha}) scales the residual of placement 'deepnorm' only, not '{placement}'")
        self.attn, self.mlp = attn, mlp
        self.attn_norm, self.mlp_norm = attn_norm, mlp_norm
        self.placement = placement
        self.alpha = alpha
        self.dropout = check_dropout(dropout, "dropout")

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        return _dropout(h, self.dropout, self.training)

    def forward(self, x: torch.Tensor, inp: AttnInputs, layer_idx: int) -> torch.Tensor:
        f = self._drop
        if self.placement == "pre":
            x = x + f(self.attn(self.attn_norm(x), inp, layer_idx))
            return x + f(self.mlp(self.mlp_norm(x)))
        if self.placement == "deepnorm":
            y = self.attn_norm(x)
            y = self.mlp_norm(self.alpha * y + f(self.attn(y, inp, layer_idx)))
            return self.alpha * y + f(self.mlp(y))
        x = self.attn_norm(x + f(self.attn(x, inp, layer_idx)))
        return self.mlp_norm(x + f(self.mlp(x)))


def check_dropout(p: float, name: str) -> float:
    """A dropout probability in [0, 1], or a ValueError naming the field."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training=True) if p and training else x


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # (B, T, V); None after a forward with loss_chunk
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
    """Causal decoder: embed -> [positions] -> [embed norm] -> layers -> norm -> head.

    ``positions`` is the stack's one position part (``layout.PositionScheme``): it builds every
    layer's attention inputs, adds what it adds to the embeddings and makes the cache, so the
    forward below is the same for learned, RoPE, ALiBi, GLM's 2D positions or any new scheme.
    """

    def __init__(self, config, *, embed: nn.Embedding, layers: list[TransformerLayer], final_norm: nn.Module,
                 positions: PositionScheme | None = None, embed_norm: nn.Module | None = None,
                 tie_embeddings: bool = False, head_bias: bool = False, aux_loss_alpha: float = 0.0,
                 embed_dropout: float = 0.0):
        super().__init__()
        self.config = config
        self.embed = embed
        self.positions = positions if positions is not None else NoPositions()
        self.embed_norm = embed_norm
        self.layers = nn.ModuleList(layers)
        self.final_norm = final_norm
        self.tie_embeddings = tie_embeddings
        self.aux_loss_alpha = aux_loss_alpha  # weight of the MoE layers' aux_loss in .loss (DeepSeek's α1)
        self.embed_dropout = check_dropout(embed_dropout, "embed_dropout")  # GPT-2's embd_pdrop, on tokens + positions
        V, D = embed.weight.shape
        self.lm_head = nn.Linear(D, V, bias=head_bias)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def max_positions(self) -> int | None:
        """The hard context limit a forward enforces (the position part's; None: no limit)."""
        return self.positions.max_positions

    # -- cache ---------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        p = self.embed.weight
        return self.positions.new_cache(self.layers[0].attn, len(self.layers), batch, max_len, dtype or p.dtype,
                                        device or p.device)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes one token costs across all layers (batch 1)."""
        return sum(layer.attn.kv_bytes_per_token(dtype_bytes) for layer in self.layers)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0, doc_ids: torch.Tensor | None = None, loss_chunk: int = 0) -> CausalLMOutput:
        """``logits_to_keep=n`` computes the head for the last n positions only (0 = all); the
        generation engine passes 1, since a prefill needs only the next token's logits.
        ``loss_chunk=C`` (with ``labels``): the head and the loss are computed C tokens at a time
        (``objectives.chunked_ce``), so the (B, T, V) logits never exist; ``.logits`` is then None
        (or the last ``logits_to_keep`` positions' when that is set too).
        ``doc_ids`` (B, T): a packed row of several documents (training, no cache); each token
        attends only to earlier tokens of its own document, and positions restart per document.
        ``position_ids`` overrides the positions; its shape is the position part's ((B, T) for 1D
        positions, (B, 2, T) for 2D)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        T = x.shape[1]
        past = cache.length if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, expected "
                             f"{past} cached + {T} new = {past + T}")
        if self.max_positions is not None and past + T > self.max_positions:
            raise ValueError(f"sequence of {past + T} tokens is longer than the model's context "
                             f"of {self.max_positions}")
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (packed documents) is for training forwards; it takes no cache")
        step = Step(q_len=T, past=past, dtype=x.dtype, device=x.device, input_ids=input_ids,
                    attention_mask=attention_mask, position_ids=position_ids, doc_ids=doc_ids, cache=cache)
        inp, position_ids = self.positions.attn_inputs(step)
        x = _dropout(self.positions.embed(x, position_ids), self.embed_dropout, self.training)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, inp, i)
        if cache is not None:
            cache.commit()
        x = self.final_norm(x)
        if loss_chunk and labels is not None:
            logits, loss = self._chunked_loss(x, labels, loss_chunk, logits_to_keep)
        else:
            logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
            loss = causal_lm_loss(logits, labels) if labels is not None else None
        # MoE mlps leave their balance loss in .aux_loss after a training forward (None otherwise)
        aux = [a for a in (getattr(layer.mlp, "aux_loss", None) for layer in self.layers) if a is not None]
        aux_loss = torch.stack(aux).sum() if aux else None
        if loss is not None and aux_loss is not None and self.aux_loss_alpha:
            loss = loss + self.aux_loss_alpha * aux_loss
        return CausalLMOutput(logits=logits, loss=loss, hidden_states=x, aux_loss=aux_loss)

    def _chunked_loss(self, x: torch.Tensor, labels: torch.Tensor, loss_chunk: int, logits_to_keep: int):
        """(logits of the last ``logits_to_keep`` positions or None, the chunked causal-LM loss)."""
        from lmzoo.objectives.chunked_ce import chunked_causal_lm_loss  # objectives import this module

        if type(self.lm_head) is not nn.Linear:  # a quantized or wrapped head has no plain weight to chunk
            raise ValueError(f"loss_chunk needs the head to be a plain nn.Linear, not {type(self.lm_head).__name__}")
        loss = chunked_causal_lm_loss(x, self.lm_head.weight, labels, self.lm_head.bias, chunk_tokens=loss_chunk)
        return (self.lm_head(x[:, -logits_to_keep:]) if logits_to_keep else None), loss

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
                 position_bias: RelativePositionBias | None = None, causal: bool = False,
                 input_dropout: float = 0.0, output_dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.final_norm, self.position_bias = final_norm, position_bias
        self.causal = causal
        # dropout on the embedded input (BERT, ViT, T5) and after the final norm (T5); training only
        self.input_dropout = check_dropout(input_dropout, "input_dropout")
        self.output_dropout = check_dropout(output_dropout, "output_dropout")

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
        x = _dropout(x, self.input_dropout, self.training)
        for i, layer in enumerate(self.layers):
            x = layer(x, inp, i)
        x = self.final_norm(x) if self.final_norm is not None else x
        return _dropout(x, self.output_dropout, self.training)

    def describe(self) -> dict:
        pb = self.position_bias
        pos = f"relative bias ({pb.num_buckets} buckets, max {pb.max_distance})" if pb is not None else "none"
        return {"position": pos, **describe_layer(self.layers[0]), "layers": len(self.layers)}


class CrossDecoderLayer(nn.Module):
    """Decoder block of an encoder-decoder: causal self-attention, cross-attention over the encoder
    output, MLP, each a residual with its own norm. ``'pre'``: x + f(norm(x)) (T5); ``'post'``:
    norm(x + f(x)) (the original Transformer). diff from ``TransformerLayer``: the middle sublayer."""

    def __init__(self, attn: Attention, cross_attn: CrossAttention, mlp: nn.Module, attn_norm: nn.Module,
                 cross_norm: nn.Module, mlp_norm: nn.Module, placement: str = "pre", dropout: float = 0.0):
        super().__init__()
        if placement not in ("pre", "post"):
            raise ValueError(f"norm placement must be 'pre' or 'post', got '{placement}'")
        self.attn, self.cross_attn, self.mlp = attn, cross_attn, mlp
        self.attn_norm, self.cross_norm, self.mlp_norm = attn_norm, cross_norm, mlp_norm
        self.placement = placement
        self.dropout = check_dropout(dropout, "dropout")  # residual dropout on each sublayer's output (T5)

    def forward(self, x: torch.Tensor, inp: AttnInputs, memory_kv: tuple[torch.Tensor, torch.Tensor],
                memory_mask: torch.Tensor | None, layer_idx: int) -> torch.Tensor:
        def f(h):
            return _dropout(h, self.dropout, self.training)

        if self.placement == "pre":
            x = x + f(self.attn(self.attn_norm(x), inp, layer_idx))
            x = x + f(self.cross_attn(self.cross_norm(x), memory_kv, memory_mask))
            return x + f(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + f(self.attn(x, inp, layer_idx)))
        x = self.cross_norm(x + f(self.cross_attn(x, memory_kv, memory_mask)))
        return self.mlp_norm(x + f(self.mlp(x)))


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
                 pad_token_id: int = 0, decoder_dropout: float = 0.0):
        super().__init__()
        # on the decoder's embedded input and after its final norm (T5's dropout_rate); training only
        self.decoder_dropout = check_dropout(decoder_dropout, "decoder_dropout")
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
        x = _dropout(x, self.decoder_dropout, self.training)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, inp, kvs[i], cross_mask, i)
        if cache is not None:
            cache.commit()
        x = _dropout(self.decoder_final_norm(x), self.decoder_dropout, self.training)
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
