"""Bit packing in the layouts quantized checkpoints use, so that files from the ecosystem load as-is.

GPTQ (AutoGPTQ / GPTQModel, ``QuantLinear`` of the "cuda_old"/torch kernels)::

    qweight (in·bits/32, out) int32   codes packed down the *input* dimension: input row 32/bits·r + j
                                      sits in bits [bits·j, bits·j + bits) of qweight[r]  (lowest first)
    qzeros  (groups, out·bits/32)     zero points packed along the *output* dimension, same bit order;
                                      checkpoint_format "gptq" (v1) stores zero - 1, "gptq_v2" the zero
    scales  (groups, out) float16
    g_idx   (in,) int32               group of each input column (a permutation of groups with desc_act)

AWQ GEMM (AutoAWQ ``WQLinear_GEMM``)::

    qweight (in, out·bits/32) int32   codes packed along the *output* dimension, interleaved: nibble i of
                                      each int32 holds column ``AWQ_ORDER[i]`` of its group of 8
    qzeros  (groups, out·bits/32)     zero points, packed like qweight (the zero itself, no "- 1")
    scales  (groups, out) float16

bitsandbytes 4-bit: two codes per uint8, the first element in the high nibble.

Every dimension packed into int32 words must fill them: ``misfit`` says when a width does not (the
quantizers then keep that linear in float, registry.py).

Everything here is vectorised; the tests check it against loops written independently.
"""

from __future__ import annotations

import torch

from lmzoo.errors import LmzooError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds column AWQ_ORDER[i]
PACK_BITS = (2, 4, 8)  # widths that tile an int32 exactly (3-bit GPTQ straddles words; not supported)


def _per_word(bits: int) -> int:
    if bits not in PACK_BITS:
        raise LmzooError(f"packing supports bits in {PACK_BITS}, got {bits}")
    return 32 // bits


def misfit(layout: str, in_features: int, out_features: int, bits: int) -> str | None:
    """Why a linear of these widths cannot be held in ``layout`` at ``bits`` (None if it can): every
    dimension a layout packs must fill whole int32 words of 32/bits values. GPTQ packs qweight down the
    inputs and qzeros along the outputs; AWQ packs qweight and qzeros along the outputs. (No reader
    pads: AutoGPTQ and AutoAWQ size these buffers with ``//``, GPTQModel's unpack reshapes to
    (groups, out); see docs/quantization.md.)"""
    per = _per_word(bits)
    if layout not in ("gptq", "gptq_v2", "awq"):
        raise LmzooError(f"unknown packed layout '{layout}'; known: gptq, gptq_v2, awq")
    if out_features % per:
        packed = "qweight and qzeros pack" if layout == "awq" else "qzeros packs"
        return f"out_features {out_features} is not a multiple of {per}: {packed} {per} per int32 along the outputs"
    if layout != "awq" and in_features % per:
        return f"in_features {in_features} is not a multiple of {per}: qweight packs {per} per int32 down the inputs"
    return None


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bit pattern (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _fields(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., W) int32 -> (..., W, 32/bits) int32 fields, lowest bits first. (An arithmetic shift of a
    negative word fills with ones from the left; the mask removes them.)"""
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    return (packed.to(torch.int32)[..., None] >> shifts) & (2**bits - 1)  # (..., W, per)


def _join(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., W, 32/bits) fields -> (..., W) int32, field j in bits [bits·j, bits·j + bits)."""
    shifts = torch.arange(0, 32, bits, device=fields.device, dtype=torch.int64)
    words = (fields.to(torch.int64) << shifts).sum(-1)  # fields do not overlap, so + is |
    return _to_int32(words)


def _check_range(q: torch.Tensor, bits: int, what: str) -> None:
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2**bits):
        raise LmzooError(f"{what}: values must lie in [0, {2**bits - 1}] for {bits}-bit packing, "
                         f"got [{int(q.min())}, {int(q.max())}]")


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight: (in, out) codes -> (in·bits/32, out) int32, packed down dim 0."""
    per = _per_word(bits)
    K, N = q.shape
    if K % per:
        raise LmzooError(f"pack_rows: {K} rows do not fill whole int32 words of {per} {bits}-bit values")
    _check_range(q, bits, "pack_rows")
    fields = q.reshape(K // per, per, N).transpose(1, 2)  # (K/per, N, per)
    return _join(fields, bits)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(in·bits/32, out) int32 -> (in, out) int32 codes."""
    R, N = packed.shape
    per = _per_word(bits)
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32).view(1, per, 1)
    codes = packed.to(torch.int32)[:, None, :] >> shifts  # (R, per, N)
    return codes.bitwise_and_(2**bits - 1).view(R * per, N)  # row per·r + j


def pack_cols(q: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """(rows, out) codes -> (rows, out·bits/32) int32 packed along dim 1 (GPTQ qzeros; AWQ with ``order``)."""
    per = _per_word(bits)
    G, N = q.shape
    if N % per:
        raise LmzooError(f"pack_cols: {N} columns do not fill whole int32 words of {per} {bits}-bit values")
    _check_range(q, bits, "pack_cols")
    fields = q.reshape(G, N // per, per)  # (G, N/per, per): column per·w + c
    if order is not None:
        fields = fields[..., list(order)]  # field i <- column order[i]
    return _join(fields, bits)


def unpack_cols(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of ``pack_cols``: (rows, out·bits/32) int32 -> (rows, out) int32."""
    G, W = packed.shape
    per = _per_word(bits)
    field = list(range(per)) if order is None else [list(order).index(c) for c in range(per)]  # field of column c
    shifts = torch.tensor([bits * f for f in field], device=packed.device, dtype=torch.int32)
    codes = packed.to(torch.int32)[..., None] >> shifts  # (G, W, per), already in column order
    return codes.bitwise_and_(2**bits - 1).view(G, W * per)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Flat 4-bit codes -> uint8, two per byte, the first in the high nibble (bitsandbytes' order)."""
    flat = codes.reshape(-1).to(torch.uint8)
    _check_range(flat, 4, "pack_nibbles")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] << 4 | flat[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 bytes -> the first ``n`` 4-bit codes (uint8)."""
    flat = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    out = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)  # (2·bytes,): high, low, high, low...
    return out[:n]
