"""GGUF files for the LLaMA family: ``export_gguf`` writes what llama.cpp's own converter
(``convert_hf_to_gguf.py``, class ``LlamaModel``) writes for a ``LlamaForCausalLM``; ``read_gguf``
reads such a file back into an lmzoo model (``lmzoo.load("x.gguf")`` routes here).

What is notable:

- Q/K row permutation. transformers (and lmzoo) rotate the pairs (i, i + d/2) of each head
  ("half-split" RoPE); ggml's LLaMA rope rotates adjacent pairs (2i, 2i + 1). The converter
  reorders the rows of q_proj/k_proj (and their biases) per head so that row 2i is old row i and
  row 2i + 1 is old row i + d/2; attention scores are unchanged because q and k move together.
  ``_permute`` / ``_unpermute`` are that reordering and its inverse. A model already in the
  interleaved layout (``rope.interleaved``) is written as it is.
- Types. f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (``gguf.quants``, pure numpy). 1-D tensors
  and every ``*_norm.weight`` stay F32, as in the converter. A matrix whose rows do not split into
  the quant's 32-element blocks raises ``gguf.QuantError`` and falls back to F16, as the converter
  does ("falling back to F16"); ``export_gguf`` returns which tensors fell back.
- The tokenizer travels in the file (``_vocab``):
  byte-level BPE as ``gpt2`` with its merges and the ``gpt-2`` pre-tokenizer, SentencePiece-style
  byte-fallback BPE (``lmzoo.train_tokenizer("sp-bpe")``, the speedrun's) and SentencePiece
  ``.model`` files as ``llama`` with scores and token types. Anything else is refused before a
  byte is written.
- Writes are atomic: a temporary file beside the target, renamed when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from lmzoo.errors import CheckpointError, ConfigError, LmzooError

ARCHITECTURES = ("llama",)  # the llama.cpp architectures (``general.architecture``) written here


def check_architecture(family: str) -> str:
    """The GGUF architecture of the lmzoo family ``family``; one clear error when it cannot be exported."""
    from lmzoo.models.registry import families

    fam = families().get(family)
    arch = fam.gguf_architecture if fam is not None else ""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"gguf export: architecture {family} is not supported yet (supported: "
                          f"{', '.join(sorted(f.name for f in families().values() if f.gguf_architecture in ARCHITECTURES))})")
    return arch


TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def _gguf():
    try:
        import gguf
    except ImportError as e:  # a declared dependency; only a broken install lacks it
        raise LmzooError(f"GGUF needs the 'gguf' package (pip install gguf): {e}") from e
    return gguf


def _qtype(type: str):
    g = _gguf()
    if type not in TYPES:
        raise ConfigError(f"gguf export: unsupported type {type!r}; supported: {', '.join(TYPES)}")
    qt, ft = g.GGMLQuantizationType, g.LlamaFileType
    return {"f32": (qt.F32, ft.ALL_F32), "f16": (qt.F16, ft.MOSTLY_F16), "bf16": (qt.BF16, ft.MOSTLY_BF16),
            "q8_0": (qt.Q8_0, ft.MOSTLY_Q8_0), "q4_0": (qt.Q4_0, ft.MOSTLY_Q4_0), "q4_1": (qt.Q4_1, ft.MOSTLY_Q4_1),
            "q5_0": (qt.Q5_0, ft.MOSTLY_Q5_0), "q5_1": (qt.Q5_1, ft.MOSTLY_Q5_1)}[type]


# -- the Q/K permutation -----------------------------------------------------------------------
def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Half-split rows -> interleaved rows, per head: (n_heads * hd, ...) with row h*hd + 2i + j
    taken from h*hd + j*hd/2 + i."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (nh, hd/2, 2, ...)


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (nh, 2, hd/2, ...)


# -- tensor names: lmzoo <-> llama.cpp -----------------------------------------------------------
_LAYER = {"attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "attn_norm": "attn_norm", "mlp_norm": "ffn_norm"}
_TOP = {"embed.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def _gguf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")  # layers.{i}.<module path>.<weight|bias>
    if parts[0] == "layers" and ".".join(parts[2:-1]) in _LAYER:
        return f"blk.{parts[1]}.{_LAYER['.'.join(parts[2:-1])]}.{parts[-1]}"
    raise CheckpointError(f"gguf export: no llama.cpp name for the lmzoo tensor {name!r}")


def _lmzoo_name(name: str) -> str:
    back = {v: k for k, v in _TOP.items()}
    if name in back:
        return back[name]
    inv = {v: k for k, v in _LAYER.items()}
    parts = name.split(".")  # blk.{i}.<name>.<weight|bias>
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in inv:
        return f"layers.{parts[1]}.{inv[parts[2]]}.{parts[3]}"
    raise CheckpointError(f"unknown GGUF tensor {name!r} for llama")


def _check_supported(model) -> None:
    family = getattr(type(getattr(model, "config", None)), "family", type(model).__name__)
    check_architecture(family)
    rope = model.config.rope
    if rope.rotary_fraction != 1.0:
        raise ConfigError("gguf export: partial RoPE (rope.rotary_fraction < 1) has no llama.cpp 'llama' equivalent")
    if rope.scaling_type not in ("default", "linear", "yarn", "llama3"):
        raise ConfigError(f"gguf export: RoPE scaling {rope.scaling_type!r} has no llama.cpp equivalent "
                          "(supported: linear, yarn, llama3)")
    if getattr(model, "quantization_config", None) or getattr(model, "decode_fused", False):
        raise ConfigError("gguf export: export the float model (before lmzoo.quantize or fuse_for_decode)")


def _metadata(w, cfg, file_type) -> None:
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
    w.add_file_type(file_type)
    g, s = _gguf(), cfg.rope.scaling
    if cfg.rope.scaling_type == "linear":
        w.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(s["factor"]))
    elif cfg.rope.scaling_type == "yarn":
        w.add_rope_scaling_type(g.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(s["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(s.get("original_max_position_embeddings", cfg.max_positions)))
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast), ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor)):
            if s.get(key) is not None:
                add(float(s[key]))
    # llama3 scaling is a tensor (rope_freqs.weight), written with the weights


def _llama3_rope_factors(cfg) -> torch.Tensor:
    """Per-frequency divisors of LLaMA-3.1's RoPE scaling: what the converter stores as rope_freqs."""
    import math

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


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp name -> float32 tensor in llama.cpp's layout (Q/K permuted; ``output`` absent when tied)."""
    cfg = model.config
    tied = cfg.tie_embeddings
    out = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        t = t.detach().float().cpu()
        if not cfg.rope.interleaved:
            if ".attn.q_proj." in name:
                t = _permute(t, cfg.n_heads)
            elif ".attn.k_proj." in name:
                t = _permute(t, cfg.n_kv_heads)
        out[_gguf_name(name)] = t
    if cfg.rope.scaling_type == "llama3":
        out["rope_freqs.weight"] = _llama3_rope_factors(cfg)
    return out


