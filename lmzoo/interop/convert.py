"""The key-map engine every family's ``convert.py`` feeds: one rule table, both directions.

A rule maps some Hugging Face keys to some lmzoo keys, with a function each way. Most rules are
renames; fused tensors (GPT-2's c_attn, Bloom's query_key_value, ChatGLM2's gate+up) are one HF
key to several lmzoo keys. ``{i}`` in a key expands over the layers (or over ``Rule.layers``, e.g.
only the MoE layers). A checkpoint that comes in more than one layout (per-expert or fused expert
tensors) gives a rule ``alternatives`` (``either``): on load the first layout whose keys are all
present is read, on save the primary one is written. Converting fails loudly: a
key the rules expect but the checkpoint lacks, a key the checkpoint has but no rule reads, and a
tensor whose shape the model does not expect all raise ``CheckpointError`` naming file and key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import torch

from lmzoo.errors import CheckpointError

Fn = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _same(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return ts


@dataclass
class Rule:
    hf: Sequence[str]
    ours: Sequence[str]
    to_ours: Fn = _same
    to_hf: Fn = _same
    layers: Sequence[int] | None = None  # the layers ``{i}`` expands over; None: all of them
    alternatives: Sequence["Rule"] = ()  # other layouts of the same lmzoo tensors, read when present


def either(primary: Rule, *others: Rule) -> Rule:
    """``primary`` (the layout ``to_hf`` writes) or, on load, the first of ``others`` whose keys are all
    in the checkpoint; all must fill the same lmzoo keys."""
    for o in others:
        if list(o.ours) != list(primary.ours):
            raise ValueError(f"alternative rule fills {list(o.ours)}, the primary {list(primary.ours)}")
    return replace(primary, alternatives=list(others))


def rename(hf: str, ours: str) -> Rule:
    return Rule([hf], [ours])


def transposed(hf: str, ours: str) -> Rule:
    """GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in)."""
    t = lambda ts: [ts[0].t().contiguous()]  # noqa: E731
    return Rule([hf], [ours], t, t)


def split_rows(hf: str, ours: Sequence[str], sizes: Sequence[int]) -> Rule:
    """One HF tensor whose rows are the lmzoo tensors stacked in order (GPT-2's c_attn bias,
    ChatGLM2's q|k|v and gate|up): checked, then split along dim 0."""
    sizes = list(sizes)

    def split(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        if ts[0].shape[0] != sum(sizes):
            raise CheckpointError(f"tensor '{hf}' has shape {tuple(ts[0].shape)}: its rows cannot split into "
                                  f"{' + '.join(map(str, sizes))} as the config expects")
        return [p.contiguous() for p in torch.split(ts[0], sizes, 0)]

    return Rule([hf], list(ours), split, lambda ts: [torch.cat(ts, 0)])


def per_head(hf: str, ours: Sequence[str], n_heads: int, head_dim: int) -> Rule:
    """One HF tensor fused *per head*: rows (n_heads, len(ours), head_dim) = q0 k0 v0 q1 k1 v1 ...
    (Bloom's and ChatGLM-6B's query_key_value) <-> each part (n_heads·head_dim, ...)."""
    n = len(ours)

    def split(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        t, rest = ts[0], tuple(ts[0].shape[1:])
        if t.shape[0] != n * n_heads * head_dim:
            raise CheckpointError(f"tensor '{hf}' has shape {tuple(t.shape)}, which cannot split into {n} per-head "
                                  f"parts of shape {(n_heads * head_dim, *rest)} ({n_heads} heads of {head_dim})")
        grouped = t.view(n_heads, n, head_dim, *rest)  # (H, n, hd, [d])
        return [grouped[:, j].reshape(n_heads * head_dim, *rest).contiguous() for j in range(n)]

    def merge(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        rest = ts[0].shape[1:]
        grouped = torch.stack([t.view(n_heads, head_dim, *rest) for t in ts], dim=1)  # (H, n, hd, [d])
        return [grouped.reshape(n * n_heads * head_dim, *rest)]

    return Rule([hf], list(ours), split, merge)


class _Prefixed(Mapping):
    """A prefix-less state seen under prefixed names: ``prefix + key`` -> ``src[key]``."""

    def __init__(self, src: Mapping[str, torch.Tensor], prefix: str):
        self.src, self.alias = src, {prefix + k: k for k in src.keys()}

    def __getitem__(self, key):
        return self.src[self.alias[key]]

    def __contains__(self, key):
        return key in self.alias

    def __iter__(self):
        return iter(self.alias)

    def __len__(self):
        return len(self.alias)


def _with_prefix(src: Mapping[str, torch.Tensor], prefix: str) -> Mapping[str, torch.Tensor]:
    if not prefix or any(k.startswith(prefix) for k in src.keys()):
        return src
    return _Prefixed(src, prefix)


@dataclass
class KeyMap:
    rules: list[Rule]
    n_layers: int
    ignore: list[str] = field(default_factory=list)  # regexes of HF keys that carry nothing (buffers)
    # Checkpoints saved from the bare model (GPT2Model, BloomModel, OpenAI's and BigScience's releases)
    # lack the head class's key prefix ("transformer."); with this set, both spellings load.
    optional_prefix: str = ""

    def expanded(self) -> list[Rule]:
        out = []
        for r in self.rules:
            templated = any("{i}" in k for v in (r, *r.alternatives) for k in list(v.hf) + list(v.ours))
            layers = (range(self.n_layers) if r.layers is None else r.layers) if templated else [None]
            out += [_at_layer(r, i) for i in layers]
        return out

    def to_lmzoo(self, src: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size] | None = None,
                 source: str = "checkpoint", where: Callable[[str], str] | None = None) -> dict[str, torch.Tensor]:
        where = where or (lambda k: source)
        src = _with_prefix(src, self.optional_prefix)
        rules = [_present_layout(r, src) for r in self.expanded()]
        missing = [k for r in rules for k in r.hf if k not in src]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            alts = [a.hf[0] for r in rules if any(k not in src for k in r.hf) for a in r.alternatives]
            alt = f"; nor the other layout's keys such as {alts[:2]}" if alts else ""
            raise CheckpointError(f"{source}: missing key(s) {missing[:5]}{more}{alt}")
        used = {k for r in rules for k in r.hf}
        ignored = [re.compile(p) for p in self.ignore]
        extra = [k for k in src.keys() if k not in used and not any(p.fullmatch(k) for p in ignored)]
        if extra:
            more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
            raise CheckpointError(f"{source}: unexpected key(s) {extra[:5]}{more}; "
                                  "they would be silently dropped, so lmzoo refuses the checkpoint")
        out = {}
        for r in rules:
            try:
                tensors = r.to_ours([src[k] for k in r.hf])
            except CheckpointError as e:  # a fused tensor that does not split: say which file holds it
                raise CheckpointError(f"{where(r.hf[0])}: {e}") from e
            for hf_key, k, t in zip(list(r.hf) * len(r.ours), r.ours, tensors):
                if expected is not None:
                    if k not in expected:
                        raise CheckpointError(f"{source}: rule maps '{hf_key}' to '{k}', which the model lacks")
                    if tuple(t.shape) != tuple(expected[k]):
                        raise CheckpointError(f"{where(r.hf[0])}: tensor '{r.hf[0]}' has shape {tuple(src[r.hf[0]].shape)}, "
                                              f"which gives '{k}' shape {tuple(t.shape)}; the config expects {tuple(expected[k])}")
                out[k] = t
        if expected is not None:
            absent = [k for k in expected if k not in out]
            if absent:
                raise CheckpointError(f"{source}: no rule fills model tensor(s) {absent[:5]}")
        return out

    def to_hf(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for r in self.expanded():
            for k, t in zip(r.hf, r.to_hf([state[k] for k in r.ours])):
                out[k] = t
        return out


def _at_layer(r: Rule, i: int | None) -> Rule:
    fmt = (lambda k: k) if i is None else (lambda k: k.format(i=i))
    return Rule([fmt(k) for k in r.hf], [fmt(k) for k in r.ours], r.to_ours, r.to_hf,
                alternatives=[_at_layer(a, i) for a in r.alternatives])


def _present_layout(r: Rule, src: Mapping[str, torch.Tensor]) -> Rule:
    """The rule's first layout whose checkpoint keys are all present (the primary when none is)."""
    return next((v for v in (r, *r.alternatives) if all(k in src for k in v.hf)), r)
