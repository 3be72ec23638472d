"""Quantization methods by name, and ``quantize``: the one entry point that checks the request and
runs a method over a model's decoder-layer linears.

Each ``Method`` says which bit widths and group sizes it supports, its defaults, whether it needs
calibration data, which extra options it takes, and how its config is written into
``config.json`` (as transformers / AutoGPTQ / AutoAWQ write it, see ``serialize.py``).

Default group sizes. GPTQ's layout (RTN, GPTQ) allows a last, shorter group, so 128 fits any width.
AWQ's GEMM layout needs groups that tile every row, and its checkpoints hold one ``q_group_size``
for the whole model, so when the default 128 does not divide the ``in_features`` of every linear
to quantize, ``group_size=DEFAULT`` takes the largest of 64 and 32 that does, else one scale per
output channel (``-1``), and says so on stderr. The shipped tiny LLaMA (``d_ff`` 344 = 8 · 43)
gets per-channel AWQ; GPT-2 and Bloom (512) keep 128. An explicit ``group_size`` that does not fit
is an error, as in AutoAWQ.

Widths that do not pack. The int32 layouts need every packed dimension to fill whole words of 32/bits
values (``packing.misfit``): GPTQ's ``in_features`` (qweight) and ``out_features`` (qzeros), AWQ's
``out_features``. No loader reads a padded tensor (AutoGPTQ and AutoAWQ size their buffers with ``//``,
GPTQModel's dequantize reshapes qzeros to (groups, out); docs/quantization.md), so such a linear (e.g.
the MLP of TinyStories-260K, ``d_ff`` 172, at 4 bits) is kept in float, with any linear the checkpoint
fuses with it; ``quantize`` says which on one line of stderr, keeps that line in the config's ``meta``,
and the config names every float decoder linear in the keys the loaders honour (serialize.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from lmzoo.errors import LmzooError
from lmzoo.quant import awq, bnb, gptq, rtn
from lmzoo.quant.calibrate import as_batches, quantizable
from lmzoo.quant.linear import QuantLinear
from lmzoo.quant.packing import misfit

DEFAULT = "default"  # group_size=DEFAULT: the method's own default (128, or 64 for NF4's blocks)
GROUPS = (None, 32, 64, 128)


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable  # (model, spec, calibration batches | None, progress) -> None, in place
    bits: tuple[int, ...]
    default_bits: int
    groups: tuple  # allowed group sizes; None = one scale per output channel
    default_group: int | None
    needs_calibration: bool
    options: dict = field(default_factory=dict)  # name -> default
    summary: str = ""
    whole_groups: bool = False  # the layout needs group_size to divide in_features (AWQ's GEMM)
    packing: str | None = None  # the int32-packed layout it writes (packing.misfit), None if any width fits


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("rtn", rtn.run, (2, 4, 8), 4, GROUPS, 128, False, {"sym": True},
           "round-to-nearest per group; the baseline", packing="gptq"),
    Method("gptq", gptq.run, (2, 4, 8), 4, GROUPS, 128, True,
           {"sym": True, "desc_act": False, "damp_percent": 0.01, "block_size": 128, "true_sequential": True},
           "Hessian-aware column-by-column rounding with error feedback", packing="gptq"),
    Method("awq", awq.run, (4,), 4, GROUPS, 128, True, {"n_grid": 20, "clip": True, "block_loss": True},
           "activation-aware per-channel scales (folded) + clipping search, asymmetric", whole_groups=True,
           packing="awq"),
    Method("int8", bnb.run_int8, (8,), 8, (None,), None, False, {"threshold": 6.0},
           "LLM.int8(): vector-wise int8 with float outlier features"),
    Method("nf4", bnb.run_nf4, (4,), 4, (32, 64, 128, 256), 64, False, {"double_quant": True},
           "4-bit NormalFloat in blocks, double-quantized absmax (QLoRA)"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LmzooError(f"unknown quantization method '{name}'; known: {sorted(METHODS)}")
    return METHODS[name]


def make_spec(method: str, bits=None, group_size=DEFAULT, **options) -> tuple[Method, dict]:
    """Check a request against the method and fill in its defaults."""
    m = get_method(method)
    bits = m.default_bits if bits is None else bits
    if bits not in m.bits:
        raise LmzooError(f"quantize: method '{method}' supports bits {list(m.bits)}, got {bits}")
    if group_size == DEFAULT:
        group_size = m.default_group
    if group_size == -1:
        group_size = None
    if group_size not in m.groups:
        allowed = ", ".join("None (per channel)" if g is None else str(g) for g in m.groups)
        raise LmzooError(f"quantize: method '{method}' supports group_size {allowed}; got {group_size}")
    skip = options.pop("skip", ())
    unknown = sorted(set(options) - set(m.options))
    if unknown:
        raise LmzooError(f"quantize: method '{method}' has no option(s) {unknown}; its options: {sorted(m.options)}")
    spec = {"method": method, "bits": bits, "group_size": group_size, **m.options, **options, "skip": tuple(skip)}
    return m, spec


def fitting_group(method: Method, in_features: dict[str, int]) -> tuple[int | None, str | None]:
    """The default group size of ``method`` for linears of these widths (name -> in_features), and a
    note when it is not the method's own default (see the module docstring)."""
    default = method.default_group
    if not method.whole_groups or default is None or all(k % default == 0 for k in in_features.values()):
        return default, None
    name, k = next((n, k) for n, k in in_features.items() if k % default)
    smaller = sorted((g for g in method.groups if g is not None and g < default), reverse=True)
    gs = next((g for g in smaller if all(k % g == 0 for k in in_features.values())), None)
    if gs:
        chosen = f"group_size {gs}, the largest that divides every linear's in_features"
    else:
        chosen = (f"one scale per output channel (group_size -1): no group size of {smaller} divides "
                  "every linear's in_features")
    return gs, (f"{method.name}: the default group_size {default} does not divide in_features {k} of {name}; "
                f"using {chosen}")


