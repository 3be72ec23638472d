"""DeepSeek-V2 checkpoint keys: transformers' ``DeepseekV2ForCausalLM`` / the original release <-> lmzoo.

Attention and norms are renames (``self_attn.kv_a_proj_with_mqa`` -> ``attn.kv_a_proj``,
``kv_a_layernorm`` -> ``kv_a_norm``, ``q_a_layernorm`` -> ``q_a_norm``). The routed experts come in
two layouts, both read:

- per expert (DeepSeek's release, and what transformers' ``save_pretrained`` writes):
  ``mlp.experts.{e}.gate_proj.weight`` (d_expert, d), ``.up_proj``, ``.down_proj`` (d, d_expert);
- fused (transformers' in-memory ``DeepseekV2Experts``): ``mlp.experts.gate_up_proj``
  (E, 2·d_expert, d), rows per expert [gate | up], and ``mlp.experts.down_proj`` (E, d, d_expert).

lmzoo stores the fused tensors; ``lmzoo.save`` writes the per-expert layout, which every
transformers version (and the original remote code) loads. The router ``mlp.gate.weight`` is
(E, d). Dense layers (``first_k_dense_replace``) have LLaMA's MLP keys.
"""

from __future__ import annotations

import torch

from lmzoo.errors import CheckpointError
from lmzoo.interop.convert import KeyMap, Rule, either, rename
from lmzoo.models.deepseek_v2.config import DeepseekV2Config

L, A, M = "model.layers.{i}.", "layers.{i}.attn.", "layers.{i}.mlp."


def _stack_experts(keys: list[str], n_experts: int, fused: str) -> Rule:
    """Per-expert ``keys`` (gate of 0..E-1 [, then up of 0..E-1]) <-> one (E, rows, cols) tensor; the
    gate and up blocks are concatenated along the rows, as transformers fuses them."""
    n_parts = len(keys) // n_experts

    def to_ours(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        for k, t in zip(keys, ts):
            if t.shape != ts[0].shape:
                raise CheckpointError(f"'{k}' has shape {tuple(t.shape)}, unlike '{keys[0]}' {tuple(ts[0].shape)}")
        parts = [torch.stack(ts[j * n_experts:(j + 1) * n_experts]) for j in range(n_parts)]  # (E, rows, cols) each
        return [torch.cat(parts, dim=1).contiguous()]

    def to_hf(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        parts = ts[0].chunk(n_parts, dim=1)  # (E, rows, cols) each
        return [p[e].contiguous() for p in parts for e in range(n_experts)]

    return Rule(keys, [fused], to_ours, to_hf)


def _expert_rules(cfg: DeepseekV2Config) -> list[Rule]:
    E = cfg.n_routed_experts
    per_expert = lambda proj: [f"{L}mlp.experts.{e}.{proj}.weight" for e in range(E)]  # noqa: E731
    gate_up = either(_stack_experts(per_expert("gate_proj") + per_expert("up_proj"), E, M + "experts.gate_up_proj"),
                     rename(L + "mlp.experts.gate_up_proj", M + "experts.gate_up_proj"))
    down = either(_stack_experts(per_expert("down_proj"), E, M + "experts.down_proj"),
                  rename(L + "mlp.experts.down_proj", M + "experts.down_proj"))
    return [gate_up, down]


def keymap(cfg: DeepseekV2Config, hf: dict | None = None) -> KeyMap:
    rules = [rename("model.embed_tokens.weight", "embed.weight"), rename("model.norm.weight", "final_norm.weight"),
             rename(L + "input_layernorm.weight", "layers.{i}.attn_norm.weight"),
             rename(L + "post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight")]
    if not cfg.tie_embeddings:
        rules.append(rename("lm_head.weight", "lm_head.weight"))
    # MLA: (hf name, ours, has a bias with attention_bias)
    attn = [("kv_a_proj_with_mqa", "kv_a_proj", True), ("kv_a_layernorm", "kv_a_norm", False),
            ("kv_b_proj", "kv_b_proj", False), ("o_proj", "o_proj", True)]
    if cfg.q_lora_rank is None:
        attn.append(("q_proj", "q_proj", False))
    else:
        attn += [("q_a_proj", "q_a_proj", True), ("q_a_layernorm", "q_a_norm", False), ("q_b_proj", "q_b_proj", False)]
    for theirs, ours, biased in attn:
        rules.append(rename(L + f"self_attn.{theirs}.weight", A + f"{ours}.weight"))
        if biased and cfg.attention_bias:
            rules.append(rename(L + f"self_attn.{theirs}.bias", A + f"{ours}.bias"))

    dense = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    moe = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    kinds = ("weight", "bias") if cfg.mlp_bias else ("weight",)
    for p in ("gate", "up", "down"):
        for kind in kinds:
            r = rename(L + f"mlp.{p}_proj.{kind}", M + f"{p}_proj.{kind}")
            r.layers = dense
            rules.append(r)
            if cfg.n_shared_experts:
                r = rename(L + f"mlp.shared_experts.{p}_proj.{kind}", M + f"shared_experts.{p}_proj.{kind}")
                r.layers = moe
                rules.append(r)
    if moe:
        moe_rules = [rename(L + "mlp.gate.weight", M + "router.weight"), *_expert_rules(cfg)]
        for r in moe_rules:
            r.layers = moe
        rules += moe_rules
    return KeyMap(rules, cfg.n_layers, ignore=[r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
                                                r"lm_head\.weight" if cfg.tie_embeddings else r"$^"])
