"""DeepSeek-V2 and DeepSeek-V2-Lite: multi-head latent attention and DeepSeekMoE."""

from lmzoo.models.deepseek_v2.config import PRESETS, DeepseekV2Config
from lmzoo.models.deepseek_v2.convert import keymap
from lmzoo.models.deepseek_v2.model import build
from lmzoo.models.registry import Family

FAMILY = Family(
    name="deepseek_v2", shape="causal decoder", config_cls=DeepseekV2Config, build=build, keymap=keymap,
    claims=lambda hf: hf.get("model_type") == "deepseek_v2", hf_architecture="DeepseekV2ForCausalLM",
    hf_sequence_classifier="DeepseekV2ForSequenceClassification",
    pretrain_objective="causal_lm",
    width_fields=("d_ff", "d_expert", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                  "v_head_dim"),
    cache_free_fields={"d_ff": 32, "d_expert": 16, "q_lora_rank": 16},  # MLA caches only c_KV and the RoPE key
    presets=PRESETS, description="MLA (latent KV cache, decoupled RoPE key), DeepSeekMoE (shared + routed experts), "
                                "yarn RoPE, RMSNorm, SwiGLU",
    tokenizer="byte-level BPE",
    objective="next-token prediction (causal LM) + expert-level balance loss",
    inputs="token embeddings; RoPE rotates only the decoupled 64-wide part of q and k",
    gguf="lmzoo.models.deepseek_v2.gguf",
)
