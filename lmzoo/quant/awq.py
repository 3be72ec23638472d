"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

A few input channels carry much larger activations than the rest; the weights that multiply them
matter most. AWQ scales those weight columns up before rounding (so they lose less, relatively) and
divides the activations by the same scale, which leaves the float function unchanged (§3.2):

    Q(W · diag(s)) · (diag(s)⁻¹ · X),      s = s_X^α,   s_X = mean_t |X[t, :]|  (per input channel)

α ∈ {0, 1/n, ..., (n−1)/n} is chosen by grid search to minimise the output error of the linears
that read X (eq. 4; α = 0 is plain RTN, so the search never does worse on the calibration data),
with s normalised by sqrt(max·min). By default the error is measured on the output of the block
holding them (the attention for q/k/v, the MLP for gate/up), as AutoAWQ's ``module2inspect`` does. diag(s)⁻¹ is then folded into whatever produced X:
  - a norm (RMSNorm / LayerNorm, pre-norm blocks): its weight (and bias) divided by s;
  - a linear whose outputs map one-to-one onto X's channels: ``v_proj`` -> ``o_proj`` when there
    are as many K/V heads as query heads, ``up_proj`` -> ``down_proj`` in a gated MLP (FOLD_PAIRS);
  - otherwise (a GeLU between up and down, GQA's v -> o) the quantized linear keeps s as
    ``input_scale`` and divides its input at run time (AutoAWQ wraps the activation instead).
Each fold is checked by running the block before and after: an inexact fold is undone and the
linear falls back to ``input_scale``. Then, per linear, a clipping range is searched: each group's
max |w| shrunk by up to 50% in 20 steps, the one with the least output error kept (AutoAWQ skips
q and k, whose errors the attention softmax amplifies). Weights are finally rounded asymmetrically
per group (zero points, AWQ's GEMM format). Like AutoAWQ, the next block is fed the float outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from lmzoo.nn.attention import Attention
from lmzoo.nn.mlp import GatedMLP
from lmzoo.nn.norms import LayerNorm, RMSNorm
from lmzoo.quant.calibrate import (LayerInputs, collect_inputs, decoder_layers, layer_linears, quantizable, set_module,
                                   trace_linears, uncalled)
from lmzoo.quant.gptq import int_linear
from lmzoo.quant.uniform import affine_params, check_group_size, rtn

FOLD_PAIRS: dict[type, list[tuple[str, str]]] = {
    Attention: [("v_proj", "o_proj")],  # attention output channel c = probabilities · v channel c
    GatedMLP: [("up_proj", "down_proj")],  # down's input = act(gate) * up, channel by channel
}
NORMS = (RMSNorm, LayerNorm, nn.LayerNorm)
NO_CLIP = ("q_proj", "k_proj")
SAMPLE_TOKENS = 512  # tokens the clipping search looks at (AutoAWQ's n_sample_token)


def _fake_quant(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    return rtn(w, bits, group_size, sym=False).dequantize()


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], x: torch.Tensor, bits: int, group_size: int | None,
                 n_grid: int = 20) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale s for linears reading x (tokens, in); returns (s, alpha)."""
    W = torch.cat([w.float() for w in weights])  # (sum of outs, in)
    ref = x @ W.t()
    x_stat = x.abs().mean(0)
    best, best_s, best_alpha = float("inf"), torch.ones_like(x_stat), 0.0
    for k in range(n_grid):
        alpha = k / n_grid
        s = x_stat.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = float((x @ (_fake_quant(W * s, bits, group_size) / s).t() - ref).pow(2).mean())
        if err < best:
            best, best_s, best_alpha = err, s, alpha
    return best_s, best_alpha


@torch.no_grad()
@torch.no_grad()
def search_scale_block(block: nn.Module, linears: list[nn.Linear], x: torch.Tensor, calls: list, refs: list,
                       bits: int, group_size: int | None, n_grid: int = 20) -> tuple[torch.Tensor, float]:
    """As ``search_scale``, but the error is measured on the output of ``block`` (the attention for
    q/k/v, the MLP for gate/up), run on its recorded ``calls``: AutoAWQ's ``module2inspect``."""
    x_stat = x.abs().mean(0)
    originals = [lin.weight.detach().clone() for lin in linears]
    best, best_s, best_alpha = float("inf"), torch.ones_like(x_stat), 0.0
    try:
        for k in range(n_grid):
            alpha = k / n_grid
            s = x_stat.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w in zip(linears, originals):
                lin.weight.copy_(_fake_quant(w.float() * s, bits, group_size) / s)
            err = sum(float((_first(block(*a, **kw)) - ref).pow(2).sum()) for (a, kw), ref in zip(calls, refs))
            if err < best:
                best, best_s, best_alpha = err, s, alpha
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
    return best_s, best_alpha


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def record_calls(layer: nn.Module, inputs: LayerInputs, i: int, names: list[str]) -> dict[str, tuple[list, list]]:
    """Every call of the named submodules over all batches: ([(args, kwargs)], [output])."""
    rec = {n: ([], []) for n in names}
    handles = []
    for n in names:
        m = layer.get_submodule(n)
        handles.append(m.register_forward_pre_hook(lambda m, a, kw, n=n: rec[n][0].append((a, kw)), with_kwargs=True))
        handles.append(m.register_forward_hook(lambda m, a, out, n=n: rec[n][1].append(_first(out))))
    try:
        for b in range(len(inputs.hidden)):
            inputs.run(layer, i, b)
    finally:
        for h in handles:
            h.remove()
    return rec


def _block_of(group: list[str]) -> str:
    """The innermost module holding every linear of the group (the linear itself when alone)."""
    if len(group) == 1:
        return group[0]
    parts = [n.split(".") for n in group]
    common = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return ".".join(common)


def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int | None, n_grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, group) clipping value for w (out, in), chosen on sampled inputs x (tokens, in)."""
    out_f, in_f = w.shape
    gs = group_size or in_f
    G = in_f // gs
    x = x[:: max(1, x.shape[0] // SAMPLE_TOKENS)][:SAMPLE_TOKENS].reshape(-1, G, gs)  # (t, G, gs)
    best_max = torch.empty(out_f, G, 1)
    for r0 in range(0, out_f, 256):  # rows in chunks keep (rows, t, G) small
        wc = w[r0:r0 + 256].float().reshape(-1, G, gs)  # (rows, G, gs)
        ref = torch.einsum("rgk,tgk->rtg", wc, x)
        org_max = wc.abs().amax(-1, keepdim=True)  # (rows, G, 1)
        best_err = torch.full((wc.shape[0], G), float("inf"))
        chosen = org_max.clone()
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            cur = torch.clamp(wc, -max_val, max_val)
            scale, zero = affine_params(cur.reshape(-1, gs), bits, sym=False)  # one grid per (row, group)
            q = cur.reshape(-1, gs)
            q = (scale[:, None] * (torch.clamp(torch.round(q / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
                                   - zero[:, None])).reshape(wc.shape)
            err = (torch.einsum("rgk,tgk->rtg", q, x) - ref).pow(2).mean(1)  # (rows, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            chosen = torch.where(better[..., None], max_val, chosen)
        best_max[r0:r0 + 256] = chosen
    return best_max  # (out, G, 1)


def _fold(layer: nn.Module, group: list[str], producer: str | None, s: torch.Tensor) -> nn.Module | None:
    """Divide the producer of the group's input by s (channel-wise); return what was changed, or None."""
    if producer is not None:
        prod = layer.get_submodule(producer)
        if isinstance(prod, NORMS) and prod.weight is not None and prod.weight.shape == s.shape:
            prod.weight.div_(s)
            if getattr(prod, "bias", None) is not None:
                prod.bias.div_(s)
            return prod
        if type(prod) is nn.Linear and prod.out_features == s.numel():
            return _scale_rows(prod, s)
        return None
    if len(group) != 1:
        return None
    parent, _, leaf = group[0].rpartition(".")
    owner = layer.get_submodule(parent) if parent else layer
    for prev, nxt in FOLD_PAIRS.get(type(owner), []):
        if nxt == leaf:
            p = owner.get_submodule(prev)
            if type(p) is nn.Linear and p.out_features == s.numel():
                return _scale_rows(p, s)
    return None


