"""What the calibrated methods share: which linears to quantize, the inputs of every decoder layer,
and how a layer's linears group by the input they read.

Nothing here names a family. The decoder layers are ``model.layers`` (every lmzoo decoder has
them); the linears are the ``nn.Linear`` modules inside them, found by walking the modules; a
layer is run as ``layer(x, *rest, **kw)`` with ``rest``/``kw`` recorded from one real forward of
the model, so whatever the layer's signature (attention inputs, layer index), it sees what the
model would give it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from lmzoo.errors import LmzooError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise LmzooError(f"quantize: {type(model).__name__} has no decoder layers (model.layers); "
                         "lmzoo quantizes the linears inside them")
    return layers


def layer_linears(layer: nn.Module, skip: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """The float ``nn.Linear`` modules of one layer, by their name inside it, minus names matching ``skip``."""
    skip = tuple(skip)
    return {n: m for n, m in layer.named_modules() if type(m) is nn.Linear and not any(s in n for s in skip)}


def quantizable(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """Every linear of every decoder layer, by its full name (``layers.3.mlp.down_proj``); not the
    embeddings and not the head."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        out.update({f"layers.{i}.{n}": m for n, m in layer_linears(layer, skip).items()})
    return out


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def as_batches(calibration, vocab_size: int, method: str) -> list[torch.Tensor]:
    """The calibration iterable as a list of (B, T) long tensors, checked."""
    if calibration is None:
        raise LmzooError(f"quantize: method '{method}' needs calibration data: an iterable of input_ids tensors")
    batches = []
    for i, ids in enumerate(calibration):
        ids = torch.as_tensor(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.is_floating_point:
            raise LmzooError(f"quantize: calibration item {i} must be integer token ids of shape (T,) or (B, T), "
                             f"got {tuple(ids.shape)} {ids.dtype}")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise LmzooError(f"quantize: calibration item {i} holds ids outside the vocabulary [0, {vocab_size})")
        batches.append(ids.long())
    if not batches:
        raise LmzooError(f"quantize: the calibration data is empty; method '{method}' needs at least one batch")
    return batches


class _Stop(Exception):
    """Raised from a hook to end a forward early once what was wanted has been seen."""


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerInputs:
    """Layer 0's hidden states per batch, and every layer's other arguments per batch."""

    hidden: list[torch.Tensor]  # per batch: the input of the layer being processed
    rest: list[list[tuple]] = field(default_factory=list)  # [layer][batch] -> (args after x, kwargs)

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, batches: list[torch.Tensor]) -> "LayerInputs":
        layers = decoder_layers(model)
        hidden, rest = [], [[] for _ in layers]

        def hook(i):
            def pre(_module, args, kwargs):
                if i == 0:
                    hidden.append(args[0])
                rest[i].append((args[1:], kwargs))
                if i == len(layers) - 1:
                    raise _Stop
            return pre

        handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            for ids in batches:
                try:
                    model(ids.to(next(model.parameters()).device))
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        return cls(hidden, rest)

    def run(self, layer: nn.Module, i: int, b: int, x: torch.Tensor | None = None) -> torch.Tensor:
        args, kwargs = self.rest[i][b]
        with torch.no_grad():
            return _first(layer(self.hidden[b] if x is None else x, *args, **kwargs))

    def advance(self, layer: nn.Module, i: int) -> None:
        """Replace the hidden states by layer ``i``'s outputs (as the layer is now)."""
        self.hidden = [self.run(layer, i, b) for b in range(len(self.hidden))]


@torch.no_grad()
def trace_linears(layer: nn.Module, inputs: LayerInputs, i: int, names: list[str]):
    """Run layer ``i`` on batch 0 and report, in call order, groups of linears that read the same
    input tensor (q/k/v; gate/up) together with the submodule whose output that tensor is (or None).
    Linears that batch 0 does not reach are left out (see ``uncalled``).
    """
    mods = dict(layer.named_modules())
    calls: list[tuple[str, torch.Tensor]] = []
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    handles = []
    for n in names:
        handles.append(mods[n].register_forward_pre_hook(lambda m, a, n=n: calls.append((n, a[0]))))
    for n, m in mods.items():
        if n and n not in names:
            handles.append(m.register_forward_hook(
                lambda m, a, out, n=n: produced.__setitem__(id(out), (n, out)) if isinstance(out, torch.Tensor) else None))
    try:
        inputs.run(layer, i, 0)
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[list[str], str | None]] = []
    last = None
    for n, x in calls:
        if n in (g for grp, _ in groups for g in grp):
            continue  # a linear called twice keeps its first group
        if last is not None and x is last:
            groups[-1][0].append(n)
        else:
            producer = produced.get(id(x))
            groups.append(([n], producer[0] if producer is not None and producer[1] is x else None))
        last = x
    return groups


def uncalled(names: list[str], groups) -> list[str]:
    """Linears the calibration forward never reached (e.g. an expert no token was routed to)."""
    seen = {n for grp, _ in groups for n in grp}
    return [n for n in names if n not in seen]


@torch.no_grad()
def feed_linears(layer: nn.Module, inputs: LayerInputs, i: int, names: list[str], on_input,
                 stop_after: str | None = None) -> None:
    """Run every calibration batch through layer ``i``, calling ``on_input(name, x)`` with each named
    linear's (tokens, in_features) input; a batch stops once ``stop_after`` has seen its input."""
    mods = dict(layer.named_modules())

    def pre(n):
        def f(_m, a):
            on_input(n, a[0].reshape(-1, a[0].shape[-1]))
            if n == stop_after:
                raise _Stop  # the rest of the layer is not needed for these linears
        return f

    handles = [mods[n].register_forward_pre_hook(pre(n)) for n in names]
    try:
        for b in range(len(inputs.hidden)):
            try:
                inputs.run(layer, i, b)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_inputs(layer: nn.Module, inputs: LayerInputs, i: int, names: list[str], stop_after: str | None = None,
                   max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """(tokens, in_features) inputs of the named linears over all batches (optionally only the
    first ``max_tokens``), running each batch only as far as ``stop_after``."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    feed_linears(layer, inputs, i, names, lambda n, x: got[n].append(x.float()), stop_after)
    out = {n: torch.cat(v) for n, v in got.items()}
    return {n: (x[:max_tokens] if max_tokens else x) for n, x in out.items()}


def replace_each(model: nn.Module, skip: Iterable[str], make, progress=None) -> None:
    """Data-free methods: swap every quantizable linear for ``make(linear, full_name)``."""
    for name, lin in quantizable(model, skip).items():
        set_module(model, name, make(lin, name))
        if progress is not None:
            progress(name)
