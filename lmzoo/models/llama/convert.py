"""LLaMA checkpoint keys: transformers' ``LlamaForCausalLM`` <-> lmzoo."""

from __future__ import annotations

from lmzoo.interop.convert import KeyMap, rename
from lmzoo.models.llama.config import LlamaConfig


def keymap(cfg: LlamaConfig, hf: dict | None = None) -> KeyMap:
    L = "model.layers.{i}."
    rules = [rename("model.embed_tokens.weight", "embed.weight"), rename("model.norm.weight", "final_norm.weight")]
    for p in ("q", "k", "v", "o"):
        rules.append(rename(L + f"self_attn.{p}_proj.weight", f"layers.{{i}}.attn.{p}_proj.weight"))
        if cfg.attention_bias:
            rules.append(rename(L + f"self_attn.{p}_proj.bias", f"layers.{{i}}.attn.{p}_proj.bias"))
    for p in ("gate", "up", "down"):
        rules.append(rename(L + f"mlp.{p}_proj.weight", f"layers.{{i}}.mlp.{p}_proj.weight"))
        if cfg.mlp_bias:
            rules.append(rename(L + f"mlp.{p}_proj.bias", f"layers.{{i}}.mlp.{p}_proj.bias"))
    rules += [rename(L + "input_layernorm.weight", "layers.{i}.attn_norm.weight"),
              rename(L + "post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight")]
    if not cfg.tie_embeddings:
        rules.append(rename("lm_head.weight", "lm_head.weight"))
    # rotary_emb.inv_freq was saved as a buffer by old transformers; it is recomputed here.
    return KeyMap(rules, cfg.n_layers, ignore=[r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
                                                r"lm_head\.weight" if cfg.tie_embeddings else r"$^"])
