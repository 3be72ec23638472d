"""CLIP checkpoint keys: transformers' ``CLIPModel`` <-> lmzoo.

Both towers share one layer layout (``encoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``layer_norm1``
before attention, ``layer_norm2`` before the MLP, ``mlp.fc1``/``fc2``) under ``text_model.`` and
``vision_model.``; the towers may have different depths, so each rule names its layers. Files written
before transformers made ``position_ids`` non-persistent still hold those buffers: they are skipped.
"""

from __future__ import annotations

from lmzoo.interop.convert import KeyMap, Rule, rename
from lmzoo.models.clip.config import CLIPConfig
from lmzoo.models.vit.convert import linear


def _layers(hf: str, ours: str, n_layers: int) -> list[Rule]:
    H, L = hf + ".encoder.layers.{i}.", ours + ".encoder.layers.{i}."
    rules = [
        *linear(H + "self_attn.q_proj", L + "attn.q_proj"),
        *linear(H + "self_attn.k_proj", L + "attn.k_proj"),
        *linear(H + "self_attn.v_proj", L + "attn.v_proj"),
        *linear(H + "self_attn.out_proj", L + "attn.o_proj"),
        *linear(H + "layer_norm1", L + "attn_norm"),
        *linear(H + "layer_norm2", L + "mlp_norm"),
        *linear(H + "mlp.fc1", L + "mlp.up_proj"),
        *linear(H + "mlp.fc2", L + "mlp.down_proj"),
    ]
    for r in rules:
        r.layers = range(n_layers)
    return rules


def keymap(cfg: CLIPConfig, hf: dict | None = None) -> KeyMap:
    T, V = "text_model.", "vision_model."
    rules = [
        rename(T + "embeddings.token_embedding.weight", "text.embed.weight"),
        rename(T + "embeddings.position_embedding.weight", "text.positions.weight"),
        *_layers("text_model", "text", cfg.text.n_layers),
        *linear(T + "final_layer_norm", "text.encoder.final_norm"),
        rename(V + "embeddings.class_embedding", "vision.patches.cls"),
        rename(V + "embeddings.patch_embedding.weight", "vision.patches.proj.weight"),
        rename(V + "embeddings.position_embedding.weight", "vision.patches.positions"),
        *linear(V + "pre_layrnorm", "vision.pre_norm"),  # sic: transformers' spelling
        *_layers("vision_model", "vision", cfg.vision.n_layers),
        *linear(V + "post_layernorm", "vision.post_norm"),
        rename("text_projection.weight", "text_projection.weight"),
        rename("visual_projection.weight", "visual_projection.weight"),
        rename("logit_scale", "logit_scale"),
    ]
    return KeyMap(rules, max(cfg.text.n_layers, cfg.vision.n_layers),
                  ignore=[r"(text|vision)_model\.embeddings\.position_ids"])
