"""Bloom checkpoint keys: transformers' ``BloomForCausalLM`` <-> lmzoo.

``self_attention.query_key_value`` fuses q, k and v *per head*: its output rows are laid out
(n_heads, 3, head_dim), i.e. q0 k0 v0 q1 k1 v1 ..., not q|k|v stacked as GPT-2's c_attn is. The
split views the rows that way and takes slot 0/1/2 of every head; the merge interleaves them back.
The BigScience releases were saved from ``BloomModel`` and lack the ``transformer.`` prefix; both
layouts load, and ``lmzoo.save`` always writes the ``BloomForCausalLM`` one.
"""

from __future__ import annotations

from lmzoo.interop.convert import KeyMap, per_head, rename
from lmzoo.models.bloom.config import BloomConfig


def keymap(cfg: BloomConfig, hf: dict | None = None) -> KeyMap:
    L = "transformer.h.{i}."
    rules = []
    for p in ("weight", "bias"):
        rules += [
            rename(f"transformer.word_embeddings_layernorm.{p}", f"embed_norm.{p}"),
            rename(f"transformer.ln_f.{p}", f"final_norm.{p}"),
            rename(L + f"input_layernorm.{p}", f"layers.{{i}}.attn_norm.{p}"),
            rename(L + f"post_attention_layernorm.{p}", f"layers.{{i}}.mlp_norm.{p}"),
            per_head(L + f"self_attention.query_key_value.{p}",
                     [f"layers.{{i}}.attn.{x}_proj.{p}" for x in "qkv"], cfg.n_heads, cfg.head_dim),
            rename(L + f"self_attention.dense.{p}", f"layers.{{i}}.attn.o_proj.{p}"),
            rename(L + f"mlp.dense_h_to_4h.{p}", f"layers.{{i}}.mlp.up_proj.{p}"),
            rename(L + f"mlp.dense_4h_to_h.{p}", f"layers.{{i}}.mlp.down_proj.{p}"),
        ]
    rules.insert(0, rename("transformer.word_embeddings.weight", "embed.weight"))
    if not cfg.tie_embeddings:
        rules.append(rename("lm_head.weight", "lm_head.weight"))
    return KeyMap(rules, cfg.n_layers, ignore=[r"lm_head\.weight" if cfg.tie_embeddings else r"$^"],
                  optional_prefix="transformer.")
