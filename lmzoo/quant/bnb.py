"""LLM.int8() and NF4 in bitsandbytes' checkpoint layout, computed in plain torch on the CPU.

LLM.int8() (Dettmers et al. 2022): the weight is int8 with one absmax per output row (``SCB``,
"vector-wise"); at run time each input row is quantized to int8 with its own absmax, except the
input *features* holding a value of magnitude >= ``threshold`` (6.0): those columns are taken out
and multiplied in floating point against the (dequantized) weight columns:

    y = (Xq · Wqᵀ) ⊙ (sx · SCBᵀ) / 127²  +  X[:, O] · Ŵ[:, O]ᵀ,    O = {j : max_t |X[t, j]| >= threshold}

NF4 (QLoRA, Dettmers et al. 2023): blocks of 64 weights share one absmax; w / absmax is rounded to
the nearest of 16 NormalFloat values (quantiles of N(0, 1), ``NF4_CODE``). Double quantization
stores the float32 absmax constants themselves as 8-bit codes of bitsandbytes' "dynamic" map, in
blocks of 256, after subtracting their mean; that takes the cost of the constants from 0.5 to ~0.127
bits per weight (QLoRA §3).

diff from bitsandbytes: no CUDA kernels; the int8 matmul is ``torch._int_mm`` (exact int32
accumulation) and NF4 is dequantize-then-matmul. bitsandbytes casts the weight and the activations to
float16 before LLM.int8() quantizes them; lmzoo quantizes the values it is given, so on float16-exact
values codes, SCB and outputs agree, while on other float32 weights ~1% of codes differ by one step.
The double-quantization codes are the nearest value of the dynamic map, as bitsandbytes' CUDA kernel
and torch fallback choose; its CPU kernel picks the second nearest for a few constants
(tests/quant/test_bnb_reference.py).
"""

from __future__ import annotations

import json

import torch
from torch import nn
import torch.nn.functional as F

from lmzoo.errors import CheckpointError
from lmzoo.quant.linear import Plain, QuantLinear, fill_from_checkpoint
from lmzoo.quant.packing import pack_nibbles, unpack_nibbles

# QLoRA appendix E / bitsandbytes: the 4-bit NormalFloat code.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


def nf4_code() -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device="cpu")


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (``create_dynamic_map(signed=True)``): for exponents
    e = 0..6 the midpoints of 2^e equal steps of [0.1, 1], scaled by 10^(e-6), both signs, plus 0 and 1."""
    values = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, device="cpu")  # float32, as bitsandbytes computes it
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * 10.0 ** (e - 6)
        values += means.tolist() + (-means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device="cpu")


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value (ties to the lower index, as bitsandbytes' CPU reference)."""
    out = torch.empty(x.shape, dtype=torch.uint8)
    for i in range(0, x.numel(), 1 << 16):  # chunks keep the (n, codes) distance matrix small
        chunk = x.reshape(-1)[i:i + (1 << 16)]
        out.view(-1)[i:i + (1 << 16)] = (chunk[:, None] - code[None]).abs().argmin(-1).to(torch.uint8)
    return out


def blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat ``x`` -> (codes uint8 (n,), absmax float32 (ceil(n / blocksize),)); a last partial block
    takes its own absmax."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = F.pad(flat, (0, pad)).view(-1, blocksize)  # (n_blocks, blocksize), zero padding
    absmax = blocks.abs().amax(1)
    scaled = (blocks / torch.where(absmax == 0, 1.0, absmax)[:, None]).clamp(-1, 1)
    return _nearest(scaled.reshape(-1)[:n], code), absmax