def quantize(model: nn.Module, method: str = "gptq", bits: int | None = None, group_size=DEFAULT,
             calibration=None, *, progress: bool = False, **options) -> nn.Module:
    """Quantize the linears inside ``model``'s decoder layers in place and return the model.

    ``bits=None`` and ``group_size=DEFAULT`` take the method's defaults (for AWQ, the largest of 128,
    64, 32 that divides every linear's ``in_features``, else per channel); ``group_size=None`` means one
    scale per output channel. ``calibration`` (an iterable of input_ids tensors, (T,) or (B, T)) is
    used by GPTQ and AWQ and ignored by the others. ``options`` are the method's own (``sym``,
    ``desc_act``, ``damp_percent``, ``threshold``, ``double_quant``, ...; ``skip``: substrings of
    linear names to leave in float). The embeddings and the head stay in float.
    """
    m, spec = make_spec(method, bits, group_size, **options)
    if any(isinstance(mod, QuantLinear) for mod in model.modules()):
        raise LmzooError("quantize: the model is already quantized")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise LmzooError("quantize: the quantizers run on the CPU; call model.cpu() first (the quantized model "
                         "can be moved afterwards)")
    targets = quantizable(model, spec["skip"])
    if not targets:
        raise LmzooError("quantize: found no nn.Linear inside the decoder layers to quantize")
    kept = unpackable(m, spec["bits"], model, targets)
    if kept and len(kept) == len(targets):
        raise LmzooError(f"quantize: no linear fits {method}'s {m.packing} layout at {spec['bits']} bits; "
                         f"e.g. {next(iter(kept))}: {next(iter(kept.values()))}")
    spec["keep_float"] = tuple(kept)
    kept_note = _kept_note(method, kept, len(targets)) if kept else None
    if kept_note:
        print(kept_note, file=sys.stderr)
    if group_size == DEFAULT:
        widths = {n: lin.in_features for n, lin in targets.items() if n not in kept}
        spec["group_size"], note = fitting_group(m, widths)
        if note:
            print(note, file=sys.stderr)
    batches = as_batches(calibration, model.config.vocab_size, method) if m.needs_calibration else None
    bar = _progress_bar(len(targets) - len(kept), method) if progress else None
    was_training = model.training
    model.eval()
    try:
        m.run(model, spec, batches, (lambda name: (bar.set_postfix_str(name), bar.update(1))) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    from lmzoo.quant.serialize import float_linears, hf_quantization_config

    floats = float_linears(model) if m.packing else None  # skip= and kept ones, named for the loaders
    model.quantization_config = hf_quantization_config(spec, floats, kept_note)
    model.train(was_training)
    return model


def unpackable(method: Method, bits: int, model: nn.Module, targets: dict[str, nn.Linear]) -> dict[str, str]:
    """The linears ``method``'s layout cannot hold at ``bits`` (name -> why), and those the checkpoint
    fuses with one of them (GPT-2's ``c_attn``): ``quantize`` keeps these in float (module docstring)."""
    if method.packing is None:
        return {}
    kept = {}
    for n, lin in targets.items():
        why = misfit(method.packing, lin.in_features, lin.out_features, bits)
        if why:
            kept[n] = why
    if kept:
        from lmzoo.quant.serialize import fused_partners

        for n, hf in fused_partners(model, set(kept), set(targets)).items():
            kept[n] = f"stored in one tensor ({hf}) with a linear kept in float"
    return kept


def _kept_note(method: str, kept: dict[str, str], total: int) -> str:
    """One line: which linears stay in float and why, grouped ("mlp.gate_proj, mlp.up_proj of layers 0-4 (...)")."""
    layers: dict[tuple[str, str], list[int]] = {}
    for name, why in kept.items():
        _, i, inner = name.split(".", 2)  # layers.{i}.{inner}
        layers.setdefault((why, inner), []).append(int(i))
    groups: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for (why, inner), idx in layers.items():
        groups.setdefault((why, tuple(idx)), []).append(inner)
    spans = "; ".join(f"{', '.join(inners)} of layers {_span(idx)} ({why})" for (why, idx), inners in groups.items())
    return (f"{method}: keeping {len(kept)} of {total} linears in float, unquantized (the checkpoint lists them as "
            f"not converted): {spans}")


def _span(idx: tuple[int, ...]) -> str:
    """"0-4" for consecutive layers, else "0, 2"."""
    if len(idx) > 1 and list(idx) == list(range(idx[0], idx[-1] + 1)):
        return f"{idx[0]}-{idx[-1]}"
    return ", ".join(map(str, idx))


def _progress_bar(total: int, method: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{method}", unit="linear")