def tensor_type(name: str, t: torch.Tensor, type: str):
    """(GGML type, data as numpy) of one tensor, with the converter's rules: 1-D and norms F32,
    a row that does not split into whole quant blocks F16."""
    g = _gguf()
    qtype, _ = _qtype(type)
    data = t.numpy()
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = g.GGMLQuantizationType.F32
    try:
        return qtype, g.quants.quantize(data, qtype)
    except g.QuantError:
        return g.GGMLQuantizationType.F16, g.quants.quantize(data, g.GGMLQuantizationType.F16)


def export_gguf(model, tokenizer, path, type: str = "f32") -> dict[str, str]:
    """Write ``model`` (an lmzoo LLaMA) and ``tokenizer`` (an ``lmzoo.Tokenizer`` or None) to ``path``.

    Returns {tensor name: GGML type name} of what was written. Every check (architecture, type,
    tokenizer) runs before the file is opened; the file appears only when complete."""
    g = _gguf()
    _check_supported(model)
    _, file_type = _qtype(type)
    vocab = _vocab(tokenizer, model.config.vocab_size) if tokenizer is not None else None
    path = Path(path)
    if not path.parent.is_dir():
        raise LmzooError(f"gguf export: {path.parent} is not a directory")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    written = {}
    try:
        w = g.GGUFWriter(str(tmp), "llama")
        w.add_name(Path(getattr(model, "source_directory", "") or "lmzoo-llama").name)
        _metadata(w, model.config, file_type)
        if vocab is not None:
            vocab(w)
        for name, t in gguf_tensors(model).items():
            qtype, data = tensor_type(name, t, type)
            w.add_tensor(name, data, raw_dtype=qtype)
            written[name] = qtype.name
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return written


