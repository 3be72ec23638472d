"""Quantized checkpoints: ``quantization_config`` in config.json, packed tensors in safetensors.

The config is written as transformers writes ``GPTQConfig`` / ``AwqConfig`` / ``BitsAndBytesConfig``
(``quant_method`` gptq | awq | bitsandbytes) and read back into one of the quantized linear classes.

Keys. A family's ``KeyMap`` maps float weights (``model.layers.0.self_attn.q_proj.weight`` <->
``layers.0.attn.q_proj.weight``), with transposes (GPT-2's Conv1D) and fused tensors (GPT-2's
``c_attn``, Bloom's per-head ``query_key_value``) in its rules' functions. A quantized checkpoint
holds ``<module>.qweight``/``qzeros``/``scales``/``g_idx`` (or ``SCB``, ``weight.absmax``...) instead,
which no rule knows. Rather than asking every family for a second table, ``plan`` *runs* each rule
that writes a linear's weight on index tensors: each lmzoo weight filled with the numbers of its own
elements, passed through the rule's ``to_hf``. The result says, for every output row of the
checkpoint's module, which lmzoo module and row it is, and which axis is the input. Packed formats
keep whole output rows together, so a module's tensors can then be split or merged by rows
(``QuantLinear.plain``), and families need no change.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

import lmzoo
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.interop.convert import KeyMap, Rule, _with_prefix
from lmzoo.quant.bnb import Int8Linear, NF4Linear
from lmzoo.quant.calibrate import set_module
from lmzoo.quant.linear import IntLinear, QuantLinear


# -- config.json ------------------------------------------------------------------------------
def hf_quantization_config(spec: dict, floats: FloatLinears | None = None, note: str | None = None) -> dict:
    """``quantization_config`` for a model quantized with ``spec`` (see registry.make_spec); ``floats``
    names the decoder linears left in float (``float_linears``), ``note`` says why (kept in ``meta``)."""
    method, bits, gs = spec["method"], spec["bits"], spec["group_size"]
    meta = {"quantizer": [f"lmzoo:{lmzoo.__version__}"], "method": method}
    if note:
        meta["kept_in_float"] = note
    if method in ("gptq", "rtn"):
        out = {"quant_method": "gptq", "bits": bits, "group_size": gs or -1, "sym": spec["sym"],
               "desc_act": bool(spec.get("desc_act", False)), "damp_percent": spec.get("damp_percent", 0.01),
               "true_sequential": spec.get("true_sequential", True), "static_groups": False,
               "checkpoint_format": "gptq" if spec["sym"] else "gptq_v2", "meta": meta}
        if floats is not None:  # optimum (transformers' loader) reads an allow-list; GPTQModel negative patterns
            out["modules_in_block_to_quantize"] = [floats.quantized]
            out["dynamic"] = {f"-:{floats.pattern(k)}": {} for k in floats.keys}
        return out
    if method == "awq":  # transformers and AutoAWQ both read modules_to_not_convert
        return {"quant_method": "awq", "bits": bits, "group_size": gs or -1, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": floats.keys if floats is not None else None, "meta": meta}
    common = {"quant_method": "bitsandbytes", "llm_int8_skip_modules": None, "llm_int8_enable_fp32_cpu_offload": False,
              "llm_int8_has_fp16_weight": False, "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8"}
    if method == "int8":
        return {**common, "load_in_8bit": True, "load_in_4bit": False, "llm_int8_threshold": spec["threshold"],
                "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}
    if method == "nf4":
        return {**common, "load_in_8bit": False, "load_in_4bit": True, "llm_int8_threshold": 6.0,
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": spec["double_quant"]}
    raise ConfigError(f"no quantization_config is defined for method '{method}'")


def format_from_hf(q: dict, source: str) -> tuple[type[QuantLinear], dict]:
    """The quantized linear class and its spec for a ``quantization_config``."""
    where = f"{source}: quantization_config"
    method = q.get("quant_method")
    if method == "gptq":
        fmt = q.get("checkpoint_format") or q.get("format") or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise ConfigError(f"{where}.checkpoint_format is '{fmt}'; lmzoo reads 'gptq' and 'gptq_v2'")
        return IntLinear, {"bits": _bits(q, where, (2, 4, 8)), "group_size": _group(q), "layout": fmt}
    if method == "awq":
        version = str(q.get("version") or q.get("format") or "gemm").lower()
        if version != "gemm":
            raise ConfigError(f"{where}.version is '{version}'; lmzoo reads AWQ's 'gemm' layout")
        if not q.get("zero_point", True):
            raise ConfigError(f"{where}.zero_point is false; AWQ's GEMM layout stores zero points")
        return IntLinear, {"bits": _bits(q, where, (4,)), "group_size": _group(q), "layout": "awq"}
    if method == "bitsandbytes":
        if q.get("load_in_8bit") or q.get("_load_in_8bit"):
            return Int8Linear, {"threshold": float(q.get("llm_int8_threshold", 6.0))}
        if q.get("load_in_4bit") or q.get("_load_in_4bit"):
            if q.get("bnb_4bit_quant_type", "fp4") != "nf4":
                raise ConfigError(f"{where}.bnb_4bit_quant_type is '{q.get('bnb_4bit_quant_type', 'fp4')}'; "
                                  "lmzoo reads 'nf4'")
            return NF4Linear, {}
        raise ConfigError(f"{where}: neither load_in_8bit nor load_in_4bit is set")
    raise ConfigError(f"{where}.quant_method is '{method}'; lmzoo reads 'gptq', 'awq' and 'bitsandbytes'")


def _bits(q: dict, where: str, allowed: tuple[int, ...]) -> int:
    bits = q.get("bits", q.get("w_bit"))
    if bits not in allowed:
        raise ConfigError(f"{where}.bits is {bits}; lmzoo reads {list(allowed)} for this format")
    return bits


def _group(q: dict) -> int | None:
    gs = q.get("group_size", q.get("q_group_size", -1))
    return None if gs in (None, -1) else int(gs)


def module_spec(m: QuantLinear) -> dict:
    if isinstance(m, IntLinear):
        return {"bits": m.bits, "group_size": m.group_size, "layout": m.layout}
    if isinstance(m, Int8Linear):
        return {"threshold": m.threshold}
    return {"blocksize": m.blocksize}


# -- decoder linears left in float ------------------------------------------------------------
@dataclass
class FloatLinears:
    """The decoder linears a quantized checkpoint holds in float, named as the loaders match them.

    transformers (AWQ) skips a module whose name ends with a ``modules_to_not_convert`` key (or
    matches it as a regex from the start); AutoAWQ skips one whose name *inside its decoder layer*
    contains a key; optimum (transformers' GPTQ loader) converts only modules whose name ends with an
    entry of ``modules_in_block_to_quantize``; GPTQModel skips modules matching a ``-:`` pattern of
    ``dynamic``. Names inside the layer ("mlp.down_proj") serve all four when every layer keeps the
    same ones and they select exactly those; otherwise full checkpoint names (AutoAWQ cannot then
    express it)."""

    keys: list[str]  # the float ones
    quantized: list[str]  # the quantized ones, in the same form
    relative: bool  # names inside the decoder layer, else full checkpoint module names

    def pattern(self, key: str) -> str:
        """A regex (GPTQModel's ``dynamic``, matched from the start) for the modules ``key`` names."""
        return (r"(?:.*\.)?" if self.relative else "") + re.escape(key) + "$"


def _selects(keys: list[str], full: str, inner: str | None) -> bool:
    """Whether any loader's rule (see ``FloatLinears``) takes the module ``full`` for one of ``keys``."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(full.endswith(k) or re.match(rf"(?:{k}){boundary}", full) or (inner is not None and k in inner)
               for k in keys)


def _inner_name(full: str, layer: int) -> str | None:
    """"self_attn.q_proj" for "model.layers.3.self_attn.q_proj" (the first numeric segment is the layer)."""
    segs = full.split(".")
    k = next((j for j, seg in enumerate(segs) if seg.isdigit()), None)
    return ".".join(segs[k + 1:]) if k is not None and int(segs[k]) == layer and k + 1 < len(segs) else None


def float_linears(model: nn.Module) -> FloatLinears | None:
    """Which decoder linears of a quantized ``model`` stay in float, in checkpoint names; None if none."""
    from lmzoo.interop.checkpoint import _keymap
    from lmzoo.quant.calibrate import decoder_layers

    mods = {f"layers.{i}.{n}": m for i, layer in enumerate(decoder_layers(model)) for n, m in layer.named_modules()
            if type(m) is nn.Linear or isinstance(m, QuantLinear)}
    if all(isinstance(m, QuantLinear) for m in mods.values()):
        return None
    modules = []  # (checkpoint name, its layer, quantized?)
    for l in plan(_keymap(model), {n: (m.out_features, m.in_features) for n, m in mods.items()}):
        quantized = {isinstance(mods[n], QuantLinear) for n, _ in l.parts}
        if len(quantized) != 1:  # skip= split a fused module: lmzoo.save refuses the model (``plan``)
            return None
        modules.append((l.hf_module, int(l.parts[0][0].split(".")[1]), quantized.pop()))
    inner = {full: _inner_name(full, i) for full, i, _ in modules}
    if None not in inner.values():
        per_layer: dict[int, set[str]] = {}
        for full, i, q in modules:
            per_layer.setdefault(i, set()).update([] if q else [inner[full]])
        rel_f = sorted(per_layer[min(per_layer)])
        rel_q = list(dict.fromkeys(inner[full] for full, _, q in modules if q))
        if all(sorted(v) == rel_f for v in per_layer.values()) and all(
                _selects(rel_f, full, inner[full]) != q and _selects(rel_q, full, None) == q for full, _, q in modules):
            return FloatLinears(rel_f, rel_q, relative=True)
    return FloatLinears([f for f, _, q in modules if not q], [f for f, _, q in modules if q], relative=False)


def fused_partners(model: nn.Module, names: set[str], candidates: set[str]) -> dict[str, str]:
    """Linears among ``candidates`` that the checkpoint stores in one tensor with one of ``names``
    (GPT-2's ``c_attn`` holds q, k and v): partner -> that checkpoint module."""
    from lmzoo.interop.checkpoint import _keymap

    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if n in candidates}
    out = {}
    for l in plan(_keymap(model), shapes):
        parts = [n for n, _ in l.parts]
        if len(parts) > 1 and set(parts) & names:
            out.update({n: l.hf_module for n in parts if n not in names})
    return out


# -- which checkpoint rows are which module's rows --------------------------------------------
@dataclass
class Link:
    """One checkpoint module whose weight a key-map rule turns into one or more lmzoo linears."""

    hf_module: str
    out_features: int
    in_features: int
    parts: list[tuple[str, list[int]]]  # (lmzoo module, for each of its rows: the checkpoint row)
    rule: Rule

    def identity(self) -> bool:
        return len(self.parts) == 1 and self.parts[0][1] == list(range(self.out_features))


def plan(keymap: KeyMap, shapes: dict[str, tuple[int, int]]) -> list[Link]:
    """A ``Link`` for every rule that writes the weight of a module in ``shapes`` (name -> (out, in))."""
    links = []
    for r in keymap.expanded():
        ours = [k for k in r.ours if k.endswith(".weight") and k[: -len(".weight")] in shapes]
        if not ours:
            continue
        if len(ours) != len(r.ours):
            raise CheckpointError(f"key-map rule {list(r.hf)} -> {list(r.ours)} fuses modules that are not all "
                                  f"quantized ({ours} are); quantize all of them or none (see skip=)")
        if len(r.hf) != 1 or not r.hf[0].endswith(".weight"):
            raise CheckpointError(f"key-map rule {list(r.hf)} -> {list(r.ours)} builds a linear from several "
                                  "checkpoint tensors; lmzoo cannot map its quantized form")
        names = [k[: -len(".weight")] for k in ours]
        sizes = [shapes[n][0] * shapes[n][1] for n in names]
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        index = [torch.arange(s, s + n, dtype=torch.float64).view(shapes[name])
                 for s, n, name in zip(starts, sizes, names)]
        hf = r.to_hf(index)[0]
        links.append(_link(r, names, shapes, starts, hf))
    return links


def _link(r: Rule, names, shapes, starts, hf: torch.Tensor) -> Link:
    where = f"key-map rule {r.hf[0]} -> {list(r.ours)}"
    v = hf.long()
    if hf.ndim != 2 or not torch.equal(v.double(), hf):
        raise CheckpointError(f"{where}: its to_hf is not a rearrangement; quantized rows cannot follow it")
    j = torch.bucketize(v, torch.tensor(starts[1:] + [int(v.max()) + 1]), right=True)  # which lmzoo module
    local = v - torch.tensor(starts)[j]
    ins = torch.tensor([shapes[n][1] for n in names])[j]
    row, col = local // ins, local % ins
    A, B = hf.shape
    if torch.equal(col, torch.arange(B).expand(A, B)):
        in_axis = 1  # (out, in): nn.Linear orientation
    elif torch.equal(col, torch.arange(A)[:, None].expand(A, B)):
        in_axis, j, row = 0, j.t(), row.t()  # (in, out): Conv1D orientation; rows now index outputs
    else:
        raise CheckpointError(f"{where}: it permutes input features; quantized rows cannot follow it")
    if not (torch.equal(j, j[:, :1].expand_as(j)) and torch.equal(row, row[:, :1].expand_as(row))):
        raise CheckpointError(f"{where}: a checkpoint row mixes lmzoo rows; quantized rows cannot follow it")
    j, row = j[:, 0].tolist(), row[:, 0].tolist()
    parts = []
    for k, name in enumerate(names):
        hf_rows = [None] * shapes[name][0]
        for r_hf, (jj, rr) in enumerate(zip(j, row)):
            if jj == k:
                hf_rows[rr] = r_hf
        parts.append((name, hf_rows))
    return Link(r.hf[0][: -len(".weight")], len(j), A if in_axis == 0 else B, parts, r)


def _without(keymap: KeyMap, links: list[Link]) -> KeyMap:
    drop = {(tuple(l.rule.hf), tuple(l.rule.ours)) for l in links}
    return dataclasses.replace(keymap, rules=[r for r in keymap.expanded() if (tuple(r.hf), tuple(r.ours)) not in drop])


def take_rows(p: dict, rows: list[int]) -> dict[str, torch.Tensor]:
    idx = torch.tensor(rows, dtype=torch.long)
    return {k: (t.index_select(ax, idx) if ax is not None else t) for k, (t, ax) in p.items()}


def merge_rows(plains: list[dict], order: list[tuple[int, int]], where: str) -> dict[str, torch.Tensor]:
    """Rows of several modules' plain forms, in ``order`` [(part, row)]; shared tensors must agree."""
    out = {}
    for k, (t0, ax) in plains[0].items():
        if ax is None:
            if not all(k in p and torch.equal(p[k][0], t0) for p in plains):
                raise CheckpointError(f"{where}: the modules fused here have different '{k}' (e.g. desc_act "
                                      "orders or AWQ input scales); they cannot share one checkpoint tensor")
            out[k] = t0
            continue
        offsets = [0]
        for p in plains:
            offsets.append(offsets[-1] + p[k][0].shape[ax])
        cat = torch.cat([p[k][0] for p in plains], ax)
        out[k] = cat.index_select(ax, torch.tensor([offsets[part] + r for part, r in order]))
    return out


# -- load -------------------------------------------------------------------------------------
class _Hidden(Mapping):
    """A state without the tensors the quantized modules consumed."""

    def __init__(self, src: Mapping, hidden: set[str]):
        self.src, self.hidden = src, hidden

    def __getitem__(self, k):
        if k in self.hidden:
            raise KeyError(k)
        return self.src[k]

    def __contains__(self, k):
        return k not in self.hidden and k in self.src

    def __iter__(self):
        return (k for k in self.src.keys() if k not in self.hidden)

    def keys(self):
        return list(iter(self))

    def __len__(self):
        return sum(1 for _ in self)


def prepare_quantized_load(model: nn.Module, keymap: KeyMap, state: Mapping, hf: dict, source: str):
    """Swap the linears the checkpoint holds quantized for quantized modules filled from it.

    Returns the key map without their weight rules, the state without their tensors, and their
    tensors under lmzoo names (to go into ``load_state_dict`` with the rest)."""
    cls, spec = format_from_hf(hf["quantization_config"], f"{source}/config.json")
    state = _with_prefix(state, keymap.optional_prefix)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    links = [l for l in plan(keymap, {n: (m.out_features, m.in_features) for n, m in linears.items()})
             if f"{l.hf_module}.{cls.marker}" in state]
    if not links:
        raise CheckpointError(f"{source}: config.json has a quantization_config ({cls.fmt}) but no module holds "
                              f"'*.{cls.marker}'")
    hidden, quantized = set(), {}
    for l in links:
        tensors = {s: state[f"{l.hf_module}.{s}"] for s in cls.suffixes if f"{l.hf_module}.{s}" in state}
        hidden.update(f"{l.hf_module}.{s}" for s in tensors)
        where = f"{source}: {l.hf_module}"
        first = linears[l.parts[0][0]]
        if l.identity():
            mods = [(l.parts[0][0], cls.from_checkpoint(tensors, l.in_features, l.out_features,
                                                        first.bias is not None, spec, where))]
        else:
            whole = cls.from_checkpoint(tensors, l.in_features, l.out_features, False, spec, where)
            p = whole.plain()
            mods = [(n, cls.from_plain(take_rows(p, rows), module_spec(whole), linears[n].bias is not None))
                    for n, rows in l.parts]
        for name, m in mods:
            set_module(model, name, m)
            quantized.update({f"{name}.{b}": t for b, t in m.named_buffers()})
    model.quantization_config = hf["quantization_config"]
    model.config.hf_extra.pop("quantization_config", None)
    return _without(keymap, links), _Hidden(state, hidden), quantized


# -- save -------------------------------------------------------------------------------------
def quantized_state_for_hf(model: nn.Module, keymap: KeyMap, state: dict) -> dict[str, torch.Tensor]:
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    links = plan(keymap, {n: (m.out_features, m.in_features) for n, m in quant.items()})
    covered = {n for l in links for n, _ in l.parts}
    if covered != set(quant):
        raise CheckpointError(f"no key-map rule writes the quantized module(s) {sorted(set(quant) - covered)[:5]}")
    out = _without(keymap, links).to_hf(state)
    for l in links:
        mods = [quant[n] for n, _ in l.parts]
        where = f"{l.hf_module} (from {[n for n, _ in l.parts]})"
        if len({(type(m), str(module_spec(m))) for m in mods}) != 1:
            raise CheckpointError(f"{where}: the modules fused here are quantized differently")
        if l.identity():
            tensors = mods[0].checkpoint_tensors()
        else:
            order = [None] * l.out_features
            for part, (_, rows) in enumerate(l.parts):
                for r, hf_row in enumerate(rows):
                    order[hf_row] = (part, r)
            merged = merge_rows([m.plain() for m in mods], order, where)
            tensors = type(mods[0]).from_plain(merged, module_spec(mods[0])).checkpoint_tensors()
        out.update({f"{l.hf_module}.{k}": v for k, v in tensors.items()})
    return out