def unblock(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    """code[codes] · absmax[block], flat float32 (n,)."""
    vals = F.pad(code[codes.reshape(-1)[:n].long()], (0, (-n) % blocksize))
    return (vals.view(-1, blocksize) * absmax.view(-1, 1)).reshape(-1)[:n]


class Int8Linear(QuantLinear):
    """LLM.int8(): int8 weight + per-row absmax ``SCB``, int8 activations with outlier decomposition."""

    fmt = "llm_int8"
    marker = "SCB"
    suffixes = ("weight", "SCB", "weight_format")

    def __init__(self, in_features: int, out_features: int, bias: bool, threshold: float = 6.0, kernel: str = "auto"):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("SCB", torch.ones(out_features))
        self.threshold, self.kernel = float(threshold), kernel

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, threshold: float = 6.0) -> "Int8Linear":
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, bias is not None, threshold)
        w = weight.detach().float()
        scb = w.abs().amax(1)  # (out,) vector-wise absmax
        m.SCB = scb
        m.weight = torch.round(w * (127.0 / torch.where(scb == 0, 1.0, scb))[:, None]).to(torch.int8)
        if bias is not None:
            m.bias.data = bias.detach().float().clone()
        return m

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.weight.float() * (self.SCB / 127.0)[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        a = x.reshape(-1, shape[-1]).float()  # (T, in)
        cols = None
        inner = a
        if self.threshold > 0:
            outliers = a.abs() >= self.threshold
            if bool(outliers.any()):
                cols = outliers.any(0).nonzero().view(-1)
                inner = a.masked_fill(outliers, 0.0)
        sx = inner.abs().amax(1)  # (T,) row absmax, outlier elements zeroed first (as bitsandbytes)
        xq = torch.round(inner * (127.0 / torch.where(sx == 0, 1.0, sx))[:, None]).to(torch.int8)
        if cols is not None:
            xq[:, cols] = 0  # whole outlier columns go through the float path
        if self.kernel != "dequant" and a.device.type == "cpu":
            acc = torch._int_mm(xq, self.weight.t()).float()  # (T, out), exact int32 accumulation
            out = acc * (sx[:, None] * self.SCB[None, :]) / (127.0 * 127.0)
        else:
            out = (xq.float() * (sx / 127.0)[:, None]) @ self.dequantize().t()
        if cols is not None:
            out = out + a[:, cols] @ self.dequantize()[:, cols].t()  # outliers: float, not quantized
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def ideal_bytes(self) -> float:
        return self.out_features * (self.in_features + 4)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "SCB": self.SCB, "weight_format": torch.tensor(0, dtype=torch.uint8)}

    def quant_tensors(self) -> list[torch.Tensor]:
        return [self.weight, self.SCB]

    def plain(self) -> Plain:
        return {"weight": (self.weight, 0), "SCB": (self.SCB, 0)}

    @classmethod
    def from_plain(cls, p: dict, spec: dict, bias: bool = False) -> "Int8Linear":
        out_f, in_f = p["weight"].shape
        with torch.device("meta"):
            m = cls(in_f, out_f, bias, spec.get("threshold", 6.0))
        m.weight, m.SCB = p["weight"].to(torch.int8), p["SCB"].float()
        return m

    @classmethod
    def from_checkpoint(cls, tensors: dict, in_f: int, out_f: int, bias: bool, spec: dict,
                        where: str = "checkpoint") -> "Int8Linear":
        fmt = tensors.pop("weight_format", None)
        if fmt is not None and int(fmt.reshape(-1)[0]) != 0:
            raise CheckpointError(f"{where}.weight_format is {int(fmt.reshape(-1)[0])}: a GPU tile layout "
                                  "(col32/turing/ampere); only the row layout (0) loads on the CPU")
        with torch.device("meta"):
            m = cls(in_f, out_f, bias, spec.get("threshold", 6.0))
        if "weight" in tensors and tensors["weight"].dtype != torch.int8:
            raise CheckpointError(f"{where}.weight: dtype {tensors['weight'].dtype}; LLM.int8 stores int8")
        return fill_from_checkpoint(m, tensors, where, "LLM.int8")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", threshold={self.threshold}"


