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

from lmzoo.interop.convert import KeyMap, per_head, rename, split_rows
from lmzoo.models.chatglm.config import ChatGLMConfig


def keymap(cfg: ChatGLMConfig, hf: dict | None = None) -> KeyMap:
    L, A, M = "transformer.layers.{i}.", "layers.{i}.attn.", "layers.{i}.mlp."
    rules = [rename("transformer.word_embeddings.weight", "embed.weight")]
    for kind in ("weight", "bias"):
        rules += [
            rename(L + f"input_layernorm.{kind}", f"layers.{{i}}.attn_norm.{kind}"),
            per_head(L + f"attention.query_key_value.{kind}", [A + f"{p}_proj.{kind}" for p in "qkv"],
                          cfg.n_heads, cfg.head_dim),
            rename(L + f"attention.dense.{kind}", A + f"o_proj.{kind}"),
            rename(L + f"post_attention_layernorm.{kind}", f"layers.{{i}}.mlp_norm.{kind}"),
            rename(L + f"mlp.dense_4h_to_h.{kind}", M + f"down_proj.{kind}"),
            rename(f"transformer.final_layernorm.{kind}", f"final_norm.{kind}"),
        ]
        if cfg.mlp == "geglu":
            # GeGLU's dense_h_to_4h: the linear half (x1) first, the gelu'd half (x2) second.
            rules.append(split_rows(L + f"mlp.dense_h_to_4h.{kind}", [M + f"up_proj.{kind}", M + f"gate_proj.{kind}"],
                                    (cfg.d_ff, cfg.d_ff)))
        else:
            rules.append(rename(L + f"mlp.dense_h_to_4h.{kind}", M + f"up_proj.{kind}"))
    ignore = [r"transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq"]
    if cfg.tie_embeddings:
        ignore.append(r"lm_head\.weight")
    else:
        rules.append(rename("lm_head.weight", "lm_head.weight"))
    return KeyMap(rules, cfg.n_layers, ignore=ignore)
