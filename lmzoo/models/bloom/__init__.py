"""Bloom (BigScience): ALiBi, an embedding LayerNorm, GeLU MLP."""

from lmzoo.models.bloom.config import PRESETS, BloomConfig
from lmzoo.models.bloom.convert import keymap
from lmzoo.models.bloom.model import build
from lmzoo.models.registry import Family

FAMILY = Family(
    name="bloom", shape="causal decoder", config_cls=BloomConfig, build=build, keymap=keymap,
    claims=lambda hf: hf.get("model_type") == "bloom", hf_architecture="BloomForCausalLM", presets=PRESETS,
    hf_sequence_classifier="BloomForSequenceClassification",
    pretrain_objective="causal_lm", width_fields=("d_ff",), cache_free_fields={},  # d_ff is tied to 4·d_model
    description="ALiBi, embedding LayerNorm, tanh-GeLU MLP, per-head fused QKV",
    tokenizer="byte-level BPE", objective="next-token prediction (causal LM)",
    inputs="token embeddings + LayerNorm; ALiBi biases the attention scores",
    gguf="lmzoo.models.bloom.gguf",
)
