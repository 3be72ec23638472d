"""Model families by name: the one place the families are listed.

Each family's package exposes ``FAMILY``, a ``Family`` record that says how to build it from its
config, how to map its checkpoint keys, which Hugging Face configs it claims, and its presets, plus
what other modules would otherwise branch on its name for: its pretraining objective, which config
fields are widths or stay out of the KV cache, its image preprocessing. A module outside
``lmzoo/models/`` reads these fields; tests/models/test_registry.py refuses family names used there
as dict keys or comparisons.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from torch import nn

from lmzoo.errors import ConfigError

if TYPE_CHECKING:
    from lmzoo.vision.preprocess import ImageProcessor

FAMILY_MODULES = ["gpt2", "llama", "bloom", "chatglm2", "chatglm", "deepseek_v2", "t5", "bert", "vit", "clip"]


@dataclass(frozen=True)
class Family:
    name: str
    shape: str  # "causal decoder" | "prefix decoder" | "encoder-decoder" | "encoder" | "dual encoder"
    config_cls: type
    build: Callable[..., nn.Module]
    keymap: Callable  # (config, hf_config: dict | None) -> KeyMap
    claims: Callable[[dict], bool]  # does this Hugging Face config.json belong to the family?
    hf_architecture: str
    # The name in ``lmzoo.objectives.OBJECTIVES`` of the published pretraining recipe (``lmzoo pretrain``'s
    # default objective; ``objective`` below describes it in words).
    pretrain_objective: str
    # Config fields that scale with d_model when a study changes only the width (``lmzoo compare-archs``:
    # same depth, same shape ratios); a field set to 0 or None there (derived, or switched off) is left alone.
    width_fields: tuple[str, ...]
    # Config fields that never enter the KV cache, each with a small value ``lmzoo kvcache`` may give it for
    # the instance it measures on (tried in order; a field set to 0 or None is left alone). Empty when the
    # model keeps no cache, or when no such field can change on its own (Bloom's d_ff is 4·d_model).
    cache_free_fields: dict[str, int]
    presets: dict = field(default_factory=dict)
    description: str = ""
    # What ``lmzoo zoo --compare`` prints beside what it reads off the configs and the built model:
    tokenizer: str = ""  # e.g. "byte-level BPE", "WordPiece", "SentencePiece unigram"
    objective: str = ""  # the pretraining objective, e.g. "next-token prediction"
    inputs: str = ""  # the input representation, e.g. "token + segment + learned position embeddings"
    # (config, checkpoint keys) -> config: settles what config.json cannot say, e.g. which heads a BERT
    # checkpoint carries or whether a T5 file has its own lm_head; lmzoo.load calls it before building.
    resolve: Callable[[object, set], object] | None = None
    # Decoders: the built-in chat template (lmzoo.tokenizers.chat) the family's chat checkpoints use when the
    # tokenizer has none and its vocabulary names none; "" falls back to ChatML.
    chat_template: str = ""
    # Decoders: transformers' ``<Arch>ForSequenceClassification`` class, the layout a reward model
    # (lmzoo/models/reward.py) is saved in; "" when the family has none (no reward models).
    hf_sequence_classifier: str = ""
    # Decoders: the module that maps the family to llama.cpp's GGUF architecture (``lmzoo.models.<family>.gguf``,
    # its protocol in lmzoo/interop/gguf.py); "" when ``lmzoo export gguf`` cannot write it yet.
    gguf: str = ""
    # Image families: the preprocessing their checkpoints were trained with (``lmzoo.vision.PROCESSORS[name]``).
    image_processor: ImageProcessor | None = None


_cache: dict[str, Family] = {}


def families() -> dict[str, Family]:
    if not _cache:
        for m in FAMILY_MODULES:
            fam = importlib.import_module(f"lmzoo.models.{m}").FAMILY
            _cache[fam.name] = fam
    return _cache


def get_family(name: str) -> Family:
    fams = families()
    if name not in fams:
        raise ConfigError(f"unknown model family '{name}'; known: {sorted(fams)}")
    return fams[name]


def family_for_hf(hf: dict, source: str = "config.json") -> Family:
    for fam in families().values():
        if fam.claims(hf):
            return fam
    raise ConfigError(f"{source}: model_type '{hf.get('model_type')}' is not a family lmzoo knows; "
                      f"known families: {sorted(families())}")


def family_of(config) -> Family:
    """The family whose config class ``config`` is (an instance of)."""
    fams = list(families().values())
    found = [f for f in fams if type(config) is f.config_cls] or [f for f in fams if isinstance(config, f.config_cls)]
    if not found:
        raise ConfigError(f"{type(config).__name__} is no registered family's config; known: {sorted(families())}")
    return found[0]


def presets() -> dict[str, tuple[Family, object]]:
    return {name: (fam, cfg) for fam in families().values() for name, cfg in fam.presets.items()}


def get_preset(name: str):
    p = presets()
    if name not in p:
        raise ConfigError(f"unknown preset '{name}'; known: {sorted(p)}")
    return p[name]
