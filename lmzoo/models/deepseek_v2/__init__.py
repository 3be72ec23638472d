"""DeepSeek-V2 and DeepSeek-V2-Lite: multi-head latent attention and DeepSeekMoE."""

from lmzoo.models.deepseek_v2.config import PRESETS, DeepseekV2Config
from lmzoo.models.deepseek_v2.convert import keymap
from lmzoo.models.deepseek_v2.model import build
from lmzoo.models.registry import Family

FAMILY = Family(
    name="deepseek_v2", shape="causal decoder", config_cls=DeepseekV2Config, build=build, keymap=keymap,
    claims=lambda hf: hf.get("model_type") == "deepseek_v2", hf_architecture="DeepseekV2ForCausalLM",
    presets=PRESETS, description="MLA (latent KV cache, decoupled RoPE key), DeepSeekMoE (shared + routed experts), "
                                "yarn RoPE, RMSNorm, SwiGLU",
    tokenizer="byte-level BPE",
    objective="next-token prediction (causal LM) + expert-level balance loss",
    inputs="token embeddings; RoPE rotates only the decoupled 64-wide part of q and k",
)
