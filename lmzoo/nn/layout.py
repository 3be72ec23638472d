"""Position schemes: the one interface through which a decoder's positions and mask become the
attention inputs.

``DecoderLM`` is given one ``PositionScheme`` part (its ``positions``) and asks it, once per forward,
for the ``AttnInputs`` every layer reads (mask, RoPE tables or bias, ``is_causal``) and the position
ids of the new tokens; then lets it add to the embeddings (a learned table) and make the cache. So
a new kind of position or mask (sliding window, 2D positions, a prefix read off the tokens) is a new
part, and ``DecoderLM.forward`` does not change:

    scheme                  positions                    mask                     where
    NoPositions             1D, unused                   causal                   (a bare decoder)
    LearnedPositions        1D, x + P[pos]               causal                   GPT-2
    RotaryEmbedding         1D, rotates q/k              causal                   LLaMA, ChatGLM2, DeepSeek-V2
    ALiBi                   1D, -slope·distance bias     causal                   Bloom
    GLM prefix (chatglm)    2D, read off [gMASK] <sop>   prefix (bidirectional)   ChatGLM-6B

``CausalPositions`` is the 1D causal decoder every row above but the last shares: default position
ids (counting from the cache, skipping left pads), the causal mask (``masks.build_mask``) with pads
removed, packed documents (``doc_ids``: same-document causal mask, positions restarting per
document). A subclass says what its encoding adds (``encode``: RoPE tables, an ALiBi bias;
``embed``: a learned table) and may narrow the mask (``mask``: e.g. a sliding window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmzoo.nn.attention import AttnInputs
from lmzoo.nn.kv_cache import KVCache
from lmzoo.nn.masks import build_mask, positions_from_mask


@dataclass
class Step:
    """What a decoder forward knows before its first layer: the inputs and where they sit."""

    q_len: int  # new tokens
    past: int  # tokens already in the cache
    dtype: torch.dtype  # the hidden states' dtype (additive masks and RoPE tables are made in it)
    device: torch.device
    input_ids: torch.Tensor | None = None  # (B, T); None when only inputs_embeds were given
    attention_mask: torch.Tensor | None = None  # (B, past + T), 1 = real token
    position_ids: torch.Tensor | None = None  # caller's override; its shape is the scheme's business
    doc_ids: torch.Tensor | None = None  # (B, T) packed documents (training forwards, no cache)
    cache: KVCache | None = None

    @property
    def k_len(self) -> int:
        return self.past + self.q_len

    @property
    def padded(self) -> bool:
        return self.attention_mask is not None and not bool(self.attention_mask.all())


class PositionScheme:
    """The interface (a mixin for ``nn.Module``s). ``attn_inputs`` is the one method every scheme
    has; the others have defaults a scheme overrides when it needs to."""

    max_positions: int | None = None  # a hard context limit the stack enforces (a learned table's size)

    def attn_inputs(self, step: Step) -> tuple[AttnInputs, torch.Tensor]:
        """-> (AttnInputs, position ids of the new tokens, read back by ``embed``)."""
        raise NotImplementedError

    def embed(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """What the scheme adds to the (B, T, D) token embeddings (a learned table); nothing by default."""
        return x

    def new_cache(self, attn, n_layers: int, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        """The cache of a stack of ``attn`` layers; a scheme that remembers per-row state (GLM's
        prompt layout) returns a cache that holds it too."""
        return attn.new_cache(n_layers, batch, max_len, dtype, device)

    def describe(self) -> str:
        """The zoo table's position cell."""
        raise NotImplementedError


class CausalPositions(PositionScheme):
    """1D positions in a causal decoder (see the module docstring); ``encode``, ``embed`` and
    ``mask`` are what a subclass changes."""

    needs_mask = False  # True: the encoding adds to the mask (ALiBi), so never leave it to is_causal

    def encode(self, inp: AttnInputs, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> None:
        """Put what attention consumes into ``inp`` (RoPE tables, a bias added to ``inp.mask``).
        q_pos (B|1, Tq), k_pos (B|1, Tk): the queries' and the keys' positions."""

    def mask(self, step: Step) -> torch.Tensor | None:
        """Boolean (B|1, 1, Tq, Tk) mask, or None for "plain causal" (the kernel's is_causal)."""
        if not (step.padded or self.needs_mask):
            return None
        return build_mask("causal", step.q_len, step.k_len, attention_mask=step.attention_mask if step.padded else None,
                          device=step.device)

    def attn_inputs(self, step: Step) -> tuple[AttnInputs, torch.Tensor]:
        if step.doc_ids is not None:
            return self._packed_inputs(step)
        q_pos = step.position_ids
        if q_pos is None:
            if step.padded:
                q_pos = positions_from_mask(step.attention_mask)[:, -step.q_len:]  # (B, Tq)
            else:
                q_pos = torch.arange(step.past, step.k_len, device=step.device)[None]  # (1, Tq)
        inp = AttnInputs(cache=step.cache, mask=self.mask(step))
        if inp.mask is None and step.q_len > 1:
            inp.is_causal = True if step.past == 0 else False  # a branch: a compiled step's symbolic past would give a SymBool
            if step.past:  # several new queries after cached keys: the causal diagonal is offset
                inp.mask = build_mask("causal", step.q_len, step.k_len, device=step.device)
        if step.padded:
            k_pos = positions_from_mask(step.attention_mask)  # (B, Tk)
        else:
            k_pos = torch.arange(step.k_len, device=step.device)[None]  # (1, Tk)
        self.encode(inp, q_pos, k_pos, step.dtype)
        return inp, q_pos

    def _packed_inputs(self, step: Step):
        """Packed documents: the causal same-document mask, positions restarting per document."""
        doc_ids, pos = step.doc_ids, step.position_ids
        T = doc_ids.shape[-1]
        if pos is None:  # index minus the index where the token's document starts
            idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
            starts = torch.cat([torch.ones_like(doc_ids[:, :1], dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], 1)
            pos = idx - torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=-1).values  # (B, T)
        inp = AttnInputs(mask=build_mask("packed", T, doc_ids=doc_ids, attention_mask=step.attention_mask))
        self.encode(inp, pos, pos, step.dtype)  # keys are the queries here: both sides use the reset positions
        return inp, pos


class NoPositions(CausalPositions, torch.nn.Module):
    """A causal decoder with no position encoding at all (order comes from the mask alone)."""

    def describe(self) -> str:
        return "none"
