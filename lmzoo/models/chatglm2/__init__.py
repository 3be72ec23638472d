"""ChatGLM2, ChatGLM3 and GLM-4 (9B): from transformers' GlmForCausalLM or THUDM's own release."""

from lmzoo.models.chatglm2.config import PRESETS, ChatGLM2Config, claims
from lmzoo.models.chatglm2.convert import keymap
from lmzoo.models.chatglm2.model import build
from lmzoo.models.registry import Family

FAMILY = Family(
    name="chatglm2", shape="causal decoder", config_cls=ChatGLM2Config, build=build, keymap=keymap,
    claims=claims, hf_architecture="GlmForCausalLM", presets=PRESETS,
    hf_sequence_classifier="GlmForSequenceClassification",
    pretrain_objective="causal_lm", width_fields=("d_ff",), cache_free_fields={"d_ff": 32},
    description="partial interleaved RoPE, RMSNorm, SwiGLU, GQA (2 groups), q/k/v bias",
    chat_template="chatglm2",  # ChatGLM3 checkpoints carry <|user|> <|assistant|>, which name chatglm3
    tokenizer="SentencePiece BPE", objective="next-token prediction (GLM's hybrid objective, causal attention)",
    inputs="token embeddings; RoPE on half of each head",
    gguf="lmzoo.models.chatglm2.gguf",
)
