"""Post-training quantization of any lmzoo decoder: RTN, GPTQ, AWQ, LLM.int8() and NF4.

``lmzoo.quantize(model, method="gptq", bits=4, group_size=128, calibration=batches)`` replaces the
``nn.Linear`` modules inside the decoder layers by quantized ones (``linear.py``, ``bnb.py``) that
store packed integers and compute by dequantize-then-matmul (with torch's int8 kernels where they
apply); ``lmzoo.save``/``lmzoo.load`` write and read them in the layouts of AutoGPTQ/GPTQModel,
AutoAWQ and bitsandbytes (``serialize.py``). See docs/quantization.md.
"""

from lmzoo.quant.bnb import NF4_CODE, Int8Linear, NF4Linear
from lmzoo.quant.linear import KERNELS, IntLinear, QuantLinear, set_kernel
from lmzoo.quant.registry import DEFAULT, METHODS, Method, get_method, quantize

__all__ = ["quantize", "METHODS", "Method", "get_method", "DEFAULT", "QuantLinear", "IntLinear", "Int8Linear",
           "NF4Linear", "NF4_CODE", "set_kernel", "KERNELS"]
