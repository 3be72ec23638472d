"""Quantization methods by name, and ``quantize``: the one entry point that checks the request and
runs a method over a model's decoder-layer linears.

Each ``Method`` says which bit widths and group sizes it supports, its defaults, whether it needs
calibration data, which extra options it takes, and how its config is written into
``config.json`` (as transformers / AutoGPTQ / AutoAWQ write it, see ``serialize.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from lmzoo.errors import LmzooError
from lmzoo.quant import awq, bnb, gptq, rtn
from lmzoo.quant.calibrate import as_batches, quantizable
from lmzoo.quant.linear import QuantLinear

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


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("rtn", rtn.run, (2, 4, 8), 4, GROUPS, 128, False, {"sym": True},
           "round-to-nearest per group; the baseline"),
    Method("gptq", gptq.run, (2, 4, 8), 4, GROUPS, 128, True,
           {"sym": True, "desc_act": False, "damp_percent": 0.01, "block_size": 128, "true_sequential": True},
           "Hessian-aware column-by-column rounding with error feedback"),
    Method("awq", awq.run, (4,), 4, GROUPS, 128, True, {"n_grid": 20, "clip": True, "block_loss": True},
           "activation-aware per-channel scales (folded) + clipping search, asymmetric"),
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


def quantize(model: nn.Module, method: str = "gptq", bits: int | None = None, group_size=DEFAULT,
             calibration=None, *, progress: bool = False, **options) -> nn.Module:
    """Quantize the linears inside ``model``'s decoder layers in place and return the model.

    ``bits=None`` and ``group_size=DEFAULT`` take the method's defaults; ``group_size=None`` means one
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
    batches = as_batches(calibration, model.config.vocab_size, method) if m.needs_calibration else None
    bar = _progress_bar(len(targets), method) if progress else None
    was_training = model.training
    model.eval()
    try:
        m.run(model, spec, batches, (lambda name: (bar.set_postfix_str(name), bar.update(1))) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    from lmzoo.quant.serialize import hf_quantization_config

    model.quantization_config = hf_quantization_config(spec)
    model.train(was_training)
    return model


def _progress_bar(total: int, method: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{method}", unit="linear")
