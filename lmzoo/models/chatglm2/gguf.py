"""ChatGLM2 / ChatGLM3 / GLM-4 in GGUF: llama.cpp's ``chatglm`` architecture, as its converter
(``convert_hf_to_gguf.py``, class ``ChatGLMModel``) writes THUDM's release (``ChatGLMModel``).

What is notable:

- q, k and v travel fused as ``attn_qkv`` (weight and bias), rows [all query heads; the kv groups'
  keys; their values]: THUDM's ``query_key_value`` with multi_query_attention, and the offsets
  0, n_heads·hd, (n_heads + n_kv)·hd at which llama.cpp's ``build_qkv`` views the product. Reading
  also takes the separate ``attn_q``/``attn_k``/``attn_v`` the converter writes for a GlmForCausalLM.
- gate and up travel fused as ``ffn_up`` (THUDM's ``dense_h_to_4h``, GlmForCausalLM's ``gate_up_proj``),
  gate rows first: llama.cpp's chatglm graph runs ``LLM_FFN_SWIGLU`` on it alone, silu(first half) ·
  second half. Quantization runs along rows, which neither fusion changes.
- No weight is permuted. llama.cpp gives chatglm ``LLAMA_ROPE_TYPE_NORM``: adjacent pairs (0,1), (2,3),
  ... of the first ``rope.dimension_count`` channels of each head rotate, with frequencies
  base^(-2i/n_rot), the rest pass through: lmzoo's partial interleaved RoPE, rotary_dim = n_rot.
- ``rope.freq_base`` is the model's theta (the converter's 10000·rope_ratio for ChatGLM3-32k / GLM-4).
  ChatGLM2-6B-32k divides the positions by rope_ratio instead (lmzoo's "linear" scaling): it is written
  as ``rope.scaling.type`` linear + factor, which llama.cpp's generic hparams turn into freq_scale
  (the converter writes 10000·rope_ratio for it too, a different model).
- A tied head has no ``output.weight`` (llama.cpp falls back to ``token_embd``); an untied one is written.
- The converter writes no ``attention.key_length``: llama.cpp takes head_dim = embedding_length /
  head_count, and creates ``attn_output`` as (n_embd, n_embd).
- For THUDM's layout the tensors are byte for byte the converter's (F32 and Q8_0). For a
  GlmForCausalLM directory the converter reads only THUDM's key names for three numbers and writes
  context_length = hidden_size, freq_base 10000 (not rope_theta) and eps 1e-5 (not rms_norm_eps);
  lmzoo writes the model's own values.

Refused, because llama.cpp's chatglm graph fixes them: an activation other than SiLU (SwiGLU is fixed),
n_heads·head_dim != d_model (attn_output is square), half-split RoPE (rope.interleaved False: NORM
rotates adjacent pairs), RoPE scaling other than linear. The dropouts are training-only, not written.
The vocabulary goes with the ``gpt-2`` pre-tokenizer for lmzoo's byte-level BPE (the split it uses;
GLM-4's own ``chatglm-bpe`` is a different regex), as ``llama`` for SentencePiece-style vocabularies.
The generic writer/reader is lmzoo/interop/gguf.py.
"""

from __future__ import annotations

import torch

from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.interop.gguf import TensorNames

ARCH = "chatglm"
BPE_PRE = "gpt-2"
SILU = ("silu", "swish")

LAYER = {"attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down", "attn_norm": "attn_norm", "mlp_norm": "ffn_norm"}
QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
TOP = {"embed.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}


def check(model) -> None:
    cfg = model.config
    if cfg.act not in SILU:
        raise ConfigError(f"gguf export: chatglm2 act {cfg.act!r} has no llama.cpp equivalent; its chatglm graph "
                          "runs SwiGLU (act 'silu')")
    if cfg.n_heads * cfg.head_dim != cfg.d_model:
        raise ConfigError(f"gguf export: chatglm2 n_heads·head_dim = {cfg.n_heads * cfg.head_dim} != d_model "
                          f"{cfg.d_model}; llama.cpp's chatglm graph makes attn_output (d_model, d_model)")
    if not cfg.rope.interleaved:
        raise ConfigError("gguf export: chatglm2 rope.interleaved=False has no llama.cpp equivalent; its chatglm "
                          "RoPE rotates adjacent pairs (0,1), (2,3), ...")
    if cfg.rope.scaling_type not in ("default", "linear"):
        raise ConfigError(f"gguf export: chatglm2 RoPE scaling {cfg.rope.scaling_type!r} is not supported "
                          "(supported: linear, ChatGLM2-6B-32k's position interpolation)")


def rotary_dim(cfg) -> int:
    return int(cfg.head_dim * cfg.rope.rotary_fraction)  # as lmzoo's RotaryEmbedding sizes it


def metadata(w, cfg) -> None:
    import gguf

    w.add_context_length(cfg.max_positions)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(rotary_dim(cfg))
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.rope.scaling_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope.scaling["factor"]))