def _scale_rows(lin: nn.Linear, s: torch.Tensor) -> nn.Linear:
    lin.weight.div_(s[:, None])
    if lin.bias is not None:
        lin.bias.div_(s)
    return lin


def _unfold(mod: nn.Module, s: torch.Tensor) -> None:
    if type(mod) is nn.Linear:
        mod.weight.mul_(s[:, None])
        if mod.bias is not None:
            mod.bias.mul_(s)
    else:
        mod.weight.mul_(s)
        if getattr(mod, "bias", None) is not None:
            mod.bias.mul_(s)


@torch.no_grad()
def run(model: nn.Module, spec: dict, batches: list[torch.Tensor], progress=None) -> None:
    bits, gs = spec["bits"], spec["group_size"]
    keep = set(spec.get("keep_float", ()))  # widths the layout cannot pack (registry.unpackable): stay in float
    for name, lin in quantizable(model, spec.get("skip", ())).items():
        if name not in keep:
            check_group_size(gs, lin.in_features, f"awq: {name}", whole=True)
    inputs = LayerInputs.capture(model, batches)
    for i, layer in enumerate(decoder_layers(model)):
        names = [n for n in layer_linears(layer, spec.get("skip", ())) if f"layers.{i}.{n}" not in keep]
        groups = trace_linears(layer, inputs, i, names)
        for n in uncalled(names, groups):  # no activations to weigh by: plain asymmetric rounding
            lin = layer.get_submodule(n)
            set_module(layer, n, int_linear(rtn(lin.weight, bits, gs, sym=False), lin, "awq"))
        feats = collect_inputs(layer, inputs, i, [g[0] for g, _ in groups])
        float_out = [inputs.run(layer, i, b) for b in range(len(inputs.hidden))]
        blocks = {group[0]: _block_of(group) for group, _ in groups}
        calls = record_calls(layer, inputs, i, sorted(set(b for b in blocks.values() if b))) if spec["block_loss"] else {}
        scales = {}
        for group, _ in groups:
            block = blocks[group[0]]
            if block in calls:  # the error where it lands: the attention's or the MLP's output
                s, _alpha = search_scale_block(layer.get_submodule(block), [layer.get_submodule(n) for n in group],
                                               feats[group[0]], *calls[block], bits, gs, spec["n_grid"])
            else:  # eq. 4 on the linears' own outputs
                s, _alpha = search_scale([layer.get_submodule(n).weight for n in group], feats[group[0]], bits, gs,
                                         spec["n_grid"])
            scales[group[0]] = s
        del calls
        input_scaled: set[str] = set()
        for group, producer in groups:
            s = scales[group[0]]
            changed = _fold(layer, group, producer, s)
            for n in group:
                layer.get_submodule(n).weight.mul_(s)
            ok = changed is not None and _same_output(layer, inputs, i, float_out[0])
            if not ok:  # not foldable: undo, scale the linears' inputs at run time instead
                if changed is not None:
                    _unfold(changed, s)
                for n in group:
                    layer.get_submodule(n).weight.div_(s)
                input_scaled.update(group)
        for group, _ in groups:
            s = scales[group[0]]
            x = feats[group[0]] / s
            for n in group:
                lin = layer.get_submodule(n)
                w = lin.weight.float() * (s if n in input_scaled else 1.0)
                if spec["clip"] and not any(n.endswith(c) for c in NO_CLIP):
                    G = w.shape[1] // (gs or w.shape[1])
                    m = search_clip(w, x, bits, gs, spec["n_grid"])  # (out, G, 1)
                    w = torch.clamp(w.reshape(w.shape[0], G, -1), -m, m).reshape(w.shape)
                iw = rtn(w, bits, gs, sym=False, where=f"layers.{i}.{n}")
                set_module(layer, n, int_linear(iw, lin, "awq", s if n in input_scaled else None))
                if progress is not None:
                    progress(f"layers.{i}.{n}")
        inputs.hidden = float_out  # AutoAWQ feeds the next block the float block's outputs


def _same_output(layer: nn.Module, inputs: LayerInputs, i: int, ref: torch.Tensor, tol: float = 1e-3) -> bool:
    out = inputs.run(layer, i, 0)
    return bool((out - ref).abs().max() <= tol * ref.abs().max().clamp(min=1e-6))
