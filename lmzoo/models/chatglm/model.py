"""ChatGLM-6B = GLM prefix decoder: bidirectional over the prompt, causal over what it generates.

diff from ChatGLM2 (and every causal decoder here):
- the mask is a prefix mask: every token before ``<sop>`` sees the whole prompt up to ``<sop>``,
  ``<sop>`` and every generated token see causally (``masks.prefix_mask``);
- 2D positions (``position.Rotary2D``): the first half of each head rotates by the position id,
  the second half by the block position id. Prompt tokens have positions 0..n-1 and block 0;
  ``<sop>`` and the generated tokens all keep the position of ``[gMASK]`` and count blocks 1, 2, 3...;
- DeepNorm residuals, y = LN(x); x' = α·y + f(y) with α = (2·n_layers)^0.5, and DeepNorm's
  initialisation (Xavier normal, gain β = (2·n_layers)^-0.5 on v, o and the MLP);
- LayerNorm with bias, tanh-GeLU MLP with biases (or GeGLU, ``mlp="geglu"``), biases on q, k, v, o;
- RoPE's inverse frequencies rounded to float16, as the original computes them.

Why its own model class rather than more options on ``DecoderLM``: the prefix and the 2D positions
are read off the *tokens* ([gMASK] and <sop> per row) at prefill and must be remembered for every
decode step after it. ``GLMPrefixLM`` keeps that per-row layout in its cache (``GLMCache``) and
builds its mask and positions from it; everything else (embedding, layers, norm, head, loss,
``logits_to_keep``) is ``DecoderLM``'s, so no other family's forward changes.
"""

from __future__ import annotations

import torch
from torch import nn

from lmzoo.errors import LmzooError
from lmzoo.models.chatglm.config import ChatGLMConfig
from lmzoo.nn.attention import Attention, AttnInputs
from lmzoo.nn.kv_cache import KVCache
from lmzoo.nn.masks import build_mask
from lmzoo.nn.mlp import MLP, GatedMLP
from lmzoo.nn.norms import LayerNorm, deepnorm_alpha, deepnorm_beta, deepnorm_init_
from lmzoo.nn.position import RopeConfig, Rotary2D
from lmzoo.nn.transformer import CausalLMOutput, DecoderLM, TransformerLayer, causal_lm_loss