# -- the tokenizer ---------------------------------------------------------------------------------
def _vocab(tok, n_vocab: int):
    """A function that writes ``tok`` into a GGUFWriter; raises (before anything is written) when
    llama.cpp cannot express it."""
    g = _gguf()
    TT = g.TokenType
    n = tok.vocab_size
    if n > n_vocab:
        raise ConfigError(f"gguf export: the tokenizer has {n} tokens, more than the model's vocab_size {n_vocab}")
    specials = set(tok.special_tokens.values())
    kind = getattr(tok.backend, "kind", None)
    if kind == "tokenizers":
        spec = json.loads(tok.backend.tok.to_str())
        model, pre, norm = spec["model"], spec.get("pre_tokenizer") or {}, spec.get("normalizer")
        added = {a["id"]: a for a in spec.get("added_tokens", [])}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        if model["type"] == "BPE" and pre.get("type") == "ByteLevel" and norm is None:
            if pre.get("add_prefix_space") or not pre.get("use_regex", True):
                raise ConfigError("gguf export: a ByteLevel pre-tokenizer with add_prefix_space or without the "
                                  "GPT-2 regex has no llama.cpp pre-tokenizer")
            tokens = [tok.id_to_token(i) for i in range(n)]
            types = [TT.CONTROL if i in specials else TT.USER_DEFINED if i in added else TT.NORMAL for i in range(n)]
            return _writer("gpt2", "gpt-2", tok, tokens, types, n_vocab, merges=merges)
        if model["type"] == "BPE" and model.get("byte_fallback") and _is_metaspace(norm):
            rank = {m.replace(" ", ""): k for k, m in enumerate(merges)}  # token -> the merge that made it
            tokens = [tok.id_to_token(i) for i in range(n)]
            # llama.cpp's SentencePiece tokenizer merges the adjacent pair with the highest score, so a
            # token's score is minus its merge rank: the earliest merge wins, as in BPE
            scores = [-1000.0 if i in specials else -float(rank.get(t, 0)) for i, t in enumerate(tokens)]
            types = [_sp_type(i, t, specials, tok.unk_id) for i, t in enumerate(tokens)]
            return _writer("llama", "default", tok, tokens, types, n_vocab, scores=scores)
        raise ConfigError(f"gguf export: tokenizer {tok.name} ({model['type']}, pre-tokenizer {pre.get('type')}) "
                          "cannot be expressed in GGUF; supported: byte-level BPE (lmzoo's 'bpe'), byte-fallback "
                          "SentencePiece-style BPE ('sp-bpe'), SentencePiece .model files")
    if kind == "sentencepiece" and tok.backend.offset == 0 and not tok.backend.extra:
        sp = tok.backend.sp
        tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        scores = [float(sp.get_score(i)) for i in range(len(tokens))]
        types = [TT.UNKNOWN if sp.is_unknown(i) else TT.CONTROL if sp.is_control(i) else TT.BYTE if sp.is_byte(i)
                 else TT.UNUSED if sp.is_unused(i) else TT.NORMAL for i in range(len(tokens))]
        return _writer("llama", "default", tok, tokens, types, n_vocab, scores=scores)
    raise ConfigError(f"gguf export: tokenizer {tok.name} (engine {kind}) cannot be expressed in GGUF")


def _is_metaspace(norm) -> bool:
    """lmzoo's sp-bpe normalizer: Prepend("▁") then Replace(" ", "▁"): SentencePiece's add_dummy_prefix."""
    subs = (norm or {}).get("normalizers", [])
    return any(s.get("type") == "Prepend" and s.get("prepend") == "▁" for s in subs)


def _sp_type(i, t, specials, unk):
    TT = _gguf().TokenType
    if i == unk:
        return TT.UNKNOWN
    if i in specials:
        return TT.CONTROL
    if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
        return TT.BYTE
    return TT.NORMAL


def _writer(model, pre, tok, tokens, types, n_vocab, merges=None, scores=None):
    TT = _gguf().TokenType
    pad = n_vocab - len(tokens)  # a model padded past its tokenizer: unused tokens, as the converter writes
    tokens = tokens + [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types = [int(t) for t in types] + [int(TT.UNUSED)] * pad
    scores = None if scores is None else scores + [-1000.0] * pad

    def write(w):
        w.add_tokenizer_model(model)
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        if scores is not None:
            w.add_token_scores(scores)
        if merges is not None:
            w.add_token_merges(merges)
        for role, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                          ("pad", w.add_pad_token_id)):
            if tok.special_id(role) is not None:
                add(tok.special_id(role))
        w.add_add_bos_token(bool(tok.bos_id is not None and tok.prefix_ids[:1] == [tok.bos_id]))
        w.add_add_eos_token(bool(tok.eos_id is not None and tok.suffix_ids[-1:] == [tok.eos_id]))
        if model == "llama":
            w.add_add_space_prefix(True)
        if tok.chat_template:
            w.add_chat_template(tok.chat_template)

    return write


# -- import ----------------------------------------------------------------------------------------
def _field(reader, key, default=None):
    f = reader.get_field(key)
    return default if f is None else f.contents()


