"""DeepSeek-V2 in GGUF: llama.cpp's ``deepseek2`` architecture, as its converter (``conversion/deepseek.py``,
class ``DeepseekV2Model``) writes a ``DeepseekV2ForCausalLM``.

What is notable:

- MLA is written for llama.cpp's absorbed path: ``kv_b_proj`` (rows per head [k_C | v_C]) is split into
  ``attn_k_b`` = W_UK,hᵀ, (n_heads, d_c, d_h) in torch order, and ``attn_v_b`` = W_UV,h, (n_heads, d_v, d_c);
  no ``attn_kv_b`` (llama.cpp loads only the split pair once ``key_length_mla`` is set). The metadata
  describe the MQA llama.cpp runs over the latent cache: head_count_kv 1, key_length d_c + d_h^R,
  value_length d_c, and the per-head widths as key_length_mla / value_length_mla. Its K cache holds
  (c_KV | k_R) per token, as lmzoo's LatentCache does.
- RoPE: llama.cpp's deepseek2 rope is NORM (adjacent pairs), lmzoo's DeepSeek rope is interleaved:
  nothing is permuted. YaRN is written with ``rope.scaling.yarn_log_multiplier`` = 0.1·mscale_all_dim (the
  converter's legacy factor, divided back by llama.cpp), which puts mscale(s, mscale_all_dim)² in the
  softmax scale as lmzoo's ``mla_softmax_scale`` does.
- The routed experts go as 3-D ``ffn_{gate,up,down}_exps`` (E, rows, cols) in torch order, lmzoo's fused
  gate_up split in two; the router ``ffn_gate_inp`` stays F32 (the converter's rule); shared experts
  ``ffn_*_shexp``; the first ``leading_dense_block_count`` layers keep ``ffn_{gate,up,down}``.
- q_lora_rank is written as 0 for a model without the low-rank query path: llama.cpp requires the key
  unless it takes the model for a Lite one (26 or 27 layers), and 0 selects ``attn_q``.

Refused (llama.cpp computes something else): biases (attention_bias, mlp_bias), an activation other
than silu, rms_norm_eps != 1e-6 (llama.cpp uses it in the latent norms, lmzoo fixes those at 1e-6), MoE
without shared experts (llama.cpp requires ffn_*_shexp), q_lora_rank on 26/27 layers (read as Lite,
q_lora_rank skipped), RoPE scaling other than yarn, yarn without mscale_all_dim or with mscale !=
mscale_all_dim or an explicit attention_factor or truncate=False (llama.cpp assumes DeepSeek's
mscale = mscale_all_dim and derives the attention factor itself), and group-limited routing that
masks groups (llama.cpp scores a group by its top-2 sum, DeepSeek-V3's rule, not by its best expert).
The generic writer/reader is lmzoo/interop/gguf.py.
"""

from __future__ import annotations

import torch

from lmzoo.errors import CheckpointError, ConfigError

ARCH = "deepseek2"
BPE_PRE = "gpt-2"  # the split lmzoo's byte-level BPE was trained with (DeepSeek's own tokenizer is "deepseek-llm")

LAYER = {"attn.q_proj": "attn_q", "attn.q_a_proj": "attn_q_a", "attn.q_a_norm": "attn_q_a_norm",
         "attn.q_b_proj": "attn_q_b", "attn.kv_a_proj": "attn_kv_a_mqa", "attn.kv_a_norm": "attn_kv_a_norm",
         "attn.o_proj": "attn_output", "attn_norm": "attn_norm", "mlp_norm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "mlp.router": "ffn_gate_inp", "mlp.experts.down_proj": "ffn_down_exps",
         **{f"mlp.shared_experts.{p}_proj": f"ffn_{p}_shexp" for p in ("gate", "up", "down")}}
