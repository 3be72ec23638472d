"""GGUF files (llama.cpp, Ollama, LM Studio): ``export_gguf`` writes an lmzoo model as llama.cpp's own
converter (``convert_hf_to_gguf.py``) writes the matching transformers model; ``read_gguf`` reads such
a file back into an lmzoo model (``lmzoo.load("x.gguf")`` routes here).

This file is the part every architecture shares; what differs lives with the family, in
``lmzoo/models/<family>/gguf.py`` (named by ``Family.gguf``), a module with:

    ARCH                    llama.cpp's ``general.architecture``
    check(model)            ConfigError for a config llama.cpp cannot run
    metadata(w, cfg)        the ``<arch>.*`` keys (context_length, block_count, ...)
    tensors(model)          {llama.cpp name: float32 tensor in ggml's layout} (permuted, fused, ...)
    config(f, shapes)       the lmzoo config of a file (``f.arch(key)`` reads ``<arch>.<key>``)
    state(tensors, cfg)     {lmzoo name: tensor} from llama.cpp's float32 tensors
    BPE_PRE (optional)      the pre-tokenizer name written for a byte-level BPE vocabulary

What is shared:

- Types. f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (``gguf.quants``, pure numpy). 1-D tensors
  and every ``*_norm.weight`` (and MoE routers, ``ffn_gate_inp``) stay F32, as in the converter.
  A matrix whose rows do not split into the quant's 32-element blocks raises ``gguf.QuantError`` and
  falls back to F16, as the converter does ("falling back to F16"); ``export_gguf`` returns which
  tensors fell back.
- The tokenizer travels in the file (lmzoo/interop/gguf_vocab.py).
- Writes are atomic: a temporary file beside the target, renamed when complete; every check
  (architecture, type, tokenizer) runs before it is opened.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import torch

from lmzoo.errors import CheckpointError, ConfigError, LmzooError

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def _gguf():
    try:
        import gguf
    except ImportError as e:  # a declared dependency; only a broken install lacks it
        raise LmzooError(f"GGUF needs the 'gguf' package (pip install gguf): {e}") from e
    return gguf


# -- which families: the registry's ``Family.gguf`` ---------------------------------------------
def specs() -> dict[str, object]:
    """{family name: its GGUF module} for every family that can be exported."""
    from lmzoo.models.registry import families

    return {f.name: importlib.import_module(f.gguf) for f in families().values() if f.gguf}


def check_architecture(family: str) -> str:
    """The GGUF architecture of the lmzoo family ``family``; one clear error when it cannot be exported."""
    spec = specs().get(family)
    if spec is None:
        raise ConfigError(f"gguf export: the lmzoo family {family} has no llama.cpp architecture to export to "
                          f"(exportable families: {', '.join(sorted(specs()))})")
    return spec.ARCH


def _spec_of_model(model):
    from lmzoo.models.registry import family_of

    cfg = getattr(model, "config", None)
    family = family_of(cfg).name if cfg is not None else type(model).__name__
    check_architecture(family)
    return specs()[family]


def _spec_of_arch(arch: str, path):
    found = [s for s in specs().values() if s.ARCH == arch]
    if not found:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported yet (supported: "
                          f"{', '.join(sorted({s.ARCH for s in specs().values()}))})")
    return found[0]


def _qtype(type: str):
    g = _gguf()
    if type not in TYPES:
        raise ConfigError(f"gguf export: unsupported type {type!r}; supported: {', '.join(TYPES)}")
    qt, ft = g.GGMLQuantizationType, g.LlamaFileType
    return {"f32": (qt.F32, ft.ALL_F32), "f16": (qt.F16, ft.MOSTLY_F16), "bf16": (qt.BF16, ft.MOSTLY_BF16),
            "q8_0": (qt.Q8_0, ft.MOSTLY_Q8_0), "q4_0": (qt.Q4_0, ft.MOSTLY_Q4_0), "q4_1": (qt.Q4_1, ft.MOSTLY_Q4_1),
            "q5_0": (qt.Q5_0, ft.MOSTLY_Q5_0), "q5_1": (qt.Q5_1, ft.MOSTLY_Q5_1)}[type]


# -- shared weight transforms ----------------------------------------------------------------------
def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Half-split rotary rows -> ggml's interleaved rows, per head: (n_heads * hd, ...) with row
    h*hd + 2i + j taken from h*hd + j*hd/2 + i (the converter's ``LlamaModel.permute``)."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (nh, hd/2, 2, ...)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (nh, 2, hd/2, ...)


class TensorNames:
    """Both ways between lmzoo's tensor names and llama.cpp's, from a family's two tables: ``top``
    (whole names: ``embed.weight`` -> ``token_embd.weight``) and ``layer`` (module paths inside a layer:
    ``layers.{i}.attn.o_proj.<kind>`` <-> ``blk.{i}.attn_output.<kind>``, kind = weight or bias)."""

    def __init__(self, arch: str, top: dict[str, str], layer: dict[str, str]):
        self.arch, self.top, self.layer = arch, top, layer
        self.top_back, self.layer_back = {v: k for k, v in top.items()}, {v: k for k, v in layer.items()}

    def gguf(self, name: str) -> str:
        if name in self.top:
            return self.top[name]
        parts = name.split(".")  # layers.{i}.<module path>.<weight|bias>
        module = ".".join(parts[2:-1])
        if parts[0] == "layers" and module in self.layer:
            return f"blk.{parts[1]}.{self.layer[module]}.{parts[-1]}"
        raise CheckpointError(f"gguf export: no llama.cpp name for the lmzoo tensor {name!r}")

    def lmzoo(self, name: str) -> str:
        if name in self.top_back:
            return self.top_back[name]
        parts = name.split(".")  # blk.{i}.<name>.<weight|bias>
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in self.layer_back:
            return f"layers.{parts[1]}.{self.layer_back[parts[2]]}.{parts[3]}"
        raise CheckpointError(f"unknown GGUF tensor {name!r} for {self.arch}")


def fused_qkv_tensors(model, names: TensorNames, qkv: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """llama.cpp name -> float32 tensor, each layer's ``qkv`` projections concatenated into ``attn_qkv``
    rows [q; k; v] (weight and bias, as llama.cpp's ``build_qkv`` views them); no ``output`` when tied."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        parts = name.split(".")
        if parts[0] == "layers" and ".".join(parts[2:-1]) in qkv:
            if ".".join(parts[2:-1]) == qkv[0]:  # written once per layer and kind, from all three
                i, kind = parts[1], parts[-1]
                out[f"blk.{i}.attn_qkv.{kind}"] = torch.cat([state[f"layers.{i}.{p}.{kind}"] for p in qkv])  # (3d, ...)
            continue
        out[names.gguf(name)] = t
    return out


def split_qkv_state(tensors: dict[str, torch.Tensor], cfg, names: TensorNames, qkv: tuple[str, ...]):
    """lmzoo state dict from llama.cpp's float32 tensors, ``attn_qkv`` split back into the ``qkv`` projections."""
    out = {}
    for name, w in tensors.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] == "attn_qkv":
            if w.shape[0] != 3 * cfg.d_model:
                raise CheckpointError(f"GGUF tensor {name!r} has shape {tuple(w.shape)}; expected "
                                      f"({3 * cfg.d_model}, ...) = q|k|v of {cfg.n_heads} heads")
            for proj, part in zip(qkv, w.chunk(3, dim=0)):  # (d, d) or (d,) each
                out[f"layers.{parts[1]}.{proj}.{parts[3]}"] = part.contiguous()
            continue
        out[names.lmzoo(name)] = w
    return out


