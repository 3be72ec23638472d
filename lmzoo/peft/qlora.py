"""QLoRA (Dettmers et al. 2023): LoRA on a frozen base whose decoder linears are 4-bit NormalFloat.

The base is quantized by lmzoo's own NF4 (``lmzoo/quant/bnb.py``): blocks of 64 weights, each
w / absmax rounded to the nearest of the 16 published NF4 values, and the float32 absmax constants
double-quantized (8-bit "dynamic" codes in blocks of 256, after their mean is subtracted), code for
code what ``bitsandbytes.functional.quantize_4bit(w, blocksize=64, compress_statistics=True,
quant_type="nf4")`` stores. The adapters stay in float (float32 by default, or bfloat16).

In training the NF4 linear computes y = x · dequant(W)ᵀ and, in backward, dequantizes again for
∂L/∂x = ∂L/∂y · dequant(W) (``frozen_dequant_linear`` in lmzoo/quant/linear.py): no float copy of a
frozen weight lives between the passes, and W itself gets no gradient.
"""

from __future__ import annotations

from torch import nn

from lmzoo.errors import ConfigError, LmzooError
from lmzoo.quant.bnb import NF4Linear
from lmzoo.quant.linear import QuantLinear

# name -> the arguments of lmzoo.quantize that make the QLoRA base
BASES = {"nf4": dict(method="nf4", group_size=64, double_quant=True)}


def quantize_frozen_base(model: nn.Module, method: str = "nf4") -> nn.Module:
    """Quantize every decoder linear of ``model`` for QLoRA, in place (a model already in NF4 is kept)."""
    if method not in BASES:
        raise ConfigError(f"qlora: quantize_base '{method}' is unknown; known: {sorted(BASES)}")
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if quantized:
        if all(isinstance(m, NF4Linear) for m in quantized):
            return model
        raise LmzooError(f"qlora: the model is already quantized as {type(quantized[0]).__name__}, not NF4; "
                         "start from the float model")
    from lmzoo.quant import quantize

    try:
        return quantize(model, **BASES[method])
    except LmzooError as e:
        raise LmzooError(f"qlora: cannot quantize the base to {method}: {e}") from e
