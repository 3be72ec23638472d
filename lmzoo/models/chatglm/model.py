"""ChatGLM-6B = GLM prefix decoder: bidirectional over the prompt, causal over what it generates.

diff from ChatGLM2 (and every causal decoder here):
- the mask is a prefix mask: every token before ``<sop>`` sees the whole prompt up to ``<sop>``,
  ``<sop>`` and every generated token see causally (``masks.prefix_mask``);
- 2D positions (``position.Rotary2D``): the first half of each head rotates by the position id,
  the second half by the block position id. Prompt tokens have positions 0..n-1 and block 0;
  ``<sop>`` and the generated tokens all keep the position of ``[gMASK]`` and count blocks 1, 2, 3...;
- DeepNorm residuals, y = LN(x); x' = α·y + f(y) with α = (2N)^0.5, and DeepNorm's
  initialisation (Xavier normal, gain β = (2N)^-0.5 on v, o and the MLP). N is
  ``cfg.deepnorm_layers``: the release code builds every GLMBlock with its default num_layers=28,
  so a checkpoint in the release layout has α = √56 whatever its depth; lmzoo's own configs
  default to N = n_layers;
- LayerNorm with bias, tanh-GeLU MLP with biases (or GeGLU, ``mlp="geglu"``), biases on q, k, v, o;
- RoPE's inverse frequencies rounded to float16, as the original computes them.

The prefix and the 2D positions are read off the *tokens* ([gMASK] and <sop> per row) at prefill
and must be remembered for every decode step after it: that is ``GLMPositions``, the stack's
position part (``nn/layout.py``), which keeps the per-row layout in its cache (``GLMCache``) and
builds the mask and 2D RoPE tables from it. The forward is ``DecoderLM``'s; ``GLMPrefixLM`` only
adds ``prompt_tail``.
"""

from __future__ import annotations

import torch
from torch import nn

from lmzoo.errors import LmzooError
from lmzoo.models.chatglm.config import ChatGLMConfig
from lmzoo.nn.attention import Attention, AttnInputs
from lmzoo.nn.kv_cache import KVCache
from lmzoo.nn.layout import PositionScheme, Step
from lmzoo.nn.masks import build_mask
from lmzoo.nn.mlp import MLP, GatedMLP
from lmzoo.nn.norms import LayerNorm, deepnorm_alpha, deepnorm_beta, deepnorm_init_
from lmzoo.nn.position import RopeConfig, Rotary2D
from lmzoo.nn.transformer import DecoderLM, TransformerLayer


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


class GLMPositions(PositionScheme, nn.Module):
    """GLM's position part: 2D RoPE and the prefix mask, both read off each row's [gMASK] ... <sop>.

    At prefill it finds the prompt layout (``prompt_layout``) and keeps it in the cache (``GLMCache``)
    for every decode step after it; from the layout come the 2D position ids (``glm_position_ids``)
    and the prefix mask (``masks.build_mask("prefix")``: every key before <sop> is seen by all).
    Packed documents (``doc_ids``) are refused: a row has one prompt layout, not one per document.
    """

    def __init__(self, rope: Rotary2D, cfg: ChatGLMConfig):
        super().__init__()
        self.rope, self.tokens = rope, cfg  # the config supplies the ids of <sop>, [gMASK] and [MASK]

    def describe(self) -> str:
        return self.rope.describe()

    def new_cache(self, attn, n_layers: int, batch: int, max_len: int, dtype: torch.dtype, device) -> GLMCache:
        return GLMCache(n_layers, batch, attn.n_kv_heads, attn.head_dim, max_len, dtype=dtype, device=device)

    def _layout(self, step: Step):
        if step.past == 0:
            if step.input_ids is None:
                raise LmzooError("chatglm: the prompt's input_ids are needed (also with inputs_embeds): the model "
                                 "finds its prefix and positions from [gMASK] and <sop>")
            layout = prompt_layout(step.input_ids, step.attention_mask, self.tokens)
            if step.cache is not None:
                step.cache.layout = layout
            return layout
        if getattr(step.cache, "layout", None) is None:
            raise LmzooError("chatglm: decoding with a cache that holds no prompt layout; make it with "
                             "model.new_cache and start with the prompt")
        return step.cache.layout

    def attn_inputs(self, step: Step) -> tuple[AttnInputs, torch.Tensor]:
        """``step.position_ids`` (B, 2, T) overrides the 2D positions; the prefix always comes from the
        tokens ([gMASK] ... <sop>) at prefill, and from the cache on later steps."""
        if step.doc_ids is not None:
            raise ValueError("chatglm: doc_ids (packed documents) are not supported by GLM's prefix layout: a row's "
                             "bidirectional prefix and 2D positions come from its one [gMASK] ... <sop>; pass one "
                             "prompt per row (position_ids (B, 2, T) and attention_mask, as objectives.glm does)")
        layout = self._layout(step)
        pos = step.position_ids if step.position_ids is not None else glm_position_ids(layout, step.past, step.q_len)
        first, ctx, _ = layout
        mask = build_mask("prefix", step.q_len, step.k_len, prefix_len=first + ctx, attention_mask=step.attention_mask,
                          device=step.device)  # (B, 1, T, past+T)
        return AttnInputs(mask=mask, rope=self.rope(pos, step.dtype), cache=step.cache), pos


class GLMPrefixLM(DecoderLM):
    """``DecoderLM`` with ``GLMPositions``; what it adds is only what prompt-making tools ask."""

    def prompt_tail(self) -> list[int]:
        """The ids every generation prompt must end with: [gMASK] <sop> (tools that make prompts ask)."""
        return [self.config.gmask_token_id, self.config.bos_token_id]


def _mlp(cfg: ChatGLMConfig) -> nn.Module:
    if cfg.mlp == "geglu":  # GLM-130B: x1 · gelu(x2), the exact (erf) GeLU
        return GatedMLP(cfg.d_model, cfg.d_ff, act="gelu", bias=True)
    return MLP(cfg.d_model, cfg.d_ff, act="gelu_tanh", bias=True)  # ChatGLM-6B's gelu_impl is the tanh form


def build(cfg: ChatGLMConfig) -> GLMPrefixLM:
    rope = Rotary2D(cfg.head_dim, RopeConfig(theta=cfg.rope_theta, max_positions=cfg.max_positions))
    if cfg.inv_freq_fp16:
        rope.per_half.inv_freq = rope.per_half.inv_freq.half().float()
    alpha, beta = deepnorm_alpha(cfg.alpha_layers), deepnorm_beta(cfg.alpha_layers)
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
                       final_norm=LayerNorm(cfg.d_model, eps=cfg.norm_eps), positions=GLMPositions(rope, cfg),
                       tie_embeddings=cfg.tie_embeddings)
