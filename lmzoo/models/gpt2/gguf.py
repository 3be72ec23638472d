"""GPT-2 in GGUF: llama.cpp's ``gpt2`` architecture, as its converter (``convert_hf_to_gguf.py``, class
``GPT2Model``) writes a ``GPT2LMHeadModel``.

What is notable:

- q, k and v travel fused as ``attn_qkv`` (weight and bias), rows stacked [q; k; v] (llama.cpp's
  ``build_qkv`` views the product at offsets 0, d, 2d). transformers' ``Conv1D`` stores every
  projection as (in, out); the converter transposes ``c_attn``, ``c_proj`` and ``c_fc`` into ggml's
  nn.Linear order. lmzoo's projections are already nn.Linear (convert.py transposed them when the
  checkpoint was read), so the export only concatenates q, k and v: no transpose.
- The learned position table is ``position_embd`` (context_length rows), F32 at every type (the
  converter and llama-quantize never quantize it); every LayerNorm has a bias and takes the one
  ``attention.layer_norm_epsilon``.
- A tied head has no ``output.weight`` (llama.cpp reuses ``token_embd``); an untied one is written.
- ``feed_forward_length`` is the model's d_ff. The converter writes 4·n_embd whatever ``n_inner`` says;
  llama.cpp sizes ``ffn_up``/``ffn_down`` from the key, so an n_inner model runs there only with the
  true width. (transformers' loader drops the key and builds 4·n_embd: give it the config.)
- The vocabulary goes with the ``gpt-2`` pre-tokenizer, the split lmzoo's byte-level BPE uses.
- ``reorder_and_upcast_attn`` changes only mixed-precision numerics and the dropouts are
  training-only: neither is written (a file reads back as False / 0).

Refused, because llama.cpp's gpt2 graph fixes them: an activation other than the tanh GELU
(``ggml_gelu``; llama.cpp's CPU kernel reads it from an F16 table, ~1e-3 relative), an attention scale
other than 1/sqrt(head_dim) (``scale_attn_weights=False``, ``scale_attn_by_inverse_layer_idx=True``).
At import: grouped K/V heads and a head width other than embedding_length / head_count.
The generic writer/reader is lmzoo/interop/gguf.py.
"""

from __future__ import annotations

import numpy as np
import torch

from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.interop.gguf import TensorNames, fused_qkv_tensors, split_qkv_state

ARCH = "gpt2"
BPE_PRE = "gpt-2"
TANH_GELU = ("gelu_new", "gelu_tanh", "gelu_pytorch_tanh")  # lmzoo's names of ggml_gelu's function

LAYER = {"attn.o_proj": "attn_output", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "attn_norm": "attn_norm", "mlp_norm": "ffn_norm"}
QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")
TOP = {"embed.weight": "token_embd.weight", "positions.weight": "position_embd.weight",
       "final_norm.weight": "output_norm.weight", "final_norm.bias": "output_norm.bias",
       "lm_head.weight": "output.weight"}


def check(model) -> None:
    cfg = model.config
    if cfg.act not in TANH_GELU:
        raise ConfigError(f"gguf export: gpt2 act {cfg.act!r} has no llama.cpp equivalent; its gpt2 graph "
                          f"runs the tanh GELU (one of {', '.join(TANH_GELU)})")
    if not cfg.scale_attn_weights:
        raise ConfigError("gguf export: gpt2 scale_attn_weights=False has no llama.cpp equivalent; its gpt2 "
                          "graph scales every score by 1/sqrt(head_dim)")
    if cfg.scale_attn_by_inverse_layer_idx:
        raise ConfigError("gguf export: gpt2 scale_attn_by_inverse_layer_idx=True has no llama.cpp equivalent; "
                          "its gpt2 graph scales every layer's scores by 1/sqrt(head_dim) alone")


def metadata(w, cfg) -> None:
    w.add_context_length(cfg.max_positions)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)  # diff from the converter: it writes 4·n_embd, ignoring n_inner
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)


NAMES = TensorNames(ARCH, TOP, LAYER)


def tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp name -> float32 tensor: q|k|v concatenated into ``attn_qkv``; no ``output`` when tied."""
    return fused_qkv_tensors(model, NAMES, QKV)


def config(f, shapes: dict):
    """The GPT2Config of a file (``f.arch("block_count")`` reads ``gpt2.block_count``); the context is the
    number of ``position_embd`` rows, which llama.cpp requires to equal ``context_length``."""
    from lmzoo.models.gpt2.config import GPT2Config

    n_heads, d = int(f.arch("attention.head_count")), int(f.arch("embedding_length"))
    if int(f.arch("attention.head_count_kv", n_heads)) != n_heads:
        raise ConfigError(f"{f.path}: gpt2 with grouped K/V heads (head_count_kv "
                          f"{f.arch('attention.head_count_kv')} != head_count {n_heads}) is not supported")
    head_dim = int(f.arch("attention.key_length", d // n_heads))
    if head_dim * n_heads != d or int(f.arch("attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"{f.path}: gpt2 head width {head_dim}; lmzoo's GPT-2 has embedding_length / head_count")
    n_pos = shapes["position_embd.weight"][0]
    if int(f.arch("context_length", n_pos)) != n_pos:
        raise CheckpointError(f"{f.path}: gpt2 context_length {f.arch('context_length')} but position_embd has "
                              f"{n_pos} rows")
    return GPT2Config(vocab_size=shapes["token_embd.weight"][0], d_model=d, n_layers=int(f.arch("block_count")),
                      n_heads=n_heads, d_ff=int(f.arch("feed_forward_length", shapes["blk.0.ffn_up.weight"][0])),
                      max_positions=n_pos, norm_eps=_f32(f.arch("attention.layer_norm_epsilon")),
                      tie_embeddings="output.weight" not in shapes, act="gelu_new",
                      **f.special_ids())  # None stays None: GPT2Config's default 50256 belongs to OpenAI's vocab


def _f32(x) -> float:
    """The shortest decimal of a float32 metadata value: 1e-05, not 9.99999975e-06."""
    return float(str(np.float32(x)))


def state(tensors: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """lmzoo state dict from llama.cpp's float32 tensors: ``attn_qkv`` split back into q, k and v."""
    return split_qkv_state(tensors, cfg, NAMES, QKV)