class NF4Linear(QuantLinear):
    """4-bit NormalFloat weights in blocks (64), absmax optionally double-quantized (bitsandbytes ``Params4bit``)."""

    fmt = "nf4"
    marker = "weight.quant_state.bitsandbytes__nf4"
    suffixes = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                "weight.quant_state.bitsandbytes__nf4")
    NESTED_BLOCK = 256

    def __init__(self, in_features: int, out_features: int, bias: bool, blocksize: int = 64, nested: bool = True,
                 dtype: str = "float32"):
        super().__init__(in_features, out_features, bias)
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.blocksize, self.nested, self.orig_dtype = blocksize, nested, dtype
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8))
        self.register_buffer("quant_map", nf4_code())
        if nested:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8))
            self.register_buffer("nested_absmax", torch.zeros(-(-n_blocks // self.NESTED_BLOCK)))
            self.register_buffer("nested_quant_map", dynamic_code())
            self.nested_offset = 0.0
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, blocksize: int = 64,
                    double_quant: bool = True) -> "NF4Linear":
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, bias is not None, blocksize, double_quant, str(weight.dtype).replace("torch.", ""))
        codes, absmax = blockwise(weight.detach(), m.quant_map, blocksize)
        m.weight = pack_nibbles(codes)[:, None]
        if double_quant:
            offset = absmax.mean()
            q2, absmax2 = blockwise(absmax - offset, m.nested_quant_map, cls.NESTED_BLOCK)
            m.absmax, m.nested_absmax, m.nested_offset = q2, absmax2, float(offset)
        else:
            m.absmax = absmax
        if bias is not None:
            m.bias.data = bias.detach().float().clone()
        return m

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block (decoding the double quantization if there is one)."""
        if not self.nested:
            return self.absmax.float()
        n = self.absmax.numel()
        return unblock(self.absmax, self.nested_absmax, self.nested_quant_map, self.NESTED_BLOCK, n) + \
            torch.tensor(self.nested_offset, dtype=torch.float32)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        n = self.in_features * self.out_features
        # Each byte holds two codes: look both up at once in a (256, 2) table, [code[b >> 4], code[b & 15]].
        b = torch.arange(256, device=self.quant_map.device)
        pairs = torch.stack([self.quant_map[b >> 4], self.quant_map[b & 15]], 1)  # (256, 2)
        vals = pairs.index_select(0, self.weight.reshape(-1).view(torch.uint8).int()).view(-1)[:n]  # (n,)
        pad = (-n) % self.blocksize
        if pad:
            vals = F.pad(vals, (0, pad))
        w = vals.view(-1, self.blocksize).mul_(self.block_absmax()[:, None]).view(-1)[:n]
        return w.view(self.out_features, self.in_features).to(dtype)

    def ideal_bytes(self) -> float:
        n = self.in_features * self.out_features
        n_blocks = -(-n // self.blocksize)
        if not self.nested:
            return n / 2 + 4 * n_blocks
        return n / 2 + n_blocks + 4 * -(-n_blocks // self.NESTED_BLOCK) + 4

    # -- formats -------------------------------------------------------------------------------
    def quant_state(self) -> dict:
        qs = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": self.orig_dtype,
              "shape": [self.out_features, self.in_features]}
        if self.nested:
            qs.update(nested_blocksize=self.NESTED_BLOCK, nested_dtype="float32", nested_offset=self.nested_offset)
        return qs

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        t = {"weight": self.weight, "weight.absmax": self.absmax, "weight.quant_map": self.quant_map}
        if self.nested:
            t["weight.nested_absmax"] = self.nested_absmax
            t["weight.nested_quant_map"] = self.nested_quant_map
        # bitsandbytes' QuantState.as_dict(packed=True): the non-tensor fields as UTF-8 JSON bytes
        t[self.marker] = torch.tensor(list(json.dumps(self.quant_state()).encode("utf-8")), dtype=torch.uint8)
        return t

    def quant_tensors(self) -> list[torch.Tensor]:
        return [v for k, v in self.checkpoint_tensors().items() if k != self.marker]

    @classmethod
    def from_checkpoint(cls, tensors: dict, in_f: int, out_f: int, bias: bool, spec: dict,
                        where: str = "checkpoint") -> "NF4Linear":
        if cls.marker not in tensors:
            raise CheckpointError(f"{where}: no '{where}.{cls.marker}' (bitsandbytes' packed quant state)")
        qs = json.loads(bytes(tensors.pop(cls.marker).tolist()).decode("utf-8"))
        if qs.get("quant_type") != "nf4":
            raise CheckpointError(f"{where}: quant_type '{qs.get('quant_type')}'; lmzoo reads NF4 only (not FP4)")
        if list(qs.get("shape", [])) != [out_f, in_f]:
            raise CheckpointError(f"{where}: quant state shape {qs.get('shape')}; the model expects {[out_f, in_f]}")
        nested = "nested_absmax" in {k.split(".", 1)[-1] for k in tensors}
        if nested and qs.get("nested_blocksize", cls.NESTED_BLOCK) != cls.NESTED_BLOCK:
            raise CheckpointError(f"{where}: nested_blocksize {qs.get('nested_blocksize')}; expected {cls.NESTED_BLOCK}")
        with torch.device("meta"):
            m = cls(in_f, out_f, bias, int(qs["blocksize"]), nested, qs.get("dtype", "float32"))
        if nested:
            m.nested_offset = float(qs["nested_offset"])
        names = {"weight": "weight", "weight.absmax": "absmax", "weight.quant_map": "quant_map",
                 "weight.nested_absmax": "nested_absmax", "weight.nested_quant_map": "nested_quant_map"}
        return fill_from_checkpoint(m, {names[k]: v for k, v in tensors.items()}, where, "NF4")

    def plain(self) -> Plain:
        if self.in_features % self.blocksize:
            raise CheckpointError(f"NF4 blocks of {self.blocksize} straddle rows of {self.in_features}: "
                                  "this weight cannot be split or merged by rows")
        n = self.in_features * self.out_features
        codes = unpack_nibbles(self.weight, n).view(self.out_features, self.in_features)
        absmax = self.block_absmax().view(self.out_features, self.in_features // self.blocksize)
        return {"codes": (codes, 0), "absmax": (absmax, 0), "quant_map": (self.quant_map, None)}

    @classmethod
    def from_plain(cls, p: dict, spec: dict, bias: bool = False) -> "NF4Linear":
        # Rows taken out of (or merged into) a double-quantized tensor keep their decoded float32
        # absmax: re-quantizing it would change the weights. bitsandbytes decides per tensor.
        out_f, in_f = p["codes"].shape
        with torch.device("meta"):
            m = cls(in_f, out_f, bias, spec.get("blocksize", 64), nested=False)
        m.weight = pack_nibbles(p["codes"])[:, None]
        m.absmax, m.quant_map = p["absmax"].reshape(-1).float(), p["quant_map"]
        return m

    def extra_repr(self) -> str:
        return super().extra_repr() + f", blocksize={self.blocksize}, double_quant={self.nested}"


def run_int8(model: nn.Module, spec: dict, batches=None, progress=None) -> None:
    from lmzoo.quant.calibrate import replace_each

    replace_each(model, spec.get("skip", ()),
                 lambda lin, name: Int8Linear.from_weight(lin.weight, lin.bias, spec["threshold"]).to(lin.weight.device),
                 progress)


def run_nf4(model: nn.Module, spec: dict, batches=None, progress=None) -> None:
    from lmzoo.quant.calibrate import replace_each

    replace_each(model, spec.get("skip", ()),
                 lambda lin, name: NF4Linear.from_weight(lin.weight, lin.bias, spec["group_size"],
                                                         spec["double_quant"]).to(lin.weight.device), progress)