def tensor_type(name: str, t: torch.Tensor, type: str):
    """(GGML type, data as numpy) of one tensor, with the converter's rules: 1-D and norms F32,
    a row that does not split into whole quant blocks F16."""
    g = _gguf()
    qtype, _ = _qtype(type)
    data = t.numpy()
    # the converter's F32 rules: 1-D tensors, norms, MoE routers, learned position tables (POS_EMBD)
    if data.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name or name == "position_embd.weight":
        qtype = g.GGMLQuantizationType.F32
    try:
        return qtype, g.quants.quantize(data, qtype)
    except g.QuantError:
        return g.GGMLQuantizationType.F16, g.quants.quantize(data, g.GGMLQuantizationType.F16)


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp name -> float32 tensor in llama.cpp's layout, for any exportable family."""
    return _spec_of_model(model).tensors(model)


def export_gguf(model, tokenizer, path, type: str = "f32", kept: dict | None = None) -> dict[str, str]:
    """Write ``model`` (an lmzoo model of an exportable family) and ``tokenizer`` (an ``lmzoo.Tokenizer``
    or None) to ``path``.

    Returns {tensor name: GGML type name} of what was written. A quantized model (``lmzoo.quantize``,
    a GPTQ/AWQ checkpoint) is written as the weights it computes with; ``kept``, when given, is filled
    with {tensor name: True} for the tensors whose codes and scales went into GGUF blocks as they are
    (no second rounding: lmzoo/interop/gguf_blocks.py) and False for those re-quantized. Every check
    (architecture, type, tokenizer) runs before the file is opened; the file appears only when complete."""
    from lmzoo.interop.gguf_blocks import exact_blocks, split_quantized
    from lmzoo.interop.gguf_vocab import vocab_writer

    g = _gguf()
    spec = _spec_of_model(model)
    if getattr(model, "decode_fused", False):
        raise ConfigError("gguf export: export the model as loaded (before fuse_for_decode)")
    spec.check(model)
    block_type, file_type = _qtype(type)
    vocab = (vocab_writer(tokenizer, model.config.vocab_size, getattr(spec, "BPE_PRE", "gpt-2"))
             if tokenizer is not None else None)
    codes = scales = {}
    if getattr(model, "quantization_config", None):
        model, cm, sm = split_quantized(model)
        if cm is not None:
            codes, scales = spec.tensors(cm), spec.tensors(sm)
    tensors = spec.tensors(model)
    path = Path(path)
    if not path.parent.is_dir():
        raise LmzooError(f"gguf export: {path.parent} is not a directory")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    written = {}
    try:
        w = g.GGUFWriter(str(tmp), spec.ARCH)
        w.add_name(Path(getattr(model, "source_directory", "") or f"lmzoo-{spec.ARCH}").name)
        spec.metadata(w, model.config)
        w.add_file_type(file_type)
        if vocab is not None:
            vocab(w)
        for name, t in tensors.items():
            from_codes = name in codes and not torch.isnan(codes[name]).any()  # NaN: not from a quantized layer
            raw = exact_blocks(codes[name], scales[name], type) if from_codes else None
            qtype, data = (block_type, raw) if raw is not None else tensor_type(name, t, type)
            if from_codes and kept is not None:
                kept[name] = raw is not None
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


