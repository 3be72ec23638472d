"""ChatGLM-6B (v1, THUDM 2023): the GLM prefix decoder, from THUDM's original release layout."""

from lmzoo.models.chatglm.config import PRESETS, ChatGLMConfig, claims
from lmzoo.models.chatglm.convert import keymap
from lmzoo.models.chatglm.model import build
from lmzoo.models.registry import Family

FAMILY = Family(
    name="chatglm", shape="prefix decoder", config_cls=ChatGLMConfig, build=build, keymap=keymap,
    claims=claims, hf_architecture="ChatGLMModel", presets=PRESETS,
    hf_sequence_classifier="ChatGLMForSequenceClassification",  # no such class exists: lmzoo/models/reward.py
    pretrain_objective="glm", width_fields=("d_ff",), cache_free_fields={"d_ff": 32},
    description="prefix mask ([gMASK] ... <sop>), 2D RoPE, DeepNorm post-LN, GeLU MLP (GeGLU selectable)",
    chat_template="chatglm",  # chat(): [Round i] 问：答：, then [gMASK] <sop> and the answer
    tokenizer="SentencePiece unigram (icetk)", objective="autoregressive blank infilling (GLM: [MASK]/[gMASK] spans)",
    inputs="token embeddings; 2D positions (position id + block position id)",
)
