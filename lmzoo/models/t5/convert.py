"""T5 checkpoint keys: transformers' ``T5ForConditionalGeneration`` <-> lmzoo.

Each HF block is a list of sublayers (``layer.0`` self-attention, ``layer.1`` cross-attention in the
decoder, then the feed-forward); the relative position bias lives in block 0's self-attention and is
the stack's ``position_bias`` here. ``encoder.embed_tokens`` / ``decoder.embed_tokens`` are copies of
``shared`` that some writers save; old checkpoints also carry an unused relative bias in the decoder's
first cross-attention, which transformers ignores too.
"""

from __future__ import annotations

from lmzoo.interop.convert import KeyMap, rename
from lmzoo.models.t5.config import T5Config


def _attn(hf: str, ours: str) -> list:
    return [rename(f"{hf}.{p}.weight", f"{ours}.{p}_proj.weight") for p in "qkvo"]


def _ffn(hf: str, ours: str, gated: bool) -> list:  # ours: the layer prefix, ending in "."
    ins = [("wi_0", "gate_proj"), ("wi_1", "up_proj")] if gated else [("wi", "up_proj")]
    return [rename(f"{hf}.DenseReluDense.{a}.weight", f"{ours}mlp.{b}.weight") for a, b in ins + [("wo", "down_proj")]]


def keymap(cfg: T5Config, hf: dict | None = None) -> KeyMap:
    E, e = "encoder.block.{i}.layer.", "encoder.layers.{i}."
    D, d = "decoder.block.{i}.layer.", "decoder_layers.{i}."
    enc = [*_attn(E + "0.SelfAttention", e + "attn"), rename(E + "0.layer_norm.weight", e + "attn_norm.weight"),
           *_ffn(E + "1", e, cfg.gated), rename(E + "1.layer_norm.weight", e + "mlp_norm.weight")]
    dec = [*_attn(D + "0.SelfAttention", d + "attn"), rename(D + "0.layer_norm.weight", d + "attn_norm.weight"),
           *_attn(D + "1.EncDecAttention", d + "cross_attn"), rename(D + "1.layer_norm.weight", d + "cross_norm.weight"),
           *_ffn(D + "2", d, cfg.gated), rename(D + "2.layer_norm.weight", d + "mlp_norm.weight")]
    rules = [
        rename("shared.weight", "embed.weight"),
        rename("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "encoder.position_bias.weight"),
        rename("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "decoder_position_bias.weight"),
        rename("encoder.final_layer_norm.weight", "encoder.final_norm.weight"),
        rename("decoder.final_layer_norm.weight", "decoder_final_norm.weight"),
    ]
    if not cfg.tie_embeddings:
        rules.append(rename("lm_head.weight", "lm_head.weight"))
    ignore = [r"(encoder|decoder)\.embed_tokens\.weight",
              r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"]
    # the encoder and decoder may differ in depth, so each stack's templates expand over its own layers
    layered = [rename(r.hf[0].format(i=i), r.ours[0].format(i=i))
               for templates, n in ((enc, cfg.n_layers), (dec, cfg.n_decoder_layers)) for r in templates for i in range(n)]
    return KeyMap(rules + layered, n_layers=0, ignore=ignore)
