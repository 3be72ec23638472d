"""Quantized replacements for ``nn.Linear``: packed integers + scales (+ zeros), dequantize-then-matmul.

Every quantized linear keeps ``in_features``, ``out_features`` and an optional float ``bias`` under
the same names as ``nn.Linear`` (so checkpoint key maps find the bias unchanged) and adds:
- ``dequantize(dtype)``: the (out, in) float weight it computes with;
- ``checkpoint_tensors()`` / ``from_checkpoint()``: its tensors under the names the ecosystem's
  checkpoints use (``qweight``, ``qzeros``, ``scales``, ``g_idx``; ``SCB``; ``weight.absmax``...);
- ``plain()`` / ``from_plain()``: an unpacked form with one axis per output row, so that modules fused
  in a checkpoint (GPT-2's ``c_attn``, Bloom's ``query_key_value``) split and merge by rows;
- ``weight_bytes()`` (what it stores) and ``ideal_bytes()`` (bits · weights + scales and zeros).

``IntLinear`` here holds uniform integer codes in the GPTQ or AWQ layout (RTN, GPTQ and AWQ all
produce it); ``lmzoo/quant/bnb.py`` has LLM.int8() and NF4 in bitsandbytes' layout.

8-bit per-channel symmetric weights run on the CPU through ``torch._weight_int8pack_mm`` (bf16
activations). That kernel reads the reduction dimension in blocks of 16: with ``in_features`` not a
multiple of 16 it reads past the rows, returning garbage or dying with SIGSEGV (torch 2.13, AVX-512;
344 fails, 320/336/352 work; float32 and float16 activations are unaffected). Such layers are
*padded*: the int8 weight gets zero columns up to the next multiple of 16 (once, when the kernel's
weights are built) and each input as many zero columns, which adds exact zeros to every dot product,
so the result is the unpadded product (to bf16 rounding) and the fast path is kept. The kernel is
never called on a K it does not support. It is given unit scales and the float16 scales are applied
in float32 after it: rounding them to bf16 (8 mantissa bits) would change every row's weights.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
import torch.nn.functional as F

from lmzoo.errors import CheckpointError
from lmzoo.quant.packing import AWQ_ORDER, misfit, pack_cols, pack_rows, unpack_cols, unpack_rows
from lmzoo.quant.uniform import IntWeights, n_groups

Plain = dict[str, tuple[torch.Tensor, int | None]]  # name -> (tensor, axis of output rows or None if shared)


class _FrozenDequantMatmul(torch.autograd.Function):
    """y = x Wᵀ, W = module.dequantize(): the gradient goes to x only, and W is dequantized again in
    backward instead of being kept from forward, so a frozen 4-bit base holds no float copy of its
    weights between the passes (QLoRA, lmzoo/peft)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return F.linear(x, module.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.module.dequantize(grad.dtype), None  # (..., out) @ (out, in)


def frozen_dequant_linear(x: torch.Tensor, module: "QuantLinear") -> torch.Tensor:
    """x Wᵀ + b through ``module.dequantize``, differentiable in x (x / input_scale first where there is one)."""
    scale = getattr(module, "input_scale", None)
    if scale is not None:
        x = x / scale.to(x.dtype)
    out = _FrozenDequantMatmul.apply(x, module)
    return out + module.bias.to(x.dtype) if module.bias is not None else out


class QuantLinear(nn.Module):
    """What the quantized linears share: shapes, bias, the forward through ``dequantize``."""

    fmt: ClassVar[str] = ""
    marker: ClassVar[str] = ""  # a checkpoint key suffix only this format has
    suffixes: ClassVar[tuple[str, ...]] = ()  # every checkpoint key suffix it may own (bias excluded)

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = "auto"
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # adapters train through this frozen base (lmzoo/peft)
            return frozen_dequant_linear(x, self)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        # ``model.to(dtype)`` converts the bias but not the stored format: float16 scales, float32
        # absmax/SCB are part of the layout the checkpoints define.
        keep = {n: b.dtype for n, b in self.named_buffers(recurse=False)}
        out = super()._apply(fn, recurse)
        for n, dtype in keep.items():
            if getattr(self, n).dtype != dtype:
                setattr(self, n, getattr(self, n).to(dtype))
        return out

    def quant_tensors(self) -> list[torch.Tensor]:
        return list(self.checkpoint_tensors().values())

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.quant_tensors())

    def ideal_bytes(self) -> float:
        raise NotImplementedError

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def plain(self) -> Plain:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


