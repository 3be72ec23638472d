"""ChatGLM2 checkpoint keys, both layouts -> lmzoo; ``lmzoo.save`` writes the ``GlmForCausalLM`` one.

GlmForCausalLM (model_type "glm"): LLaMA's names, except that gate and up are fused in
``mlp.gate_up_proj`` (rows: gate, then up; transformers' GlmMLP chunks its output in two and
gates with the first).

THUDM's release (model_type "chatglm", the key map is chosen from the config.json it came with):
    transformer.embedding.word_embeddings          -> embed
    transformer.encoder.layers.{i}.input_layernorm -> attn_norm
      .self_attention.query_key_value              -> q | k | v (rows: all query heads, then the
                                                      groups' keys, then the groups' values; with
                                                      multi_query_attention false the rows are per
                                                      head instead: q0 k0 v0 q1 k1 v1 ...)
      .self_attention.dense                        -> o_proj
      .post_attention_layernorm                    -> mlp_norm
      .mlp.dense_h_to_4h                           -> gate | up (swiglu = silu(first half) * second half)
      .mlp.dense_4h_to_h                           -> down_proj
    transformer.encoder.final_layernorm            -> final_norm
    transformer.output_layer                       -> lm_head
    transformer.rotary_pos_emb.inv_freq            -> (a buffer, recomputed)
"""

from __future__ import annotations

from lmzoo.interop.convert import KeyMap, per_head, rename, split_rows
from lmzoo.models.chatglm2.config import ChatGLM2Config, is_original_layout

GATE_UP = ["layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"]  # fused rows: gate first, then up


def _glm_keymap(cfg: ChatGLM2Config) -> KeyMap:
    L, A = "model.layers.{i}.", "layers.{i}.attn."
    rules = [rename("model.embed_tokens.weight", "embed.weight"), rename("model.norm.weight", "final_norm.weight")]
    for p in ("q", "k", "v"):
        rules.append(rename(L + f"self_attn.{p}_proj.weight", A + f"{p}_proj.weight"))
        if cfg.attention_bias:
            rules.append(rename(L + f"self_attn.{p}_proj.bias", A + f"{p}_proj.bias"))
    rules += [rename(L + "self_attn.o_proj.weight", A + "o_proj.weight"),
              split_rows(L + "mlp.gate_up_proj.weight", GATE_UP, (cfg.d_ff, cfg.d_ff)),
              rename(L + "mlp.down_proj.weight", "layers.{i}.mlp.down_proj.weight"),
              rename(L + "input_layernorm.weight", "layers.{i}.attn_norm.weight"),
              rename(L + "post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight")]
    if not cfg.tie_embeddings:
        rules.append(rename("lm_head.weight", "lm_head.weight"))
    return KeyMap(rules, cfg.n_layers, ignore=[r"lm_head\.weight" if cfg.tie_embeddings else r"$^"])


def _original_keymap(cfg: ChatGLM2Config, hf: dict) -> KeyMap:
    L, A = "transformer.encoder.layers.{i}.", "layers.{i}.attn."
    rules = [rename("transformer.embedding.word_embeddings.weight", "embed.weight"),
             rename("transformer.encoder.final_layernorm.weight", "final_norm.weight"),
             rename("transformer.output_layer.weight", "lm_head.weight")]
    for kind in ("weight", "bias") if cfg.attention_bias else ("weight",):
        key, ours = L + f"self_attention.query_key_value.{kind}", [A + f"{p}_proj.{kind}" for p in "qkv"]
        if hf.get("multi_query_attention"):
            q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
            rules.append(split_rows(key, ours, (q, kv, kv)))
        else:
            rules.append(per_head(key, ours, cfg.n_heads, cfg.head_dim))
    rules += [rename(L + "self_attention.dense.weight", A + "o_proj.weight"),
              split_rows(L + "mlp.dense_h_to_4h.weight", GATE_UP, (cfg.d_ff, cfg.d_ff)),
              rename(L + "mlp.dense_4h_to_h.weight", "layers.{i}.mlp.down_proj.weight"),
              rename(L + "input_layernorm.weight", "layers.{i}.attn_norm.weight"),
              rename(L + "post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight")]
    return KeyMap(rules, cfg.n_layers, ignore=[r"transformer\.rotary_pos_emb\.inv_freq"])


def keymap(cfg: ChatGLM2Config, hf: dict | None = None) -> KeyMap:
    return _original_keymap(cfg, hf) if is_original_layout(hf) else _glm_keymap(cfg)
