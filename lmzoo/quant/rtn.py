"""RTN: round-to-nearest, each group of weights on its own uniform grid (``uniform.py``), no data,
no error correction. The baseline GPTQ and AWQ are measured against; 8-bit per-channel RTN is also
the "int8 weight-only" scheme that torch's int8 kernel runs.
"""

from __future__ import annotations

from torch import nn

from lmzoo.quant.calibrate import quantizable, set_module
from lmzoo.quant.gptq import int_linear
from lmzoo.quant.uniform import rtn


def run(model: nn.Module, spec: dict, batches=None, progress=None) -> None:
    layout = "gptq" if spec["sym"] else "gptq_v2"
    keep = set(spec.get("keep_float", ()))  # widths the layout cannot pack (registry.unpackable)
    for name, lin in quantizable(model, spec.get("skip", ())).items():
        if name in keep:
            continue
        iw = rtn(lin.weight, spec["bits"], spec["group_size"], spec["sym"], where=name)
        set_module(model, name, int_linear(iw, lin, layout))
        if progress is not None:
            progress(name)
