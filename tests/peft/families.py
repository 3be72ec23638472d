"""Tiny transformers decoders for the adapter tests, one per lmzoo decoder family, and the modules
PEFT users name on each (their Hugging Face linears)."""

from __future__ import annotations

import torch

V = 97


def tiny_hf(family: str, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    if family == "llama":  # GQA: 2 kv heads for 4 query heads
        cfg = T.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            rms_norm_eps=1e-5, initializer_range=0.1)
        return T.LlamaForCausalLM(cfg).eval()
    if family == "gpt2":
        cfg = T.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=32, layer_norm_epsilon=1e-5,
                           bos_token_id=1, eos_token_id=1, initializer_range=0.1)
        return T.GPT2LMHeadModel(cfg).eval()
    if family == "bloom":
        cfg = T.BloomConfig(vocab_size=V, hidden_size=64, n_layer=2, n_head=4, layer_norm_epsilon=1e-5,
                            initializer_range=0.1, bos_token_id=1, eos_token_id=1, pad_token_id=0)
        return T.BloomForCausalLM(cfg).eval()
    if family == "chatglm2":  # the GLM layout lmzoo.save writes: gate and up fused in mlp.gate_up_proj
        cfg = T.GlmConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                          rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=None, initializer_range=0.1,
                          attention_bias=True)
        return T.GlmForCausalLM(cfg).eval()
    if family == "deepseek_v2":  # MLA, one dense layer then MoE layers with shared experts
        cfg = T.DeepseekV2Config(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                 num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                                 qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=4, n_shared_experts=1,
                                 num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64,
                                 rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=None, q_lora_rank=None,
                                 topk_method="greedy")
        return T.DeepseekV2ForCausalLM(cfg).eval()
    raise KeyError(family)


# what a PEFT user writes in LoraConfig(target_modules=...) for every attention and MLP projection
HF_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "chatglm2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
    "deepseek_v2": ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
