"""The key-map engine every family's ``convert.py`` feeds: one rule table, both directions.

A rule maps some Hugging Face keys to some lmzoo keys, with a function each way. Most rules are
renames; fused tensors (GPT-2's c_attn, Bloom's query_key_value, ChatGLM2's gate+up) are one HF
key to several lmzoo keys. ``{i}`` in a key expands over the layers. Converting fails loudly: a
key the rules expect but the checkpoint lacks, a key the checkpoint has but no rule reads, and a
tensor whose shape the model does not expect all raise ``CheckpointError`` naming file and key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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


def rename(hf: str, ours: str) -> Rule:
    return Rule([hf], [ours])


def transposed(hf: str, ours: str) -> Rule:
    """GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in)."""
    t = lambda ts: [ts[0].t().contiguous()]  # noqa: E731
    return Rule([hf], [ours], t, t)


def split_rows(hf: str, ours: Sequence[str], sizes: Callable[[], Sequence[int]]) -> Rule:
    """One HF tensor whose rows are the lmzoo tensors stacked in order (dim 0)."""
    return Rule([hf], list(ours), lambda ts: [p.contiguous() for p in torch.split(ts[0], list(sizes()), 0)],
                lambda ts: [torch.cat(ts, 0)])


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
            templated = any("{i}" in k for k in list(r.hf) + list(r.ours))
            for i in range(self.n_layers) if templated else [None]:
                fmt = (lambda k: k.format(i=i)) if templated else (lambda k: k)
                out.append(Rule([fmt(k) for k in r.hf], [fmt(k) for k in r.ours], r.to_ours, r.to_hf))
        return out

    def to_lmzoo(self, src: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size] | None = None,
                 source: str = "checkpoint", where: Callable[[str], str] | None = None) -> dict[str, torch.Tensor]:
        where = where or (lambda k: source)
        src = _with_prefix(src, self.optional_prefix)
        rules = self.expanded()
        missing = [k for r in rules for k in r.hf if k not in src]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"{source}: missing key(s) {missing[:5]}{more}")
        used = {k for r in rules for k in r.hf}
        ignored = [re.compile(p) for p in self.ignore]
        extra = [k for k in src.keys() if k not in used and not any(p.fullmatch(k) for p in ignored)]
        if extra:
            more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
            raise CheckpointError(f"{source}: unexpected key(s) {extra[:5]}{more}; "
                                  "they would be silently dropped, so lmzoo refuses the checkpoint")
        out = {}
        for r in rules:
            tensors = r.to_ours([src[k] for k in r.hf])
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