INT8PACK_K_MULTIPLE = 16  # torch._weight_int8pack_mm's bf16 CPU path needs in_features % 16 == 0 (see above)
KERNELS = ("auto", "dequant")  # auto: torch's int8 kernels where they apply; dequant: always dequantize-then-matmul


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Choose how every quantized linear in ``model`` computes."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got '{kernel}'")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = kernel
    return model


def _buffer(module: nn.Module, name: str, t: torch.Tensor) -> None:
    module.register_buffer(name, t, persistent=True)


def fill_from_checkpoint(m: QuantLinear, tensors: dict[str, torch.Tensor], where: str, what: str) -> QuantLinear:
    """Put checkpoint tensors into a module built on the meta device, checking every shape and that
    no buffer is left unfilled."""
    for name, t in tensors.items():
        want = getattr(m, name, None)
        if not isinstance(want, torch.Tensor):
            raise CheckpointError(f"{where}.{name}: not a tensor of a {type(m).__name__} ({what})")
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{where}.{name}: shape {tuple(t.shape)}; in {m.in_features} x out "
                                  f"{m.out_features} with {what} expects {tuple(want.shape)}")
        setattr(m, name, t.to(want.dtype) if name == "g_idx" else t)
    missing = [n for n, b in m.named_buffers() if b.is_meta]
    if missing:
        raise CheckpointError(f"{where}: missing {[f'{where}.{n}' for n in missing]} ({what})")
    return m