def read_gguf(path, dtype=torch.float32, attn_kernel: str | None = None):
    """(lmzoo LLaMA model, ``lmzoo.Tokenizer`` or None) from a llama GGUF file. Every stored type
    ``gguf.quants`` dequantizes is read (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, k-quants); the Q/K
    permutation is undone. The tokenizer comes back for ``gpt2`` (byte-level BPE) files; a
    ``llama`` (SentencePiece) vocabulary gives None (its scores do not determine the merges)."""
    import lmzoo
    from lmzoo.interop.checkpoint import as_dtype
    from lmzoo.models.llama.config import LlamaConfig
    from lmzoo.nn.position import RopeConfig

    g = _gguf()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        r = g.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors with its own wording
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported yet (supported: llama)")
    names = {t.name for t in r.tensors}
    if "rope_freqs.weight" in names:
        raise ConfigError(f"{path}: LLaMA-3.1 RoPE factors (rope_freqs.weight) cannot be read back into a config yet")
    a = "llama."
    rope_kind, scaling = {None: "default", "none": "default", "linear": "linear", "yarn": "yarn"}.get(
        _field(r, a + "rope.scaling.type")), {}
    if rope_kind is None:
        raise ConfigError(f"{path}: rope scaling {_field(r, a + 'rope.scaling.type')!r} is not supported")
    if rope_kind != "default":
        scaling["factor"] = float(_field(r, a + "rope.scaling.factor"))
    if rope_kind == "yarn":
        scaling["original_max_position_embeddings"] = int(_field(r, a + "rope.scaling.original_context_length"))
        for key, k in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"), ("attention_factor", "yarn_attn_factor")):
            if _field(r, f"{a}rope.scaling.{k}") is not None:
                scaling[key] = float(_field(r, f"{a}rope.scaling.{k}"))
    embd = next(t for t in r.tensors if t.name == "token_embd.weight")
    n_heads, d = int(_field(r, a + "attention.head_count")), int(_field(r, a + "embedding_length"))
    ids = {role: _field(r, f"tokenizer.ggml.{role}_token_id") for role in ("bos", "eos", "pad")}
    cfg = LlamaConfig(vocab_size=int(embd.shape[1]), d_model=d, n_layers=int(_field(r, a + "block_count")),
                      n_heads=n_heads, n_kv_heads=int(_field(r, a + "attention.head_count_kv", n_heads)),
                      head_dim=int(_field(r, a + "attention.key_length", d // n_heads)),
                      d_ff=int(_field(r, a + "feed_forward_length")), max_positions=int(_field(r, a + "context_length")),
                      norm_eps=float(_field(r, a + "attention.layer_norm_rms_epsilon")),
                      tie_embeddings="output.weight" not in names,
                      attention_bias="blk.0.attn_q.bias" in names, mlp_bias="blk.0.ffn_up.bias" in names,
                      rope=RopeConfig(theta=float(_field(r, a + "rope.freq_base", 10000.0)), scaling_type=rope_kind,
                                      scaling=scaling),
                      bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                      attn_kernel=attn_kernel or "sdpa")
    state = {}
    for t in r.tensors:
        data = g.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        w = torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: the reader maps the file read-only
        if ".attn_q." in t.name:
            w = _unpermute(w, cfg.n_heads)
        elif ".attn_k." in t.name:
            w = _unpermute(w, cfg.n_kv_heads)
        state[_lmzoo_name(t.name)] = w.to(as_dtype(dtype))
    model = lmzoo.build(cfg, device="meta")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    _fill_buffers(model, cfg)
    cfg.dtype = str(as_dtype(dtype)).replace("torch.", "")
    return model.eval(), _read_tokenizer(r)


def _fill_buffers(model, cfg) -> None:
    """Computed (non-persistent) buffers were built on meta; take them from a 1-layer CPU copy."""
    import lmzoo

    small = dict(lmzoo.build(cfg.replace(n_layers=1, vocab_size=1)).named_buffers())
    for name, buf in model.named_buffers():
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner).register_buffer(attr, small[name], persistent=False)


def _read_tokenizer(r):
    from lmzoo.tokenizers import Tokenizer
    from lmzoo.tokenizers.backends import TokenizersBackend

    if _field(r, "tokenizer.ggml.model") != "gpt2":
        return None
    from tokenizers import AddedToken, Tokenizer as HF, decoders, models, pre_tokenizers, processors

    TT = _gguf().TokenType
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != TT.UNUSED}
    hf = HF(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i in range(len(tokens)) if types[i] == TT.CONTROL])
    roles = {role: tokens[i] for role in ("bos", "eos", "unk", "pad")
             if (i := _field(r, f"tokenizer.ggml.{role}_token_id")) is not None}
    prefix = [roles["bos"]] if _field(r, "tokenizer.ggml.add_bos_token") and "bos" in roles else []
    return Tokenizer(TokenizersBackend(hf, "<gguf>"), roles=roles, prefix=prefix,
                     chat_template=_field(r, "tokenizer.chat_template"), name="gguf-gpt2")
