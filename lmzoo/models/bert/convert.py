"""BERT checkpoint keys: transformers' ``BertForPreTraining`` / ``BertForMaskedLM`` / ``BertModel`` <-> lmzoo.

With heads the encoder's keys carry the ``bert.`` prefix and the heads sit under ``cls.``; a bare
``BertModel`` (all-MiniLM-L6-v2, sentence-transformers) has neither. Old checkpoints also saved the
``position_ids`` buffer, and the tied MLM decoder (``cls.predictions.decoder.weight``/``.bias``,
copies of the word embedding and of ``cls.predictions.bias``): they are read as such and skipped.
"""

from __future__ import annotations

from lmzoo.interop.convert import KeyMap, rename
from lmzoo.models.bert.config import BertConfig


def _linear(hf: str, ours: str) -> list:
    return [rename(f"{hf}.{p}", f"{ours}.{p}") for p in ("weight", "bias")]


def keymap(cfg: BertConfig, hf: dict | None = None) -> KeyMap:
    P = "bert." if (cfg.mlm_head or cfg.nsp_head) else ""
    H, L = P + "encoder.layer.{i}.", "encoder.layers.{i}."
    rules = [
        rename(P + "embeddings.word_embeddings.weight", "embed.weight"),
        rename(P + "embeddings.token_type_embeddings.weight", "segment_embed.weight"),
        rename(P + "embeddings.position_embeddings.weight", "positions.weight"),
        *_linear(P + "embeddings.LayerNorm", "embed_norm"),
        *_linear(H + "attention.self.query", L + "attn.q_proj"),
        *_linear(H + "attention.self.key", L + "attn.k_proj"),
        *_linear(H + "attention.self.value", L + "attn.v_proj"),
        *_linear(H + "attention.output.dense", L + "attn.o_proj"),
        *_linear(H + "attention.output.LayerNorm", L + "attn_norm"),
        *_linear(H + "intermediate.dense", L + "mlp.up_proj"),
        *_linear(H + "output.dense", L + "mlp.down_proj"),
        *_linear(H + "output.LayerNorm", L + "mlp_norm"),
    ]
    if cfg.pooler:
        rules += _linear(P + "pooler.dense", "pooler")
    ignore = [r"(bert\.)?embeddings\.(position_ids|token_type_ids)"]
    if cfg.mlm_head:
        rules += [*_linear("cls.predictions.transform.dense", "mlm_head.dense"),
                  *_linear("cls.predictions.transform.LayerNorm", "mlm_head.norm"),
                  rename("cls.predictions.bias", "mlm_head.bias")]
        ignore.append(r"cls\.predictions\.decoder\.bias")
        if cfg.tie_embeddings:
            ignore.append(r"cls\.predictions\.decoder\.weight")
        else:
            rules.append(rename("cls.predictions.decoder.weight", "mlm_head.decoder.weight"))
    if cfg.nsp_head:
        rules += _linear("cls.seq_relationship", "nsp_head")
    return KeyMap(rules, cfg.n_layers, ignore=ignore, optional_prefix=P)
