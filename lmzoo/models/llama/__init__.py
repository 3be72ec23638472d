"""LLaMA-2 and LLaMA-3."""

from lmzoo.models.llama.config import PRESETS, LlamaConfig
from lmzoo.models.llama.convert import keymap
from lmzoo.models.llama.model import build
from lmzoo.models.registry import Family

FAMILY = Family(
    name="llama", shape="causal decoder", config_cls=LlamaConfig, build=build, keymap=keymap,
    claims=lambda hf: hf.get("model_type") == "llama", hf_architecture="LlamaForCausalLM", presets=PRESETS,
    hf_sequence_classifier="LlamaForSequenceClassification",
    pretrain_objective="causal_lm", width_fields=("d_ff",), cache_free_fields={"d_ff": 32},
    description="RoPE, RMSNorm, SwiGLU, GQA",
    tokenizer="SentencePiece BPE with byte fallback (LLaMA-2); tiktoken byte-level BPE (LLaMA-3)",
    chat_template="llama2",  # LLaMA-3 checkpoints ship their own template (and its header tokens name llama3)
    objective="next-token prediction (causal LM)", inputs="token embeddings; RoPE rotates q and k",
    gguf="lmzoo.models.llama.gguf",
)
