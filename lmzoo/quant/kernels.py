"""Weight-only low-bit matmuls for decoding: torch's CPU kernels read the packed integers, no float copy.

``IntLinear.forward`` dequantizes its whole weight on every call (right for calibration and for
training adapters on a frozen base; slow for decoding, where each token reads every weight once).
``fuse_for_decode`` (lmzoo/generate/fastpath.py) swaps each ``IntLinear`` it can for one of these,
built once from the layer's integer codes:

``Int8Matmul``: 8 bits, groups tiling the row (one group per row included). ``torch._weight_int8pack_mm``
takes an int8 (N, K) weight and bf16 activations; codes q ∈ [0, 255] are stored as q - 128 ∈ int8, and
for group g of the row (columns k ∈ g)

    y_n = Σ_g s_gn · ( Σ_{k∈g} x_k (q_nk - 128)  +  (128 - z_gn) Σ_{k∈g} x_k )

which is s · (q - z) summed, exactly; the second term vanishes for symmetric codes (z = 128). One
kernel call per group (the kernel has one scale per row). Its K must be a multiple of 16 (it reads
in blocks of 16 and runs past the row otherwise, linear.py): a group that is not is padded with
zero columns, which add exact zeros.

``Int4Matmul``: 4 bits, groups of 32, 64, 128 or 256 tiling the row (one group per row where a group
of 256, 128, 64 or 32 divides it: the row's scale repeated, exact). ``torch._weight_int4pack_mm_for_cpu``
computes w = (q - 8) · s + m per group, so m = s · (8 - z) gives s · (q - z); N is padded to a
multiple of 16 with zero rows (the kernel's packing needs it) and the output sliced back.

Both round the activations to bf16 (the kernels' vectorised path; their float32 paths are several times
slower than a float32 GEMV), and Int4Matmul its scales and offsets to bf16 too (8 mantissa bits: a
relative change of at most 2^-9 of a weight, far inside a 4-bit step). Accumulation is float32; the
result is cast back to the activations' dtype. Measured on the development CPU (AMD EPYC Zen 3, AVX2,
one thread, weights out of cache, 2816×512): float32 GEMV 483 µs, int8 319 µs, int4 256 µs
(benchmarks/bench_decode.py has the whole model). Act-order checkpoints (a permuted ``g_idx``) and other
widths keep ``IntLinear``'s dequantize path; ``supported`` says why.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from lmzoo.quant.linear import INT8PACK_K_MULTIPLE as INT8_K_MULTIPLE  # the kernel's blocks along K
from lmzoo.quant.uniform import IntWeights
INT4_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts as qGroupSize
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0


def _contiguous_groups(iw: IntWeights) -> bool:
    K = iw.codes.shape[1]
    return torch.equal(iw.g_idx.long(), torch.arange(K, device=iw.g_idx.device) // iw.group_size)


def supported(iw: IntWeights) -> str | None:
    """None if a kernel here takes ``iw``, else why not (the layer keeps dequantize-then-matmul)."""
    K = iw.codes.shape[1]
    if not hasattr(torch, "_weight_int8pack_mm") or not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} has no weight-only int8/int4 CPU kernels"
    if iw.bits not in (4, 8):
        return f"{iw.bits}-bit codes (kernels: 8 and 4 bits)"
    if not _contiguous_groups(iw):
        return "act-order groups (a permuted g_idx)"
    if K % iw.group_size:
        return f"a shorter last group ({K} columns in groups of {iw.group_size})"
    if iw.bits == 4 and _int4_group(K, iw.group_size) is None:
        return f"groups of {iw.group_size} (the int4 kernel takes 32, 64, 128 or 256 dividing {K})"
    return None


def _int4_group(K: int, gs: int) -> int | None:
    if gs in INT4_GROUPS:
        return gs
    if gs == K:  # one group per row: the largest kernel group dividing it, the scale repeated
        return next((g for g in INT4_GROUPS if K % g == 0), None)
    return None


def concat(parts: list[IntWeights]) -> IntWeights:
    """Several layers' codes as one with their outputs side by side (fused q/k/v, gate/up); same spec."""
    a = parts[0]
    return IntWeights(codes=torch.cat([p.codes for p in parts]), scales=torch.cat([p.scales for p in parts], 1),
                      zeros=torch.cat([p.zeros for p in parts], 1), g_idx=a.g_idx, bits=a.bits,
                      group_size=a.group_size)