NAMES = TensorNames(ARCH, TOP, LAYER)


def tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp name -> float32 tensor: q|k|v fused into ``attn_qkv``, gate|up into ``ffn_up``."""
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out, fused = {}, set()
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [p + f"{m}.{kind}" for m in QKV]
            if all(k in sd for k in qkv):
                out[f"blk.{i}.attn_qkv.{kind}"] = torch.cat([sd[k] for k in qkv], 0)  # (q + 2·kv, ...)
                fused.update(qkv)
        gate_up = [p + f"{m}.weight" for m in GATE_UP]
        out[f"blk.{i}.ffn_up.weight"] = torch.cat([sd[k] for k in gate_up], 0)  # (2·d_ff, d): gate rows first
        fused.update(gate_up)
    for name, t in sd.items():
        if name in fused or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        out[NAMES.gguf(name)] = t
    return out


def config(f, shapes: dict):
    """The ChatGLM2Config of a file; bias and a tied head follow from which tensors it holds."""
    from lmzoo.models.chatglm2.config import ChatGLM2Config
    from lmzoo.nn.position import RopeConfig

    n_heads, d = int(f.arch("attention.head_count")), int(f.arch("embedding_length"))
    head_dim = int(f.arch("attention.key_length", d // n_heads))
    kind = f.arch("rope.scaling.type")
    if kind not in (None, "none", "linear"):
        raise ConfigError(f"{f.path}: chatglm rope scaling {kind!r} is not supported (supported: linear)")
    factor = float(f.arch("rope.scaling.factor", 1.0) or 1.0)
    scaling = ("linear", {"factor": factor}) if kind == "linear" and factor != 1.0 else ("default", {})
    n_rot = int(f.arch("rope.dimension_count", head_dim))
    max_pos = int(f.arch("context_length"))
    return ChatGLM2Config(vocab_size=shapes["token_embd.weight"][0], d_model=d, n_layers=int(f.arch("block_count")),
                          n_heads=n_heads, n_kv_heads=int(f.arch("attention.head_count_kv", n_heads)),
                          head_dim=head_dim, d_ff=int(f.arch("feed_forward_length")), max_positions=max_pos,
                          norm_eps=float(f.arch("attention.layer_norm_rms_epsilon")),
                          tie_embeddings="output.weight" not in shapes,
                          attention_bias="blk.0.attn_qkv.bias" in shapes or "blk.0.attn_q.bias" in shapes,
                          rope=RopeConfig(theta=float(f.arch("rope.freq_base", 10000.0)),
                                          rotary_fraction=n_rot / head_dim, interleaved=True,
                                          scaling_type=scaling[0], scaling=scaling[1], max_positions=max_pos),
                          **f.special_ids())


def state(tensors: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """lmzoo state dict: ``attn_qkv`` and ``ffn_up`` split back by rows."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {}
    for name, w in tensors.items():
        parts = name.split(".")  # blk.{i}.<name>.<weight|bias>
        t = parts[2] if parts[0] == "blk" and len(parts) == 4 else None
        if t not in ("attn_qkv", "attn_q", "attn_k", "attn_v", "ffn_up"):
            out[NAMES.lmzoo(name)] = w  # the table's names; anything else: "unknown GGUF tensor"
            continue
        p, kind = f"layers.{parts[1]}.", parts[3]
        if t == "attn_qkv":
            if w.shape[0] != q + 2 * kv:
                raise CheckpointError(f"{name}: {w.shape[0]} rows, expected {q} + 2·{kv}")
            for m, part in zip(QKV, w.split([q, kv, kv], 0)):
                out[p + f"{m}.{kind}"] = part
        elif t == "ffn_up":
            for m, part in zip(GATE_UP, w.chunk(2, 0)):
                out[p + f"{m}.{kind}"] = part
        else:  # the separate q/k/v a GlmForCausalLM file holds
            out[p + f"{QKV[('attn_q', 'attn_k', 'attn_v').index(t)]}.{kind}"] = w
    return out
