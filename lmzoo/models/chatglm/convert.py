"""ChatGLM-6B checkpoint keys (THUDM's ``ChatGLMForConditionalGeneration``) <-> lmzoo, both ways.

    transformer.word_embeddings                       -> embed
    transformer.layers.{i}.input_layernorm            -> layers.{i}.attn_norm
      .attention.query_key_value                      -> q | k | v, rows per head: q0 k0 v0 q1 k1 v1 ...
                                                         (the original views them as (H, 3·hd) and splits)
      .attention.dense                                -> o_proj
      .post_attention_layernorm                       -> mlp_norm
      .mlp.dense_h_to_4h                              -> up_proj           (GeLU)
                                                         up | gate rows    (GeGLU: x1 · gelu(x2))
      .mlp.dense_4h_to_h                              -> down_proj
      .attention.rotary_emb.inv_freq                  -> (a buffer, recomputed; not written back)
    transformer.final_layernorm                       -> final_norm
    lm_head                                           -> lm_head

Every linear has a bias except lm_head; both LayerNorms have one. ``lmzoo.save`` writes these same
keys, so a load/save round trip gives the release's tensors back bit for bit.
"""

from __future__ import annotations

import torch

from lmzoo.errors import CheckpointError
from lmzoo.interop.convert import KeyMap, Rule, rename
from lmzoo.models.chatglm.config import ChatGLMConfig


def _qkv_per_head(hf: str, ours: list[str], n_heads: int, head_dim: int) -> Rule:
    """query_key_value rows (H, 3, hd) <-> q, k, v each (H·hd) rows; weight (…, d) or bias."""

    def split(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        t = ts[0]
        if t.shape[0] != 3 * n_heads * head_dim:
            raise CheckpointError(f"'{hf}' has {t.shape[0]} rows; the config expects 3·{n_heads}·{head_dim}")
        per_head = t.view(n_heads, 3, head_dim, *t.shape[1:])  # (H, 3, hd, [d])
        return [per_head[:, j].reshape(n_heads * head_dim, *t.shape[1:]).contiguous() for j in range(3)]

    def merge(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        rest = ts[0].shape[1:]
        per_head = torch.stack([t.view(n_heads, head_dim, *rest) for t in ts], dim=1)  # (H, 3, hd, [d])
        return [per_head.reshape(3 * n_heads * head_dim, *rest)]

    return Rule([hf], ours, split, merge)


def _halves(hf: str, ours: list[str], d_ff: int) -> Rule:
    """GeGLU's dense_h_to_4h: 2·d_ff rows, the linear half (x1) first, the gelu'd half (x2) second."""

    def split(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        if ts[0].shape[0] != 2 * d_ff:
            raise CheckpointError(f"'{hf}' has {ts[0].shape[0]} rows; GeGLU with inner_hidden_size {d_ff} "
                                  f"expects 2·{d_ff}")
        return [p.contiguous() for p in torch.split(ts[0], d_ff, 0)]

    return Rule([hf], ours, split, lambda ts: [torch.cat(ts, 0)])


def keymap(cfg: ChatGLMConfig, hf: dict | None = None) -> KeyMap:
    L, A, M = "transformer.layers.{i}.", "layers.{i}.attn.", "layers.{i}.mlp."
    rules = [rename("transformer.word_embeddings.weight", "embed.weight")]
    for kind in ("weight", "bias"):
        rules += [
            rename(L + f"input_layernorm.{kind}", f"layers.{{i}}.attn_norm.{kind}"),
            _qkv_per_head(L + f"attention.query_key_value.{kind}", [A + f"{p}_proj.{kind}" for p in "qkv"],
                          cfg.n_heads, cfg.head_dim),
            rename(L + f"attention.dense.{kind}", A + f"o_proj.{kind}"),
            rename(L + f"post_attention_layernorm.{kind}", f"layers.{{i}}.mlp_norm.{kind}"),
            rename(L + f"mlp.dense_4h_to_h.{kind}", M + f"down_proj.{kind}"),
            rename(f"transformer.final_layernorm.{kind}", f"final_norm.{kind}"),
        ]
        if cfg.mlp == "geglu":
            rules.append(_halves(L + f"mlp.dense_h_to_4h.{kind}", [M + f"up_proj.{kind}", M + f"gate_proj.{kind}"],
                                 cfg.d_ff))
        else:
            rules.append(rename(L + f"mlp.dense_h_to_4h.{kind}", M + f"up_proj.{kind}"))
    ignore = [r"transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq"]
    if cfg.tie_embeddings:
        ignore.append(r"lm_head\.weight")
    else:
        rules.append(rename("lm_head.weight", "lm_head.weight"))
    return KeyMap(rules, cfg.n_layers, ignore=ignore)