TOP = {"embed.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
LITE_LAYERS = (26, 27)  # llama.cpp's is_lite (also 48 layers with a 128256 vocab): it then skips q_lora_rank


def check(model) -> None:
    cfg, rope, s = model.config, model.config.rope, model.config.rope.scaling
    why = []
    if cfg.attention_bias or cfg.mlp_bias:
        why.append("attention_bias/mlp_bias: llama.cpp's deepseek2 has no bias tensors")
    if cfg.act != "silu":
        why.append(f"act {cfg.act!r}: llama.cpp runs SiLU")
    if cfg.norm_eps != 1e-6:
        why.append(f"norm_eps {cfg.norm_eps}: llama.cpp applies rms_norm_eps to the latent norms too, lmzoo fixes "
                   "those at 1e-6")
    if cfg.n_routed_experts is not None and not cfg.n_shared_experts:
        why.append("n_shared_experts 0: llama.cpp requires the shared-expert tensors in every MoE layer")
    lite = cfg.n_layers in LITE_LAYERS or (cfg.n_layers == 48 and cfg.vocab_size == 128256)
    if cfg.q_lora_rank is not None and lite:
        why.append(f"q_lora_rank with {cfg.n_layers} layers: llama.cpp takes it for a Lite model and skips q_lora_rank")
    if rope.scaling_type not in ("default", "yarn"):
        why.append(f"rope scaling {rope.scaling_type!r}: only yarn has the same softmax scale in llama.cpp")
    elif rope.scaling_type == "yarn" and (not s.get("mscale_all_dim") or s.get("mscale") != s["mscale_all_dim"]
                                          or s.get("attention_factor") is not None or not s.get("truncate", True)):
        why.append("yarn needs mscale = mscale_all_dim set, no attention_factor and truncate (llama.cpp assumes "
                   f"DeepSeek's mscale = mscale_all_dim), got {s}")
    if (cfg.n_routed_experts is not None and cfg.topk_method == "group_limited_greedy"
            and cfg.n_group > 1 and cfg.topk_group < cfg.n_group):
        why.append(f"group_limited_greedy over {cfg.n_group} groups: llama.cpp ranks a group by the sum of its top-2 "
                   "experts (DeepSeek-V3), DeepSeek-V2 by its best one")
    if why:
        raise ConfigError("gguf export: deepseek_v2 " + "; ".join(why))


def _factor(cfg) -> float:
    s = cfg.rope.scaling
    return float(s.get("factor") or cfg.max_positions / float(s["original_max_position_embeddings"]))


def metadata(w, cfg) -> None:
    import gguf

    moe = cfg.n_routed_experts is not None
    w.add_context_length(cfg.max_positions)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace if moe else cfg.n_layers)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)  # 0: the full-rank attn_q (the key is required off the Lite shape)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.d_expert)
    w.add_expert_shared_count(cfg.n_shared_experts)
    if moe:
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.top_k)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        if cfg.norm_topk_prob and cfg.top_k > 1:  # lmzoo leaves one chosen weight as it is
            w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        if cfg.n_group == 1:  # more groups: plain top-k here (check() refused the masking kind)
            w.add_expert_group_count(1)
            w.add_expert_group_used_count(1)
    if cfg.rope.scaling_type == "yarn":
        s = cfg.rope.scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(_factor(cfg))
        w.add_rope_scaling_orig_ctx_len(int(s["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(s.get("beta_fast") or 32))
        w.add_rope_scaling_yarn_beta_slow(float(s.get("beta_slow") or 1))
        w.add_rope_scaling_yarn_log_mul(0.1 * float(s["mscale_all_dim"]))  # llama.cpp divides the 0.1 back


def gguf_name(name: str) -> str:
    if name in TOP:
        return TOP[name]
    parts = name.split(".")  # layers.{i}.<module path>[.weight]
    module = ".".join(parts[2:-1]) if parts[-1] == "weight" else ".".join(parts[2:])
    if parts[0] == "layers" and module in LAYER:
        return f"blk.{parts[1]}.{LAYER[module]}.weight"
    raise CheckpointError(f"gguf export: no llama.cpp name for the lmzoo tensor {name!r}")


def tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp name -> float32 tensor in llama.cpp's layout (kv_b and gate_up split; no ``output`` when tied)."""
    cfg = model.config
    H, nope, v, c = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    out = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().float().cpu()
        blk = f"blk.{name.split('.')[1]}." if name.startswith("layers.") else ""
        if name.endswith(".attn.kv_b_proj.weight"):
            k_b, v_b = t.view(H, nope + v, c).split([nope, v], dim=1)  # (H, d_h, d_c), (H, d_v, d_c)
            out[blk + "attn_k_b.weight"] = k_b.transpose(1, 2).contiguous()  # (H, d_c, d_h): W_UK,hᵀ
            out[blk + "attn_v_b.weight"] = v_b.contiguous()
        elif name.endswith(".mlp.experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)  # (E, d_expert, d) each
            out[blk + "ffn_gate_exps.weight"], out[blk + "ffn_up_exps.weight"] = gate.contiguous(), up.contiguous()
        else:
            out[gguf_name(name)] = t
    return out


def config(f, shapes: dict):
    """The DeepseekV2Config of a file; q_lora_rank and the expert count follow the tensors present."""
    from lmzoo.models.deepseek_v2.config import DeepseekV2Config
    from lmzoo.nn.position import RopeConfig

    key = lambda k, d=None: f.arch(k, d)  # noqa: E731
    if key("attention.key_length_mla") is None:
        raise ConfigError(f"{f.path}: a deepseek2 file without attention.key_length_mla (the legacy unsplit "
                          "attn_kv_b layout) is not supported")
    if any(n.endswith(".exp_probs_b.bias") for n in shapes) or key("expert_gating_func", 1) not in (0, 1):
        raise ConfigError(f"{f.path}: sigmoid gating or expert selection biases (DeepSeek-V3) are not DeepSeek-V2")
    if int(key("expert_group_count", 1)) > 1:
        raise ConfigError(f"{f.path}: expert_group_count {key('expert_group_count')}: llama.cpp's group routing "
                          "(top-2 sums, DeepSeek-V3) is not lmzoo's group_limited_greedy")
    eps = float(key("attention.layer_norm_rms_epsilon"))
    if abs(eps - 1e-6) > 1e-12:
        raise ConfigError(f"{f.path}: rms_norm_eps {eps}: llama.cpp applies it to the latent norms, lmzoo fixes "
                          "those at 1e-6")
    kind, scaling = key("rope.scaling.type"), {}
    if kind == "yarn":
        if not key("rope.scaling.yarn_log_multiplier"):
            raise ConfigError(f"{f.path}: yarn without rope.scaling.yarn_log_multiplier: llama.cpp then scales the "
                              "softmax by mscale² and the rope by mscale, which lmzoo's MLA cannot express")
        m = round(float(key("rope.scaling.yarn_log_multiplier")) / 0.1, 6)
        scaling = dict(factor=float(key("rope.scaling.factor")), mscale=m, mscale_all_dim=m,
                       original_max_position_embeddings=int(key("rope.scaling.original_context_length")),
                       beta_fast=float(key("rope.scaling.yarn_beta_fast", 32.0)),
                       beta_slow=float(key("rope.scaling.yarn_beta_slow", 1.0)))
    elif kind not in (None, "none"):
        raise ConfigError(f"{f.path}: rope scaling {kind!r} is not supported for deepseek2 (only yarn)")
    rope_dim, n_experts = int(key("rope.dimension_count")), key("expert_count")
    return DeepseekV2Config(
        vocab_size=shapes["token_embd.weight"][0], d_model=int(key("embedding_length")),
        n_layers=int(key("block_count")), n_heads=int(key("attention.head_count")),
        d_ff=int(key("feed_forward_length")), max_positions=int(key("context_length")), norm_eps=1e-6,
        tie_embeddings="output.weight" not in shapes,
        q_lora_rank=shapes["blk.0.attn_q_a.weight"][0] if "blk.0.attn_q_a.weight" in shapes else None,
        kv_lora_rank=int(key("attention.kv_lora_rank")), qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=int(key("attention.key_length_mla")) - rope_dim,
        v_head_dim=int(key("attention.value_length_mla")),
        n_routed_experts=int(n_experts) if n_experts else None, n_shared_experts=int(key("expert_shared_count", 0)),
        top_k=int(key("expert_used_count", 1)), d_expert=int(key("expert_feed_forward_length")),
        first_k_dense_replace=int(key("leading_dense_block_count", 0)), topk_method="greedy",
        n_group=1 if key("expert_group_count") else None, topk_group=1 if key("expert_group_used_count") else None,
        routed_scaling_factor=float(key("expert_weights_scale", 1.0)) or 1.0,
        norm_topk_prob=bool(key("expert_weights_norm", False)),
        rope=RopeConfig(theta=float(key("rope.freq_base", 10000.0)), interleaved=True,
                        scaling_type="yarn" if scaling else "default", scaling=scaling),
        **f.special_ids())


def state(tensors: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """lmzoo state dict from llama.cpp's float32 tensors (kv_b and the experts' gate_up joined back)."""
    inv, top = {v: k for k, v in LAYER.items()}, {v: k for k, v in TOP.items()}

    def partner(name, a, b):
        if name.replace(a, b) not in tensors:
            raise CheckpointError(f"GGUF tensor {name!r} without its partner {name.replace(a, b)!r}")
        return tensors[name.replace(a, b)]

    out = {}
    for name, t in tensors.items():
        parts = name.split(".")  # blk.{i}.<name>.weight
        if name in top:
            out[top[name]] = t
            continue
        if parts[0] != "blk" or len(parts) != 4 or parts[3] != "weight":
            raise CheckpointError(f"unknown GGUF tensor {name!r} for {ARCH}")
        kind, p = parts[2], f"layers.{parts[1]}."
        if kind == "attn_k_b":
            k_b, v_b = t.transpose(1, 2), partner(name, "attn_k_b", "attn_v_b")  # (H, d_h, d_c), (H, d_v, d_c)
            out[p + "attn.kv_b_proj.weight"] = torch.cat([k_b, v_b], dim=1).reshape(-1, t.shape[1])
        elif kind == "ffn_gate_exps":
            out[p + "mlp.experts.gate_up_proj"] = torch.cat([t, partner(name, "ffn_gate_", "ffn_up_")], dim=1)
        elif kind == "ffn_gate_up_exps":  # llama.cpp's fused layout, already lmzoo's [gate | up]
            out[p + "mlp.experts.gate_up_proj"] = t
        elif kind in ("attn_v_b", "ffn_up_exps"):
            continue  # joined with its partner above
        elif kind == "ffn_down_exps":
            out[p + "mlp.experts.down_proj"] = t
        elif kind in inv:
            out[p + inv[kind] + ".weight"] = t
        else:
            raise CheckpointError(f"unknown GGUF tensor {name!r} for {ARCH}")
    return out
