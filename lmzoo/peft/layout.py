"""Which Hugging Face linear each lmzoo linear is part of, read off the family's key map.

PEFT puts one adapter on one *Hugging Face* module, so an lmzoo adapter is laid out per HF linear
(a ``Unit``). Most units are one lmzoo linear under another name (LLaMA's ``self_attn.q_proj`` =
``attn.q_proj``); some are several: GPT-2's ``attn.c_attn`` holds lmzoo's q, k and v stacked,
Bloom's ``query_key_value`` holds them interleaved per head, GLM's ``mlp.gate_up_proj`` holds gate
and up. Nothing here names a family: the rule that converts the weights is run on a probe whose
rows are numbered (``0 .. out-1`` across the lmzoo parts), and the HF tensor it produces says where
every lmzoo row went and whether the HF module stores (in, out) (GPT-2's ``Conv1D``).

On a fused unit, PEFT's adapter is one ``lora_A`` (r, in) and one ``lora_B`` (out_fused, r); the
same delta on lmzoo's parts is a *shared* A and B split by those rows: ΔW_part = B[rows_part] A.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmzoo.errors import LmzooError
from lmzoo.interop.convert import KeyMap, Rule
from lmzoo.quant.linear import QuantLinear


@dataclass(frozen=True)
class Part:
    name: str  # the lmzoo linear, e.g. "layers.0.attn.q_proj"
    rows: torch.Tensor  # (out_part,) long: its rows' positions in the HF weight, in lmzoo's row order


@dataclass(frozen=True)
class Unit:
    hf_name: str | None  # "transformer.h.0.attn.c_attn"; None: the key map gives this linear no HF module
    parts: tuple[Part, ...]
    in_features: int
    out_features: int  # rows of the HF weight (the parts together)
    fan_in_fan_out: bool  # the HF module stores (in, out): GPT-2's Conv1D


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear inside ``model.layers`` (float or quantized), by full name; not the embeddings, not the head."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise LmzooError(f"lora: {type(model).__name__} has no decoder layers (model.layers); "
                         "lmzoo puts adapters on the linears inside them")
    return {f"layers.{i}.{n}": m for i, layer in enumerate(layers) for n, m in layer.named_modules()
            if isinstance(m, (nn.Linear, QuantLinear))}


def model_keymap(model: nn.Module) -> KeyMap:
    """The key map of the checkpoint layout the adapter is for: that of the directory the model was
    loaded from when it has a config.json (ChatGLM2's original vs GLM layout), else the one ``lmzoo.save`` writes."""
    from lmzoo.interop.checkpoint import read_hf_config
    from lmzoo.models.registry import family_of

    fam = family_of(model.config)
    src = getattr(model, "source_directory", None)
    hf = read_hf_config(src) if src is not None and (Path(src) / "config.json").exists() else None
    return fam.keymap(model.config, hf)


def units(model: nn.Module, keymap: KeyMap | None = None) -> list[Unit]:
    """The HF linears of the decoder layers, each with its lmzoo parts, in key-map order; lmzoo linears
    that no rule maps to one HF linear come last, as units of their own with ``hf_name`` None."""
    keymap = keymap or model_keymap(model)
    linears = decoder_linears(model)
    out, covered = [], set()
    for rule in keymap.expanded():
        names = _linear_parts(rule, linears)
        if names is None or covered & set(names):
            continue
        unit = _probe(rule, names, linears)
        if unit is not None:
            out.append(unit)
            covered |= set(names)
    for name, lin in linears.items():
        if name not in covered:
            out.append(Unit(None, (Part(name, torch.arange(lin.out_features)),), lin.in_features, lin.out_features, False))
    return out


def _linear_parts(rule: Rule, linears: dict[str, nn.Module]) -> list[str] | None:
    if len(rule.hf) != 1 or not rule.hf[0].endswith(".weight"):
        return None
    names = [o.removesuffix(".weight") for o in rule.ours]
    if not all(o.endswith(".weight") for o in rule.ours) or not all(n in linears for n in names):
        return None
    if len({linears[n].in_features for n in names}) != 1:
        return None
    return names


def _probe(rule: Rule, names: list[str], linears: dict[str, nn.Module]) -> Unit | None:
    """Run the rule's lmzoo -> HF function on numbered rows; None when the result is no row permutation."""
    outs = [linears[n].out_features for n in names]
    R, width = sum(outs), 1 if sum(outs) > 1 else 2  # width != R: the shape tells (out, in) from (in, out)
    numbered = torch.arange(R, dtype=torch.float64)[:, None].expand(R, width)
    try:
        (hf,) = rule.to_hf([p.contiguous() for p in torch.split(numbered, outs)])
    except Exception:  # a rule that needs the real widths: no row layout to read; such a linear stays unmapped
        return None
    if tuple(hf.shape) == (R, width):
        seq, fan = hf[:, 0], False
    elif tuple(hf.shape) == (width, R):
        seq, fan = hf[0], True
    else:
        return None
    perm = seq.round().long()  # perm[hf_row] = lmzoo row
    if not torch.equal(perm.double(), seq) or not torch.equal(perm.sort().values, torch.arange(R)):
        return None
    where = perm.argsort()  # where[lmzoo_row] = hf_row
    offsets = [0] + torch.tensor(outs).cumsum(0).tolist()
    parts = tuple(Part(n, where[offsets[j]:offsets[j + 1]].clone()) for j, n in enumerate(names))
    return Unit(rule.hf[0].removesuffix(".weight"), parts, linears[names[0]].in_features, R, fan)


# -- choosing units by the names users give ------------------------------------------------------

def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # PEFT's rule for a list of target names


def select(all_units: list[Unit], targets) -> list[tuple[Unit, tuple[Part, ...]]]:
    """The units (and which of their parts) that ``targets`` name.

    ``targets``: None or "all-linear" (every unit), a list of names matched as PEFT matches them
    (the full module name or its last dot-separated components) against both the HF and the lmzoo
    names, or one string taken as a regular expression over the full names. An HF name selects every
    part of its unit; an lmzoo name selects that part only (the others get no delta). Every target
    must match something."""
    if targets is None or targets == "all-linear":
        return [(u, u.parts) for u in all_units]
    if isinstance(targets, str):
        pattern = re.compile(targets)
        test, labels = (lambda name, t: pattern.fullmatch(name) is not None), [targets]
    else:
        labels = list(targets)
        if not labels or not all(isinstance(t, str) and t for t in labels):
            raise LmzooError(f"lora: targets must be a non-empty list of module names, got {targets!r}")
        test = _matches
    hit, chosen = set(), []
    for u in all_units:
        picked = []
        for p in u.parts:
            found = [t for t in labels if (u.hf_name is not None and test(u.hf_name, t)) or test(p.name, t)]
            hit.update(found)
            if found:
                picked.append(p)
        if picked:
            chosen.append((u, tuple(picked)))
    missing = [t for t in labels if t not in hit]
    if missing:
        raise LmzooError(f"lora: target(s) {missing} match no linear of the decoder layers; "
                         f"available: {available_names(all_units)}")
    return chosen


def available_names(all_units: list[Unit]) -> str:
    hf = sorted({u.hf_name.rsplit(".", 1)[-1] for u in all_units if u.hf_name})
    ours = sorted({_in_layer(p.name) for u in all_units for p in u.parts})
    return f"Hugging Face names {hf}, lmzoo names {ours}"


def _in_layer(name: str) -> str:
    return re.sub(r"^layers\.\d+\.", "", name)


def peft_target_modules(all_units: list[Unit], chosen: list[Unit]) -> list[str]:
    """``target_modules`` for adapter_config.json: the chosen units' last name components when those
    select exactly the chosen units under PEFT's matching, else their full HF names."""
    names = {u.hf_name for u in chosen}
    every = [u.hf_name for u in all_units if u.hf_name]
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    if {n for n in every if any(_matches(n, t) for t in short)} == names:
        return short
    return sorted(names)