# -- import ----------------------------------------------------------------------------------------
class Fields:
    """A GGUF file's metadata: ``get("general.name")``, ``arch("block_count")`` = ``<arch>.block_count``."""

    def __init__(self, reader, path):
        self.reader, self.path = reader, path
        self.architecture = self.get("general.architecture")

    def get(self, key, default=None):
        f = self.reader.get_field(key)
        return default if f is None else f.contents()

    def arch(self, key, default=None):
        return self.get(f"{self.architecture}.{key}", default)

    def special_ids(self) -> dict:
        """bos/eos/pad token ids as config fields (``bos_token_id=...``)."""
        return {f"{role}_token_id": self.get(f"tokenizer.ggml.{role}_token_id") for role in ("bos", "eos", "pad")}


def read_gguf(path, dtype=torch.float32, attn_kernel: str | None = None):
    """(lmzoo model, ``lmzoo.Tokenizer`` or None) from a GGUF file of an architecture lmzoo exports.
    Every stored type ``gguf.quants`` dequantizes is read (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1,
    k-quants); the architecture's transforms are undone. The tokenizer comes back for ``gpt2``
    (byte-level BPE) files; a ``llama`` (SentencePiece) vocabulary gives None (its scores do not
    determine the merges)."""
    import lmzoo
    from lmzoo.interop.checkpoint import as_dtype
    from lmzoo.interop.gguf_vocab import read_tokenizer

    g = _gguf()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        r = g.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors with its own wording
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
    f = Fields(r, path)
    spec = _spec_of_arch(f.architecture, path)
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in r.tensors}  # torch order
    cfg = spec.config(f, shapes)
    cfg.attn_kernel = attn_kernel or "sdpa"
    tensors = {}
    for t in r.tensors:
        data = g.quants.dequantize(t.data, t.tensor_type).reshape(shapes[t.name])
        tensors[t.name] = torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: the file is mapped read-only
    state = {k: v.to(as_dtype(dtype)) for k, v in spec.state(tensors, cfg).items()}
    model = lmzoo.build(cfg, device="meta")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(cfg, "tie_embeddings", False) and "lm_head.weight" not in state:
        model.lm_head.weight = model.embed.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}")
    _fill_buffers(model, cfg)
    cfg.dtype = str(as_dtype(dtype)).replace("torch.", "")
    return model.eval(), read_tokenizer(r)


def _fill_buffers(model, cfg) -> None:
    """Computed (non-persistent) buffers were built on meta; take them from a 1-layer CPU copy."""
    import lmzoo

    small = dict(lmzoo.build(cfg.replace(n_layers=1, vocab_size=1)).named_buffers())
    for name, buf in model.named_buffers():
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner).register_buffer(attr, small[name], persistent=False)
