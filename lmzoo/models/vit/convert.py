"""ViT checkpoint keys: transformers' ``ViTModel`` / ``ViTForImageClassification`` <-> lmzoo.

The layout is the one transformers writes (and the Hub's ViTs use): ``encoder.layer.{i}.attention.
attention.query`` ... With a classifier the trunk's keys carry the ``vit.`` prefix; a bare ``ViTModel``
has none. transformers stores the class token as (1, 1, D) and the positions as (1, 1 + N, D); lmzoo
keeps them as (D,) and (1 + N, D), the shapes CLIP's checkpoints use, so both families share one block.
"""

from __future__ import annotations

from lmzoo.interop.convert import KeyMap, Rule, rename
from lmzoo.models.vit.config import ViTConfig


def linear(hf: str, ours: str, bias: bool = True) -> list[Rule]:
    return [rename(f"{hf}.{p}", f"{ours}.{p}") for p in (("weight", "bias") if bias else ("weight",))]


def reshaped(hf: str, ours: str, hf_shape: tuple[int, ...]) -> Rule:
    """One tensor stored with leading singleton dims in the HF file: (1, 1, D) <-> (D,), (1, T, D) <-> (T, D)."""
    return Rule([hf], [ours], lambda ts: [ts[0].reshape(ts[0].shape[len(hf_shape):])],
                lambda ts: [ts[0].reshape(*hf_shape, *ts[0].shape)])


def keymap(cfg: ViTConfig, hf: dict | None = None) -> KeyMap:
    P = "vit." if cfg.num_labels else ""
    H, L = P + "encoder.layer.{i}.", "encoder.layers.{i}."
    E = P + "embeddings."
    rules = [
        reshaped(E + "cls_token", "patches.cls", (1, 1)),
        reshaped(E + "position_embeddings", "patches.positions", (1,)),
        *linear(E + "patch_embeddings.projection", "patches.proj"),
        *linear(H + "attention.attention.query", L + "attn.q_proj", cfg.qkv_bias),
        *linear(H + "attention.attention.key", L + "attn.k_proj", cfg.qkv_bias),
        *linear(H + "attention.attention.value", L + "attn.v_proj", cfg.qkv_bias),
        *linear(H + "attention.output.dense", L + "attn.o_proj"),
        *linear(H + "layernorm_before", L + "attn_norm"),
        *linear(H + "layernorm_after", L + "mlp_norm"),
        *linear(H + "intermediate.dense", L + "mlp.up_proj"),
        *linear(H + "output.dense", L + "mlp.down_proj"),
        *linear(P + "layernorm", "encoder.final_norm"),
    ]
    if cfg.pooler:
        rules += linear(P + "pooler.dense", "pooler")
    if cfg.num_labels:
        rules += linear("classifier", "classifier")
    return KeyMap(rules, cfg.n_layers)
