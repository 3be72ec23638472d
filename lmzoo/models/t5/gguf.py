"""T5 in GGUF: llama.cpp's ``t5`` architecture, as its converter (``convert_hf_to_gguf.py``, class
``T5Model``) writes a ``T5ForConditionalGeneration``: two stacks, ``enc.blk.N.*`` and ``dec.blk.N.*``,
one token embedding for both, and each stack's relative position bias as ``attn_rel_b`` of its block 0
(llama.cpp falls back to block 0's table in every layer, as transformers does).

What is notable:

- No weight is permuted: T5 has no RoPE. The bias table is stored as transformers keeps it,
  (num_buckets, n_heads) in torch order, which is ggml's {n_head, n_buckets}.
- The head is always written as ``output.weight`` and carries the head scale: llama.cpp's t5 graph
  multiplies the decoder output by the head as it is, with no d_model**-0.5 (T5 v1.0's rescale of a
  tied head), so a v1.0 model is written with ``output = embedding * d_model**-0.5``. The file then
  reads the same in llama.cpp and in transformers (which takes a file with ``output.weight`` as
  untied and unscaled). The converter would leave a tied head out, and llama.cpp's logits would be
  sqrt(d_model) times too large. Read back, such a file is an untied model with ``scale_head=False``:
  the same logits, one more matrix.
- llama.cpp fixes ``max_distance`` at 128 (``llama_relative_position_bucket``), and sizes its per-layer
  device table by the encoder's ``block_count`` (a deeper decoder fails to load): both are refused.
- A gated FFN (``ffn_gate`` present) runs GELU (tanh form, = ``gelu_new``) in llama.cpp, a plain one
  ReLU: only "relu" and "gated-gelu" have an equivalent.
The generic writer/reader is lmzoo/interop/gguf.py.
"""

from __future__ import annotations

import torch

from lmzoo.errors import CheckpointError, ConfigError

ARCH = "t5"

ATTN = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
FFN = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
ENC = {**{f"attn.{a}": f"attn_{b}" for a, b in ATTN.items()}, **FFN, "attn_norm": "attn_norm", "mlp_norm": "ffn_norm"}
DEC = {**ENC, **{f"cross_attn.{a}": f"cross_attn_{b}" for a, b in ATTN.items()}, "cross_norm": "cross_attn_norm"}
TOP = {"embed.weight": "token_embd.weight", "lm_head.weight": "output.weight",
       "encoder.final_norm.weight": "enc.output_norm.weight", "decoder_final_norm.weight": "dec.output_norm.weight",
       "encoder.position_bias.weight": "enc.blk.0.attn_rel_b.weight",
       "decoder_position_bias.weight": "dec.blk.0.attn_rel_b.weight"}
STACKS = {"encoder.layers": ("enc", ENC), "decoder_layers": ("dec", DEC)}


def check(model) -> None:
    cfg = model.config
    if cfg.max_distance != 128:
        raise ConfigError(f"gguf export: t5 max_distance={cfg.max_distance}; llama.cpp's relative position "
                          "buckets are fixed at max_distance 128")
    if cfg.n_decoder_layers > cfg.n_layers:
        raise ConfigError(f"gguf export: t5 with more decoder layers ({cfg.n_decoder_layers}) than encoder layers "
                          f"({cfg.n_layers}); llama.cpp places its layers by block_count and fails to load it")
    if cfg.ffn not in ("relu", "gated-gelu"):
        raise ConfigError(f"gguf export: t5 ffn {cfg.ffn!r} has no llama.cpp equivalent "
                          "(llama.cpp runs ReLU without ffn_gate, GELU with it: 'relu' or 'gated-gelu')")


def metadata(w, cfg) -> None:
    w.add_context_length(cfg.max_positions)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_block_count(cfg.n_layers)
    w.add_decoder_block_count(cfg.n_decoder_layers)
    w.add_head_count(cfg.n_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_relative_attn_buckets_count(cfg.num_buckets)
    w.add_decoder_start_token_id(cfg.decoder_start_token_id)
    w.add_vocab_size(cfg.vocab_size)  # transformers' loader reads it here when the file has no tokens


def gguf_name(name: str) -> str:
    if name in TOP:
        return TOP[name]
    for prefix, (short, table) in STACKS.items():
        if name.startswith(prefix + "."):
            i, _, rest = name[len(prefix) + 1:].partition(".")  # {i}.<module path>.weight
            module, _, kind = rest.rpartition(".")
            if module in table:
                return f"{short}.blk.{i}.{table[module]}.{kind}"
    raise CheckpointError(f"gguf export: no llama.cpp name for the lmzoo tensor {name!r}")


def lmzoo_name(name: str) -> str:
    back = {v: k for k, v in TOP.items()}
    if name in back:
        return back[name]
    parts = name.split(".")  # enc|dec.blk.{i}.<name>.weight
    for prefix, (short, table) in STACKS.items():
        inv = {v: k for k, v in table.items()}
        if parts[0] == short and len(parts) == 5 and parts[1] == "blk" and parts[3] in inv:
            return f"{prefix}.{parts[2]}.{inv[parts[3]]}.{parts[4]}"
    raise CheckpointError(f"unknown GGUF tensor {name!r} for {ARCH}")


def tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp name -> float32 tensor; ``output.weight`` is the head times the head scale."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().cpu()
        if name == "lm_head.weight":
            t = t * model.head_scale  # llama.cpp has no head scale (a copy, also when the head is tied)
        out[gguf_name(name)] = t
    return out


def config(f, shapes: dict):
    """The T5Config of a file. The FFN kind follows from ``ffn_gate`` being there, as in llama.cpp."""
    from lmzoo.models.t5.config import T5Config

    n_heads, d = int(f.arch("attention.head_count")), int(f.arch("embedding_length"))
    if int(f.arch("attention.head_count_kv", n_heads)) != n_heads:
        raise ConfigError(f"{f.path}: t5 with grouped K/V heads is not supported")
    if "output.weight" not in shapes:  # a converter file of a tied head: llama.cpp applies no scale to it
        raise ConfigError(f"{f.path}: a t5 file without output.weight (a tied head) is not supported: whether "
                          "its head is rescaled by d_model**-0.5 is not recorded")
    ids = f.special_ids()
    return T5Config(vocab_size=shapes["token_embd.weight"][0], d_model=d, n_layers=int(f.arch("block_count")),
                    n_decoder_layers=int(f.arch("decoder_block_count", f.arch("block_count"))),
                    n_heads=n_heads, head_dim=int(f.arch("attention.key_length", d // n_heads)),
                    d_ff=int(f.arch("feed_forward_length")), max_positions=int(f.arch("context_length", 512)),
                    norm_eps=float(f.arch("attention.layer_norm_rms_epsilon")),
                    tie_embeddings=False, scale_head=False,
                    ffn="gated-gelu" if "enc.blk.0.ffn_gate.weight" in shapes else "relu",
                    num_buckets=int(f.arch("attention.relative_buckets_count", 32)),
                    decoder_start_token_id=int(f.arch("decoder_start_token_id", ids["pad_token_id"] or 0)),
                    pad_token_id=ids["pad_token_id"] if ids["pad_token_id"] is not None else 0,
                    eos_token_id=ids["eos_token_id"] if ids["eos_token_id"] is not None else 1,
                    bos_token_id=ids["bos_token_id"])


def state(tensors: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """lmzoo state dict; the cross-attention bias some old checkpoints carry (unused) is dropped."""
    return {lmzoo_name(name): w for name, w in tensors.items() if not name.endswith(".cross_attn_rel_b.weight")}
