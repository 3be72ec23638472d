"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize a weight column by column and spread each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian of the layer's squared output error.

For a linear with inputs X (in, tokens), minimising ‖WX − ŴX‖² row by row has Hessian H = 2XXᵀ.
Quantizing column q of W and updating the rest optimally is (OBQ, eq. 2 / GPTQ eq. 3):

    δ = (w_q − quant(w_q)) / [H⁻¹]_qq,        W[:, F] −= δ · [H⁻¹]_{q, F}

GPTQ's three steps that make this fast and stable, all here:
  1. a fixed column order for all rows (optionally by descending diag(H): ``desc_act``, act-order);
  2. lazy batches: updates inside a block of 128 columns are applied immediately, the block's total
     error reaches the columns after it in one matmul (``W[:, i2:] −= Err · H⁻¹[block, i2:]``);
  3. Cholesky: H is dampened (λ = damp_percent · mean diag(H) added to the diagonal), inverted,
     and the rows of H⁻¹ the algorithm needs are read off the upper Cholesky factor of H⁻¹.
With a group size, each group's scale and zero are chosen when the loop reaches its first column,
from the weights as updated so far. The layers are done in order, each fed the outputs of the
layers before it *after* their quantization; within a layer, linears that read the same input
(q/k/v, gate/up) are done together and the next ones see their quantized outputs ("true sequential").

diff from AutoGPTQ: the Hessian is accumulated and inverted in float64; a group that starts inside a
block takes its range from the block's updated weights (AutoGPTQ reads the stale copy there).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lmzoo.errors import LmzooError
from lmzoo.quant.calibrate import (LayerInputs, decoder_layers, feed_linears, layer_linears, set_module, trace_linears,
                                   uncalled)
from lmzoo.quant.linear import IntLinear
from lmzoo.quant.uniform import IntWeights, affine_params, check_group_size, n_groups, quantize_codes, rtn


def inverse_hessian_factor(H: torch.Tensor, damp_percent: float, where: str = "layer") -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so H⁻¹ = UᵀU), λ = damp_percent · mean diag(H).
    The damping grows tenfold while H stays numerically not positive definite."""
    H = H.double()
    damp = damp_percent * float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        damp *= 10
    raise LmzooError(f"gptq: {where}: the Hessian is not positive definite even with damping {damp:g}; "
                     "give more (or more varied) calibration data")


@torch.no_grad()
def gptq_weight(weight: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None, sym: bool = True,
                desc_act: bool = False, damp_percent: float = 0.01, block_size: int = 128,
                where: str = "layer") -> IntWeights:
    """Quantize one (out, in) weight given the Hessian H (in, in) of its inputs."""
    W = weight.detach().float().clone()
    out_f, in_f = W.shape
    gs = check_group_size(group_size, in_f, where)
    H = H.double().clone()
    dead = torch.diag(H) == 0  # inputs that were always 0: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if desc_act else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_hessian_factor(H, damp_percent, where).float()

    grouped = gs < in_f
    if grouped:  # blocks hold whole groups, so a group's range is read from up-to-date weights
        block_size = max(gs, block_size // gs * gs)
    else:
        scale, zero = affine_params(W, bits, sym)  # one range per row, from the weights as given
    G = n_groups(in_f, gs)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    scales, zeros = torch.zeros(G, out_f), torch.zeros(G, out_f)
    if not grouped:
        scales[0], zeros[0] = scale, zero
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()  # (out, count): the block, updated column by column
        Err = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grouped and col % gs == 0:
                scale, zero = affine_params(W1[:, i:i + gs], bits, sym)
                scales[col // gs], zeros[col // gs] = scale, zero
            w = W1[:, i]
            q = quantize_codes(w, scale, zero, bits)
            codes[:, col] = q.to(torch.uint8)
            err = (w - scale * (q - zero)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # (out, count - i)
            Err[:, i] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]  # the block's error reaches the later columns at once

    g_idx = torch.arange(in_f) // gs  # group of each column in the order they were quantized
    if perm is not None:
        inv = torch.argsort(perm)
        codes, g_idx = codes[:, inv], g_idx[inv]
    return IntWeights(codes=codes, scales=scales.half(), zeros=zeros.to(torch.int32),
                      g_idx=g_idx.to(torch.int32), bits=bits, group_size=gs)


@torch.no_grad()
def accumulate_hessians(layer: nn.Module, inputs: LayerInputs, i: int, names: list[str]) -> dict[str, torch.Tensor]:
    """H = 2/N · Σ x xᵀ over all N calibration tokens, for each named linear (float64)."""
    mods = dict(layer.named_modules())
    H = {n: torch.zeros(mods[n].in_features, mods[n].in_features, dtype=torch.float64) for n in names}
    count = {n: 0 for n in names}

    def add(n, x):
        x = x.double()  # (tokens, in)
        H[n] += x.t() @ x
        count[n] += x.shape[0]

    feed_linears(layer, inputs, i, names, add, stop_after=names[-1])
    return {n: 2.0 * H[n] / max(count[n], 1) for n in names}


def run(model: nn.Module, spec: dict, batches: list[torch.Tensor], progress=None) -> None:
    """Quantize every decoder layer's linears with GPTQ, in place, layer after layer."""
    inputs = LayerInputs.capture(model, batches)
    layout = "gptq" if spec["sym"] else "gptq_v2"
    keep = set(spec.get("keep_float", ()))  # widths the layout cannot pack (registry.unpackable): stay in float
    for i, layer in enumerate(decoder_layers(model)):
        names = [n for n in layer_linears(layer, spec.get("skip", ())) if f"layers.{i}.{n}" not in keep]
        traced = trace_linears(layer, inputs, i, names)
        for n in uncalled(names, traced):  # no inputs, no Hessian: round to nearest instead
            lin = layer.get_submodule(n)
            set_module(layer, n, int_linear(rtn(lin.weight, spec["bits"], spec["group_size"], spec["sym"]), lin, layout))
            print(f"gptq: layers.{i}.{n} saw no calibration tokens; rounded to nearest", file=sys.stderr)
        groups = [g for g, _ in traced] if spec["true_sequential"] else [[n for g, _ in traced for n in g]]
        for group in groups:
            hessians = accumulate_hessians(layer, inputs, i, group)
            for n in group:
                lin = layer.get_submodule(n)
                iw = gptq_weight(lin.weight, hessians[n], spec["bits"], spec["group_size"], spec["sym"],
                                 spec["desc_act"], spec["damp_percent"], spec["block_size"], where=f"layers.{i}.{n}")
                set_module(layer, n, int_linear(iw, lin, layout))
                if progress is not None:
                    progress(f"layers.{i}.{n}")
        inputs.advance(layer, i)  # the next layer sees this one's quantized outputs


def int_linear(iw: IntWeights, lin: nn.Linear, layout: str, input_scale: torch.Tensor | None = None) -> IntLinear:
    """An ``IntLinear`` holding ``iw`` in ``layout``, with ``lin``'s bias."""
    m = IntLinear(lin.in_features, lin.out_features, lin.bias is not None, bits=iw.bits, group_size=iw.group_size,
                  layout=layout, input_scale=input_scale is not None)
    m.set_int_weights(iw)
    if input_scale is not None:
        m.input_scale = input_scale.detach().float().clone()
    if lin.bias is not None:
        m.bias.data = lin.bias.detach().float().clone()
    return m.to(lin.weight.device)
