"""The objectives by name, and what the training loop needs from each: a step function and a batch transform.

    step_fn = make_step_fn("causal_lm", config=cfg)          # (model, batch) -> (loss, metrics)
    transform = make_transform("span_corruption", config=cfg)  # (batch, generator) -> batch, or None

A transform turns packed rows (``input_ids``, ``doc_ids``, ``position_ids``) into what the objective
trains on (masked inputs, corrupted spans, blanks); ``data.Batches`` applies it with a generator
seeded by the batch's position, so it is the same after a resume. Options a transform needs are
read from the model config (vocabulary size, special ids) and the tokenizer (BERT's [MASK], [CLS],
[SEP]); keyword arguments override them.

Which objective a family pretrains with is a field of its registry record (``Family.pretrain_objective``):
the shape does not decide it (BERT's masked LM and ViT's classification are both encoders).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lmzoo.errors import ConfigError, LmzooError
from lmzoo.objectives import causal_lm, classification, glm, masked_lm, sft, span_corruption


def _contrastive_step():
    """CLIP: ``batch = {"input_ids", "pixel_values", "attention_mask"?}``, pair i = (text i, image i)."""
    from lmzoo.objectives.contrastive import symmetric_infonce

    def step_fn(model, batch):
        out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                    attention_mask=batch.get("attention_mask"))
        return symmetric_infonce(out.logits_per_text), {"n_tokens": int(batch["input_ids"].shape[0])}

    return step_fn


def _need(value, what: str, objective: str):
    if value is None:
        raise LmzooError(f"objective '{objective}' needs {what}; pass it (or a config/tokenizer that has it)")
    return value


def _bert_transform(config=None, tokenizer=None, **kw):
    def pick(role, cfg_field=None):
        if role in kw:
            return kw.pop(role)
        if tokenizer is not None and tokenizer.special_id(role.removesuffix("_id")) is not None:
            return tokenizer.special_id(role.removesuffix("_id"))
        return getattr(config, cfg_field, None) if cfg_field else None

    ids = {r: _need(pick(r), f"a {r}", "masked_lm") for r in ("mask_id", "cls_id", "sep_id")}
    pad = pick("pad_id", "pad_token_id")
    vocab = kw.pop("vocab_size", None) or _need(getattr(config, "vocab_size", None), "vocab_size", "masked_lm")
    return masked_lm.make_transform(**ids, pad_id=pad, vocab_size=vocab, **kw)


def _t5_transform(config=None, tokenizer=None, **kw):
    vocab = kw.pop("vocab_size", None) or _need(getattr(config, "vocab_size", None), "vocab_size", "span_corruption")
    eos = kw.pop("eos_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list) else eos
    return span_corruption.make_transform(vocab_size=vocab, eos_id=_need(eos, "an eos id", "span_corruption"), **kw)


def _glm_transform(config=None, tokenizer=None, **kw):
    ids = kw.pop("ids", None) or glm.GLMTokens.from_config(_need(config, "a ChatGLM-6B config", "glm"))
    return glm.make_transform(ids, **kw)


@dataclass(frozen=True)
class Objective:
    name: str
    summary: str
    step: Callable  # (**options) -> step_fn(model, batch) -> (loss, metrics)
    transform: Callable | None = None  # (config=, tokenizer=, **options) -> transform(batch, generator)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in [
    Objective("causal_lm", "next-token prediction (+ MoE balance loss)", causal_lm.make_step_fn),
    Objective("sft", "supervised finetuning: next-token loss on the labelled (assistant) tokens only", sft.make_step_fn),
    Objective("masked_lm", "BERT: 15% masked (80/10/10) + next sentence prediction", lambda **kw: masked_lm.make_step_fn(),
              _bert_transform),
    Objective("span_corruption", "T5: sentinel spans, 15% noise, mean span 3",
              lambda **kw: span_corruption.make_step_fn(), _t5_transform),
    Objective("glm", "GLM blank infilling: [MASK] spans and a [gMASK] suffix, 2D positions",
              lambda **kw: glm.make_step_fn(), _glm_transform),
    Objective("classification", "cross-entropy over classes (ViT)",
              lambda label_smoothing=0.0, **kw: classification.make_step_fn(label_smoothing)),
    Objective("contrastive", "CLIP's symmetric InfoNCE over image-text pairs", lambda **kw: _contrastive_step()),
]}

def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{name}'; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def objective_for(family: str) -> str:
    """The pretraining objective of a registered family (its published recipe)."""
    from lmzoo.models.registry import get_family

    fam = get_family(family)
    if fam.pretrain_objective not in OBJECTIVES:
        raise ConfigError(f"family '{family}': its record names objective '{fam.pretrain_objective}', which is not "
                          f"one of {sorted(OBJECTIVES)}")
    return fam.pretrain_objective


def make_step_fn(objective: str, **options):
    """The loop's ``step_fn(model, batch) -> (loss, metrics)`` for ``objective``."""
    return get_objective(objective).step(**options)


def make_transform(objective: str, config=None, tokenizer=None, **options):
    """The batch transform of ``objective`` (None when the packed rows are used as they are)."""
    obj = get_objective(objective)
    return obj.transform(config=config, tokenizer=tokenizer, **options) if obj.transform else None