class _LowBit(nn.Module):
    def __init__(self, iw: IntWeights, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = iw.codes.shape
        self.bits, self.group_size = iw.bits, iw.group_size
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def _finish(self, y: torch.Tensor, x: torch.Tensor, shape) -> torch.Tensor:
        y = y.reshape(*shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}"


class Int8Matmul(_LowBit):
    """y = x · (s (q - z))ᵀ on ``torch._weight_int8pack_mm`` (module docstring)."""

    def __init__(self, iw: IntWeights, bias: torch.Tensor | None = None):
        super().__init__(iw, bias)
        N, K = iw.codes.shape
        gs = iw.group_size
        G = K // gs
        self.pad = (-gs) % INT8_K_MULTIPLE
        w8 = (iw.codes.to(torch.int16) - 128).to(torch.int8)  # (N, K)
        w8 = F.pad(w8.view(N, G, gs), (0, self.pad)).transpose(0, 1).contiguous()  # (G, N, gs + pad)
        self.register_buffer("w8", w8, persistent=False)
        self.register_buffer("scales", iw.scales.float(), persistent=False)  # (G, N)
        zero_term = (128 - iw.zeros.float()) * iw.scales.float()  # (G, N)
        self.register_buffer("zero_term", zero_term if bool(zero_term.any()) else None, persistent=False)
        self.register_buffer("ones", torch.ones(N, dtype=torch.bfloat16), persistent=False)  # scales applied after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16)
        G, gs = self.w8.shape[0], self.group_size
        y = None
        for g in range(G):
            xg = xb[:, g * gs:(g + 1) * gs]
            xg = F.pad(xg, (0, self.pad)) if self.pad else xg.contiguous()
            part = torch._weight_int8pack_mm(xg, self.w8[g], self.ones).float() * self.scales[g]
            y = part if y is None else y.add_(part)
        if self.zero_term is not None:
            y = y + xb.float().view(-1, G, gs).sum(-1) @ self.zero_term  # (T, G) @ (G, N)
        return self._finish(y, x, shape)


class Int4Matmul(_LowBit):
    """y = x · (s (q - z))ᵀ on ``torch._weight_int4pack_mm_for_cpu`` (module docstring)."""

    def __init__(self, iw: IntWeights, bias: torch.Tensor | None = None):
        super().__init__(iw, bias)
        N, K = iw.codes.shape
        self.kgroup = _int4_group(K, iw.group_size)
        rep = iw.group_size // self.kgroup  # 1, or the repeats of a row's one scale
        s = iw.scales.float().repeat_interleave(rep, 0)  # (K / kgroup, N)
        z = iw.zeros.float().repeat_interleave(rep, 0)
        self.n_pad = (-N) % INT4_N_MULTIPLE
        codes = F.pad(iw.codes.to(torch.int32), (0, 0, 0, self.n_pad), value=8)  # pad rows: q = 8, s = 0
        sz = torch.stack([s, s * (8 - z)], -1)  # (K / kgroup, N, 2): w = (q - 8) s + s (8 - z)
        sz = F.pad(sz, (0, 0, 0, self.n_pad))
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1),
                             persistent=False)
        self.register_buffer("scale_zeros", sz.to(torch.bfloat16).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(xb, self.packed, self.kgroup, self.scale_zeros).float()
        if self.n_pad:
            y = y[:, :self.out_features]
        return self._finish(y, x, shape)


def lowbit(iw: IntWeights, bias: torch.Tensor | None = None) -> nn.Module | None:
    """The kernel module for ``iw`` (None where ``supported`` says no)."""
    if supported(iw) is not None:
        return None
    return (Int8Matmul if iw.bits == 8 else Int4Matmul)(iw, bias)