class GLMCache(KVCache):
    """A ``KVCache`` that also remembers each row's prompt layout, found at prefill:
    ``first`` (left pads), ``context_len`` (tokens before <sop>) and ``mask_pos`` ([gMASK]'s
    position), the last two counted from the first real token; all (B,)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        if self.layout is not None:
            self.layout = tuple(t.index_select(0, index) for t in self.layout)


def prompt_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cfg: ChatGLMConfig):
    """(first, context_len, mask_pos), each (B,): where each row's real tokens start, how many come
    before <sop>, and where [gMASK] (else [MASK]) sits, counted from the first real token."""
    B = input_ids.shape[0]
    first = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    if attention_mask is not None:
        first = (attention_mask.long().cumsum(-1) == 0).sum(-1)  # leading pads per row

    def find(token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        hit = input_ids == token_id  # (B, T)
        return hit.any(-1), hit.long().argmax(-1)  # argmax gives the first hit

    has_sop, sop = find(cfg.bos_token_id)
    has_g, g = find(cfg.gmask_token_id)
    has_m, m = find(cfg.mask_token_id)
    bad = ~(has_sop & (has_g | has_m))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise LmzooError(
            f"chatglm: prompt row {row} lacks [gMASK] ({cfg.gmask_token_id}) or [MASK] ({cfg.mask_token_id}) followed "
            f"by <sop> ({cfg.bos_token_id}); ChatGLM-6B finds its bidirectional prefix and its positions from them, "
            f"so end the prompt with '{cfg.gmask_token_id} {cfg.bos_token_id}' as its tokenizer does")
    mask_pos = torch.where(has_g, g, m)
    return first, sop - first, mask_pos - first


def glm_position_ids(layout, past: int, q_len: int) -> torch.Tensor:
    """(B, 2, Tq) position and block position ids of the tokens at indices past .. past+Tq-1.

    Before <sop>: (i, 0). From <sop> on: (mask_pos, i - context_len + 1), i counted from the first
    real token (left pads get 0, 0; they are never attended to).
    """
    first, ctx, mask_pos = (t[:, None] for t in layout)  # (B, 1)
    i = torch.arange(past, past + q_len, device=first.device)[None] - first  # (B, Tq)
    in_prompt = i < ctx
    pos = torch.where(in_prompt, i.clamp(min=0), mask_pos)
    block = torch.where(in_prompt, torch.zeros_like(i), i - ctx + 1)
    return torch.stack((pos, block), dim=1)  # (B, 2, Tq)


class GLMPrefixLM(DecoderLM):
    """``DecoderLM`` with GLM's prefix mask and 2D positions, both read from the prompt's tokens."""

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> GLMCache:
        p, a = self.embed.weight, self.layers[0].attn
        return GLMCache(len(self.layers), batch, a.n_kv_heads, a.head_dim, max_len, dtype=dtype or p.dtype,
                        device=device or p.device)

    def prompt_tail(self) -> list[int]:
        """The ids every generation prompt must end with: [gMASK] <sop> (tools that make prompts ask)."""
        return [self.config.gmask_token_id, self.config.bos_token_id]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: GLMCache | None = None, inputs_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> CausalLMOutput:
        """``position_ids`` (B, 2, T) overrides the 2D positions; the prefix always comes from the
        tokens ([gMASK] ... <sop>) at prefill, and from the cache on later steps."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        T = x.shape[1]
        past = cache.length if cache is not None else 0
        if attention_mask is not None and attention_mask.shape[-1] != past + T:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, expected "
                             f"{past} cached + {T} new = {past + T}")
        if past == 0:
            if input_ids is None:
                raise LmzooError("chatglm: the prompt's input_ids are needed (also with inputs_embeds): the model "
                                 "finds its prefix and positions from [gMASK] and <sop>")
            layout = prompt_layout(input_ids, attention_mask, self.config)
            if cache is not None:
                cache.layout = layout
        elif getattr(cache, "layout", None) is None:
            raise LmzooError("chatglm: decoding with a cache that holds no prompt layout; make it with "
                             "model.new_cache and start with the prompt")
        else:
            layout = cache.layout
        if position_ids is None:
            position_ids = glm_position_ids(layout, past, T)
        first, ctx, _ = layout
        mask = build_mask("prefix", T, past + T, prefix_len=first + ctx, attention_mask=attention_mask,
                          device=x.device)  # (B, 1, T, past+T)
        inp = AttnInputs(mask=mask, rope=self.rope(position_ids, x.dtype), cache=cache)
        for i, layer in enumerate(self.layers):
            x = layer(x, inp, i)
        if cache is not None:
            cache.commit()
        x = self.final_norm(x)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss, hidden_states=x)


def _mlp(cfg: ChatGLMConfig) -> nn.Module:
    if cfg.mlp == "geglu":  # GLM-130B: x1 · gelu(x2), the exact (erf) GeLU
        return GatedMLP(cfg.d_model, cfg.d_ff, act="gelu", bias=True)
    return MLP(cfg.d_model, cfg.d_ff, act="gelu_tanh", bias=True)  # ChatGLM-6B's gelu_impl is the tanh form


def build(cfg: ChatGLMConfig) -> GLMPrefixLM:
    rope = Rotary2D(cfg.head_dim, RopeConfig(theta=cfg.rope_theta, max_positions=cfg.max_positions))
    if cfg.inv_freq_fp16:
        rope.per_half.inv_freq = rope.per_half.inv_freq.half().float()
    alpha, beta = deepnorm_alpha(cfg.n_layers), deepnorm_beta(cfg.n_layers)
    layers = []
    for _ in range(cfg.n_layers):
        attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_heads, cfg.head_dim, qkv_bias=True, out_bias=True,
                         rope=rope, kernel=cfg.attn_kernel)
        mlp = _mlp(cfg)
        deepnorm_init_([attn.v_proj, attn.o_proj, *(m for m in mlp.children() if isinstance(m, nn.Linear))],
                       [attn.q_proj, attn.k_proj], beta)
        layers.append(TransformerLayer(attn=attn, mlp=mlp, attn_norm=LayerNorm(cfg.d_model, eps=cfg.norm_eps),
                                       mlp_norm=LayerNorm(cfg.d_model, eps=cfg.norm_eps), placement="deepnorm",
                                       alpha=alpha))
    return GLMPrefixLM(cfg, embed=nn.Embedding(cfg.vocab_size, cfg.d_model), layers=layers,
                       final_norm=LayerNorm(cfg.d_model, eps=cfg.norm_eps), rope=rope,
                       tie_embeddings=cfg.tie_embeddings, max_positions=None)
