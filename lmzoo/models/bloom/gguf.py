"""Bloom in GGUF: llama.cpp's ``bloom`` architecture, as its converter (``convert_hf_to_gguf.py``, class
``BloomModel``) writes a ``BloomForCausalLM``.

What is notable:

- q, k and v travel fused as ``attn_qkv`` (weight and bias), stacked [all q; all k; all v], each block
  head-major (row h·hd + i). transformers' ``query_key_value`` interleaves them per head (q0 k0 v0 q1 ...);
  the converter regroups that. lmzoo keeps three projections already in the stacked order
  (convert.py splits per head when it reads the checkpoint), so the export only concatenates them.
- The embedding LayerNorm is ``token_embd_norm``; every LayerNorm in llama.cpp's graph takes the one
  ``attention.layer_norm_epsilon``, as lmzoo's single ``norm_eps`` does.
- ALiBi is not in the file: llama.cpp computes the slopes from the head count with a fixed max bias
  of 8 (``ggml_soft_max_ext``: m0 = 2^(-8/n'), m1 = 2^(-4/n'), n' = the largest power of two <= n_head;
  head h < n' gets m0^(h+1), the rest m1^(2(h-n')+1)). That is Press et al.'s rule for any head
  count, the one ``lmzoo.nn.position.alibi_slopes`` and transformers use, including a count that is
  not a power of two. Its mask holds -|i - j| and the slope multiplies it: the same relative bias as lmzoo.
- A tied head has no ``output.weight`` (llama.cpp reuses ``token_embd``); an untied one is written.
- The vocabulary goes with the ``gpt-2`` pre-tokenizer, not ``bloom``. The converter picks the name by
  hashing the tokenizer, not from the architecture: BigScience's tokenizer splits with
  `` ?[^(\\s|.,!?…。，、।۔،)]+`` (llama.cpp's ``bloom``), but lmzoo's byte-level BPE (and any
  ``ByteLevel(use_regex=True)`` tokenizer) splits with GPT-2's regex, and with ``bloom`` llama.cpp's
  ids differ from lmzoo's wherever a GPT-2 piece holds a merge the bloom split cuts (``."``: bloom
  splits ``.`` from ``"``), see tests/models/bloom/test_gguf.py. BigScience's tokenizer itself (a regex
  Split, then ``ByteLevel(use_regex=False)``) is refused by lmzoo/interop/gguf_vocab.py for now.
- llama.cpp's CPU GELU (tanh form, Bloom's) reads an F16 table at the F16-rounded input, so its
  logits sit ~1e-4..1e-3 from lmzoo's exact GELU; everything else agrees to float32 rounding.
- ``pretraining_tp`` and ``slow_but_exact`` change only how transformers sums the output projection;
  lmzoo and llama.cpp compute the unsliced sum, so they are not written (a file reads back as 1 / False).
  The dropouts are training-only and not written either.

Refused: nothing at export beyond what BloomConfig itself refuses (llama.cpp's graph is exactly
lmzoo's Bloom: d_ff = 4·d_model, multi-head attention, residual before the norm); at import a file with
grouped K/V heads, a feed-forward width other than 4·embedding_length or a head width other than
embedding_length / head_count, which lmzoo's Bloom cannot build.
The generic writer/reader is lmzoo/interop/gguf.py.
"""

from __future__ import annotations

import torch

from lmzoo.errors import ConfigError
from lmzoo.interop.gguf import TensorNames, fused_qkv_tensors, split_qkv_state

ARCH = "bloom"
BPE_PRE = "gpt-2"  # the split lmzoo's byte-level BPE was trained with (see the docstring)

LAYER = {"attn.o_proj": "attn_output", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "attn_norm": "attn_norm", "mlp_norm": "ffn_norm"}
QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")
TOP = {"embed.weight": "token_embd.weight", "embed_norm.weight": "token_embd_norm.weight",
       "embed_norm.bias": "token_embd_norm.bias", "final_norm.weight": "output_norm.weight",
       "final_norm.bias": "output_norm.bias", "lm_head.weight": "output.weight"}


def check(model) -> None:
    """Nothing to refuse: llama.cpp's bloom graph is every model BloomConfig admits (d_ff = 4·d_model,
    n_kv_heads = n_heads, residual before the norm, one eps, ALiBi from the head count)."""


def metadata(w, cfg) -> None:
    w.add_context_length(cfg.max_positions)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_heads)
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)  # transformers' loader reads it here when the file has no tokens


NAMES = TensorNames(ARCH, TOP, LAYER)


def tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp name -> float32 tensor: q|k|v concatenated into ``attn_qkv``; no ``output`` when tied."""
    return fused_qkv_tensors(model, NAMES, QKV)


def config(f, shapes: dict):
    """The BloomConfig of a file (``f.arch("block_count")`` reads ``bloom.block_count``)."""
    from lmzoo.models.bloom.config import BloomConfig

    n_heads, d = int(f.arch("attention.head_count")), int(f.arch("embedding_length"))
    if int(f.arch("attention.head_count_kv", n_heads)) != n_heads:
        raise ConfigError(f"{f.path}: bloom with grouped K/V heads (head_count_kv "
                          f"{f.arch('attention.head_count_kv')} != head_count {n_heads}) is not supported")
    d_ff = int(f.arch("feed_forward_length", 4 * d))
    if d_ff != 4 * d:
        raise ConfigError(f"{f.path}: bloom feed_forward_length {d_ff}; lmzoo's Bloom has "
                          f"4·embedding_length = {4 * d}")
    head_dim = int(f.arch("attention.key_length", d // n_heads))
    if head_dim * n_heads != d or int(f.arch("attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"{f.path}: bloom head width {head_dim}; lmzoo's Bloom has embedding_length / head_count")
    ids = {k: v for k, v in f.special_ids().items() if v is not None}
    return BloomConfig(vocab_size=shapes["token_embd.weight"][0], d_model=d, n_layers=int(f.arch("block_count")),
                       n_heads=n_heads, d_ff=d_ff, max_positions=int(f.arch("context_length", 2048)),
                       norm_eps=float(f.arch("attention.layer_norm_epsilon")),
                       tie_embeddings="output.weight" not in shapes, **ids)


def state(tensors: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """lmzoo state dict from llama.cpp's float32 tensors: ``attn_qkv`` split back into q, k and v."""
    return split_qkv_state(tensors, cfg, NAMES, QKV)