class IntLinear(QuantLinear):
    """Uniform integer weights, ``bits`` in {2, 4, 8}, in one of three packed layouts:
    ``gptq`` (AutoGPTQ v1: zeros stored minus one), ``gptq_v2`` (GPTQModel: zeros as they are) or
    ``awq`` (AutoAWQ GEMM: packed along the outputs, interleaved). ``input_scale`` (AWQ only) holds
    per-input-channel scales that could not be folded into a preceding layer: x / s enters the matmul.
    """

    fmt = "int"
    marker = "qweight"
    suffixes = ("qweight", "qzeros", "scales", "g_idx", "input_scale")
    LAYOUTS = ("gptq", "gptq_v2", "awq")

    def __init__(self, in_features: int, out_features: int, bias: bool, *, bits: int, group_size: int,
                 layout: str = "gptq", input_scale: bool = False, kernel: str = "auto"):
        super().__init__(in_features, out_features, bias)
        if layout not in self.LAYOUTS:
            raise ValueError(f"IntLinear layout must be one of {self.LAYOUTS}, got '{layout}'")
        if layout == "awq" and in_features % group_size:
            raise ValueError(f"AWQ's layout needs group_size ({group_size}) to divide in_features ({in_features})")
        why = misfit(layout, in_features, out_features, bits)
        if why:  # quantize keeps such a linear in float instead (registry.py)
            raise ValueError(f"the {layout} layout cannot hold {bits}-bit {in_features} -> {out_features}: {why}")
        self.bits, self.group_size, self.layout = bits, group_size, layout
        per = 32 // bits
        G = n_groups(in_features, group_size)
        if layout == "awq":
            _buffer(self, "qweight", torch.zeros(in_features, out_features // per, dtype=torch.int32))
        else:
            _buffer(self, "qweight", torch.zeros(in_features // per, out_features, dtype=torch.int32))
        _buffer(self, "qzeros", torch.zeros(G, out_features // per, dtype=torch.int32))
        _buffer(self, "scales", torch.zeros(G, out_features, dtype=torch.float16))
        if layout != "awq":  # AWQ's groups are always contiguous: no g_idx in its checkpoints
            _buffer(self, "g_idx", (torch.arange(in_features) // group_size).to(torch.int32))
        if input_scale:
            _buffer(self, "input_scale", torch.ones(in_features))
        else:
            self.input_scale = None
        self.kernel = kernel
        self._int8 = None  # the int8 kernel's weights: (int8 (out, in padded), unit bf16, float32 scales), or False

    # -- unpacking -----------------------------------------------------------------------------
    def _g_idx(self) -> torch.Tensor:
        if self.layout == "awq":
            return torch.arange(self.in_features, device=self.qweight.device) // self.group_size
        return self.g_idx.long()

    def int_weights(self) -> IntWeights:
        b = self.bits
        if self.layout == "awq":
            codes = unpack_cols(self.qweight, b, AWQ_ORDER)  # (in, out)
            zeros = unpack_cols(self.qzeros, b, AWQ_ORDER)  # (G, out)
        else:
            codes = unpack_rows(self.qweight, b)  # (in, out)
            zeros = unpack_cols(self.qzeros, b)  # (G, out)
            if self.layout == "gptq":
                zeros = zeros + 1  # v1 stores zero - 1 (AutoGPTQ); a stored 2^bits - 1 reads back as 2^bits, as there
        return IntWeights(codes=codes.t().to(torch.uint8), scales=self.scales, zeros=zeros,
                          g_idx=self._g_idx().to(torch.int32), bits=b, group_size=self.group_size)

    def weight_t(self) -> torch.Tensor:
        """The float32 (in, out) weight: s[g(i)] · (q - z[g(i)]) for input column i. In-place steps
        keep the transient memory of a call to ~8 bytes per weight."""
        b, gs = self.bits, self.group_size
        if self.layout == "awq":
            codes, zeros = unpack_cols(self.qweight, b, AWQ_ORDER), unpack_cols(self.qzeros, b, AWQ_ORDER)
        else:
            codes, zeros = unpack_rows(self.qweight, b), unpack_cols(self.qzeros, b) + (self.layout == "gptq")
        K, N = codes.shape  # (in, out)
        s, G = self.scales.float(), zeros.shape[0]
        g = self._g_idx()
        if G * gs == K and torch.equal(g, torch.arange(K, device=g.device) // gs):  # contiguous groups: broadcast
            w = codes.view(G, gs, N).sub_(zeros[:, None, :]).float()
            return w.mul_(s[:, None, :]).view(K, N)
        return codes.sub_(zeros[g]).float().mul_(s[g])  # act-order (or a shorter last group): gather per column

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.weight_t().t().to(dtype)

    # -- forward -------------------------------------------------------------------------------
    def int8_eligible(self) -> bool:
        """torch's int8 weight-only kernel takes (q - z) as int8 with one scale per row: 8 bits,
        one group, and the symmetric zero 128."""
        return self.bits == 8 and self.group_size == self.in_features and self.layout != "awq"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        if self.kernel != "dequant" and self.int8_eligible() and x.device.type == "cpu":
            out = self._int8_forward(x)
            if out is not None:
                return out
        out = torch.matmul(x, self.weight_t().to(x.dtype))  # (..., in) @ (in, out): no transposed copy
        return out + self.bias.to(x.dtype) if self.bias is not None else out

    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        # torch._weight_int8pack_mm is vectorised for bf16 activations on the CPU; its float32 path
        # is several times slower than a float32 GEMV, so activations are rounded to bf16 here.
        if self._int8 is False:
            return None
        if self._int8 is None:
            iw = self.int_weights()
            if not bool((iw.zeros == 128).all()):
                self._int8 = False  # asymmetric 8-bit: (q - z) does not fit int8
                return None
            w8 = (iw.codes.to(torch.int16) - 128).to(torch.int8)  # (out, in)
            w8 = F.pad(w8, (0, self._k_pad())).contiguous()  # (out, in + pad): zero columns, exact
            ones = torch.ones(self.out_features, dtype=torch.bfloat16, device=w8.device)
            self._int8 = (w8, ones, iw.scales[0].float())
        w8, ones, s = self._int8
        shape = x.shape
        xb = F.pad(x.reshape(-1, shape[-1]).to(torch.bfloat16), (0, self._k_pad())).contiguous()  # (T, in + pad)
        out = (torch._weight_int8pack_mm(xb, w8, ones).float() * s).to(x.dtype)  # (T, out)
        out = out.reshape(*shape[:-1], self.out_features)
        return out + self.bias.to(x.dtype) if self.bias is not None else out

    def _k_pad(self) -> int:
        return (-self.in_features) % INT8PACK_K_MULTIPLE

    def _apply(self, fn, recurse=True):
        self._int8 = None  # device/dtype moves invalidate the cache
        return super()._apply(fn, recurse)

    # -- formats -------------------------------------------------------------------------------
    def ideal_bytes(self) -> float:
        G = n_groups(self.in_features, self.group_size)
        return self.out_features * (self.in_features * self.bits + G * (16 + self.bits)) / 8

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        names = ["qweight", "qzeros", "scales"] + (["g_idx"] if self.layout != "awq" else [])
        names += ["input_scale"] if self.input_scale is not None else []
        return {n: getattr(self, n) for n in names}

    def set_int_weights(self, iw: IntWeights) -> None:
        b = self.bits
        if iw.bits != b or tuple(iw.codes.shape) != (self.out_features, self.in_features):
            raise ValueError(f"IntWeights of {iw.bits} bits {tuple(iw.codes.shape)} do not fit {self}")
        codes_t = iw.codes.t().to(torch.int64)  # (in, out)
        zeros = iw.zeros.to(torch.int64)
        if self.layout == "awq":
            if not torch.equal(iw.g_idx.long().cpu(), torch.arange(self.in_features) // self.group_size):
                raise CheckpointError("the AWQ layout has no g_idx: its groups must be contiguous (no desc_act)")
            self.qweight = pack_cols(codes_t, b, AWQ_ORDER)
            self.qzeros = pack_cols(zeros, b, AWQ_ORDER)
        else:
            if self.layout == "gptq":
                if int(zeros.min()) < 1:
                    raise CheckpointError("checkpoint_format 'gptq' (v1) stores zero - 1 and cannot hold a zero "
                                          "point of 0; write 'gptq_v2' for asymmetric weights")
                zeros = zeros - 1
            self.qweight = pack_rows(codes_t, b)
            self.qzeros = pack_cols(zeros, b)
            self.g_idx = iw.g_idx.to(torch.int32).clone()
        self.scales = iw.scales.to(torch.float16).clone()
        self._int8 = None

    def plain(self) -> Plain:
        iw = self.int_weights()
        p = {"codes": (iw.codes, 0), "scales": (iw.scales, 1), "zeros": (iw.zeros, 1), "g_idx": (iw.g_idx, None)}
        if self.input_scale is not None:
            p["input_scale"] = (self.input_scale, None)
        return p

    @classmethod
    def from_plain(cls, p: dict[str, torch.Tensor], spec: dict, bias: bool = False) -> "IntLinear":
        out_f, in_f = p["codes"].shape
        with torch.device("meta"):  # every buffer is replaced below; the bias is assigned by the caller
            m = cls(in_f, out_f, bias, bits=spec["bits"], group_size=spec["group_size"] or in_f,
                    layout=spec["layout"], input_scale="input_scale" in p)
        m.set_int_weights(IntWeights(p["codes"], p["scales"], p["zeros"], p["g_idx"], spec["bits"], m.group_size))
        if "input_scale" in p:
            m.input_scale = p["input_scale"].float().clone()
        return m

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], in_f: int, out_f: int, bias: bool, spec: dict,
                        where: str = "checkpoint") -> "IntLinear":
        bits = spec["bits"]
        gs = spec["group_size"] or in_f
        try:
            with torch.device("meta"):
                m = cls(in_f, out_f, bias, bits=bits, group_size=gs, layout=spec["layout"],
                        input_scale="input_scale" in tensors)
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
        return fill_from_checkpoint(m, tensors, where, f"{bits}-bit, group size {gs}, {spec['layout']} layout")

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", bits={self.bits}, group_size={self.group_size}, layout={self.layout}"
                + (", input_scale" if self.input_scale is not None else ""))
