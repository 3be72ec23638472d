"""LLaMA in GGUF: llama.cpp's ``llama`` architecture, as its converter (``convert_hf_to_gguf.py``,
class ``LlamaModel``) writes a ``LlamaForCausalLM``.

What is notable: the Q/K row permutation (``permute_rotary``: transformers' half-split RoPE pairs
(i, i + d/2) become ggml's adjacent pairs (2i, 2i + 1); scores are unchanged since q and k move
together; a model already interleaved is written as it is), RoPE scaling as metadata keys
(linear, yarn) or as the ``rope_freqs`` tensor (LLaMA-3.1's per-frequency divisors).
The generic writer/reader is lmzoo/interop/gguf.py.
"""

from __future__ import annotations

import math

import torch

from lmzoo.errors import ConfigError
from lmzoo.interop.gguf import TensorNames, permute_rotary, unpermute_rotary

ARCH = "llama"

LAYER = {"attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "attn_norm": "attn_norm", "mlp_norm": "ffn_norm"}
TOP = {"embed.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def check(model) -> None:
    rope = model.config.rope
    if rope.rotary_fraction != 1.0:
        raise ConfigError("gguf export: partial RoPE (rope.rotary_fraction < 1) has no llama.cpp 'llama' equivalent")
    if rope.scaling_type not in ("default", "linear", "yarn", "llama3"):
        raise ConfigError(f"gguf export: RoPE scaling {rope.scaling_type!r} has no llama.cpp equivalent "
                          "(supported: linear, yarn, llama3)")


def metadata(w, cfg) -> None:
    import gguf

    w.add_context_length(cfg.max_positions)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    s = cfg.rope.scaling
    if cfg.rope.scaling_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(s["factor"]))
    elif cfg.rope.scaling_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(s["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(s.get("original_max_position_embeddings", cfg.max_positions)))
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast), ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor)):
            if s.get(key) is not None:
                add(float(s[key]))
    # llama3 scaling is a tensor (rope_freqs.weight), written with the weights


def llama3_rope_factors(cfg) -> torch.Tensor:
    """Per-frequency divisors of LLaMA-3.1's RoPE scaling: what the converter stores as rope_freqs."""
    s, dim = cfg.rope.scaling, cfg.head_dim
    freqs = 1.0 / (cfg.rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = float(s.get("factor", 8.0)), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old = float(s.get("original_max_position_embeddings", 8192))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


NAMES = TensorNames(ARCH, TOP, LAYER)


def tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp name -> float32 tensor in llama.cpp's layout (Q/K permuted; ``output`` absent when tied)."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().float().cpu()
        if not cfg.rope.interleaved:
            if ".attn.q_proj." in name:
                t = permute_rotary(t, cfg.n_heads)
            elif ".attn.k_proj." in name:
                t = permute_rotary(t, cfg.n_kv_heads)
        out[NAMES.gguf(name)] = t
    if cfg.rope.scaling_type == "llama3":
        out["rope_freqs.weight"] = llama3_rope_factors(cfg)
    return out


def config(f, shapes: dict):
    """The LlamaConfig of a file: ``f`` reads metadata (``f.arch("block_count")`` is ``llama.block_count``),
    ``shapes`` maps tensor names to torch shapes."""
    from lmzoo.models.llama.config import LlamaConfig
    from lmzoo.nn.position import RopeConfig

    if "rope_freqs.weight" in shapes:
        raise ConfigError(f"{f.path}: LLaMA-3.1 RoPE factors (rope_freqs.weight) cannot be read back into a config yet")
    kind = f.arch("rope.scaling.type")
    rope_kind, scaling = {None: "default", "none": "default", "linear": "linear", "yarn": "yarn"}.get(kind), {}
    if rope_kind is None:
        raise ConfigError(f"{f.path}: rope scaling {kind!r} is not supported")
    if rope_kind != "default":
        scaling["factor"] = float(f.arch("rope.scaling.factor"))
    if rope_kind == "yarn":
        scaling["original_max_position_embeddings"] = int(f.arch("rope.scaling.original_context_length"))
        for key, k in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"), ("attention_factor", "yarn_attn_factor")):
            if f.arch(f"rope.scaling.{k}") is not None:
                scaling[key] = float(f.arch(f"rope.scaling.{k}"))
    n_heads, d = int(f.arch("attention.head_count")), int(f.arch("embedding_length"))
    return LlamaConfig(vocab_size=shapes["token_embd.weight"][0], d_model=d, n_layers=int(f.arch("block_count")),
                       n_heads=n_heads, n_kv_heads=int(f.arch("attention.head_count_kv", n_heads)),
                       head_dim=int(f.arch("attention.key_length", d // n_heads)),
                       d_ff=int(f.arch("feed_forward_length")), max_positions=int(f.arch("context_length")),
                       norm_eps=float(f.arch("attention.layer_norm_rms_epsilon")),
                       tie_embeddings="output.weight" not in shapes,
                       attention_bias="blk.0.attn_q.bias" in shapes, mlp_bias="blk.0.ffn_up.bias" in shapes,
                       rope=RopeConfig(theta=float(f.arch("rope.freq_base", 10000.0)), scaling_type=rope_kind,
                                       scaling=scaling),
                       **f.special_ids())


def state(tensors: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """lmzoo state dict from llama.cpp's float32 tensors (the Q/K permutation undone)."""
    out = {}
    for name, w in tensors.items():
        if ".attn_q." in name:
            w = unpermute_rotary(w, cfg.n_heads)
        elif ".attn_k." in name:
            w = unpermute_rotary(w, cfg.n_kv_heads)
        out[NAMES.lmzoo(name)] = w
    return out
