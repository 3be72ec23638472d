"""GPT-2 (OpenAI 2019): learned positions, pre-LayerNorm, GeLU MLP, tied head."""

from lmzoo.models.gpt2.config import PRESETS, GPT2Config
from lmzoo.models.gpt2.convert import keymap
from lmzoo.models.gpt2.model import build
from lmzoo.models.registry import Family

FAMILY = Family(
    name="gpt2", shape="causal decoder", config_cls=GPT2Config, build=build, keymap=keymap,
    claims=lambda hf: hf.get("model_type") == "gpt2", hf_architecture="GPT2LMHeadModel", presets=PRESETS,
    hf_sequence_classifier="GPT2ForSequenceClassification",
    pretrain_objective="causal_lm", width_fields=("d_ff",), cache_free_fields={"d_ff": 32},
    description="learned positions, LayerNorm, GeLU MLP, tied head",
    tokenizer="byte-level BPE", objective="next-token prediction (causal LM)",
    inputs="token + learned absolute position embeddings",
    gguf="lmzoo.models.gpt2.gguf",
)
