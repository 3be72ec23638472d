"""Chunked (fused linear) cross-entropy: the head and the next-token loss, a chunk of tokens at a time.

The plain path materialises ``logits = h Wᵀ + b`` for the whole batch, (B·T, V), and
``F.cross_entropy`` upcasts it to float32 and keeps the softmax for backward: at V = 32000 and
B·T = 16k tokens that is 2 GB per copy, more than the rest of a small model's activations. Here
(the approach of Liger Kernel's fused linear cross-entropy and Unsloth's chunked loss) each chunk
of C tokens gets its logits, its loss and, in the same pass, its gradients:

    z_i = W h_i + b                                    (logits of token i, float32, C × V at a time)
    L   = 1/N · Σ_i [logsumexp(z_i) − z_{i, y_i}]      (N: tokens whose label is not ignored)
    ∂L/∂z_i = (softmax(z_i) − onehot(y_i)) / N
    ∂L/∂h_i = (∂L/∂z_i) W,   ∂L/∂W = Σ_i (∂L/∂z_i)ᵀ h_i,   ∂L/∂b = Σ_i ∂L/∂z_i

so nothing of size (B·T, V) ever exists: the peak is O(C·V) for the chunk plus the gradients of
``hidden`` (B, T, D) and of the head (V, D), which backward would hold anyway. Backward only scales
the stored gradients by the incoming grad (a scalar), so the head is not recomputed. Without
autograd (evaluation) only the loss is computed.

Labels are shifted exactly as ``nn.transformer.causal_lm_loss`` shifts them (position t predicts
labels[t+1]; the last position is ignored), and ignored positions are dropped before the head is
applied: a mostly-masked SFT batch pays only for its answer tokens. With every label ignored the
loss is NaN (0/0), as ``F.cross_entropy``'s mean is.

Precision: the matmuls run in the inputs' dtype (as ``nn.Linear`` would), the softmax and the
loss in float32 per chunk, and the head's gradient is accumulated over chunks in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_TOKENS = 1024  # at V = 32000: 131 MB of float32 logits per chunk (and as much for their grad)


def chunked_causal_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                           head_bias: torch.Tensor | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                           ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ head_weight.T + head_bias`` against ``labels``,
    equal to ``causal_lm_loss(F.linear(hidden, head_weight, head_bias), labels)`` (values and
    gradients) without materialising the (B·T, V) logits. ``hidden`` (B, T, D), ``head_weight``
    (V, D), ``head_bias`` (V,) or None, ``labels`` (B, T); ``chunk_tokens``: tokens per chunk."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if hidden.ndim != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (B, T, D) and labels (B, T); got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    if head_weight.ndim != 2 or head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"head_weight must be (V, D={hidden.shape[-1]}), got {tuple(head_weight.shape)}")
    if head_bias is not None and head_bias.shape != head_weight.shape[:1]:
        raise ValueError(f"head_bias must be (V={head_weight.shape[0]},), got {tuple(head_bias.shape)}")
    shift = F.pad(labels[:, 1:], (0, 1), value=ignore_index).to(hidden.device)  # (B, T): as causal_lm_loss
    tensors = (hidden, head_weight) + ((head_bias,) if head_bias is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _ChunkedLinearCE.apply(hidden, head_weight, head_bias, shift, chunk_tokens, ignore_index)
    h, y, keep = _select(hidden, shift, ignore_index)  # no autograd (evaluation): the loss alone
    return _chunked_ce(h, y, head_weight, head_bias, chunk_tokens)[0] / keep.numel()


def _select(hidden, shift_labels, ignore_index):
    """The (N, D) hidden states and (N,) labels of the tokens that count, and where they sit in B·T."""
    B, T, D = hidden.shape
    y = shift_labels.reshape(-1)
    keep = (y != ignore_index).nonzero().squeeze(1)  # ignored tokens contribute nothing: skip their head
    return hidden.reshape(B * T, D)[keep], y[keep], keep


def _chunked_ce(h, y, weight, bias, chunk_tokens, need_h=False, need_w=False, need_b=False):
    """(summed loss, ∂/∂h (N, D), ∂/∂W (V, D) float32, ∂/∂b (V,) float32) of the mean loss over the
    N rows of ``h``; a gradient not asked for is None."""
    n = h.shape[0]
    grad_h = torch.empty_like(h) if need_h else None  # (N, D)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, n, chunk_tokens):
        hc, yc = h[s:s + chunk_tokens], y[s:s + chunk_tokens]  # (C, D), (C,)
        z = F.linear(hc, weight, bias).float()  # (C, V): the only logits alive at any time
        lse = torch.logsumexp(z, dim=-1)  # (C,)
        total += (lse - z.gather(1, yc[:, None]).squeeze(1)).sum()
        if not (need_h or need_w or need_b):
            continue
        # ∂(mean loss)/∂z = (softmax(z) − onehot(y)) / N, built in place of z
        g = z.sub_(lse[:, None]).exp_()
        g[torch.arange(len(yc), device=g.device), yc] -= 1.0
        g = g.div_(n).to(weight.dtype)  # (C, V)
        if need_h:
            grad_h[s:s + chunk_tokens] = g @ weight  # (C, D)
        if need_w:
            grad_w += (g.t() @ hc).float()  # (V, D)
        if need_b:
            grad_b += g.float().sum(0)
    return total, grad_h, grad_w, grad_b


class _ChunkedLinearCE(torch.autograd.Function):
    """Forward computes the loss and all gradients chunk by chunk; backward scales them by grad_out."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, shift_labels, chunk_tokens, ignore_index):
        h, y, keep = _select(hidden, shift_labels, ignore_index)
        need = ctx.needs_input_grad
        total, grad_h, grad_w, grad_b = _chunked_ce(h, y, weight, bias, chunk_tokens, need_h=need[0],
                                                    need_w=need[1], need_b=bias is not None and need[2])
        ctx.save_for_backward(grad_h, grad_w, grad_b, keep)
        ctx.shape, ctx.dtypes = hidden.shape, (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total / keep.numel()  # NaN when every label is ignored, as F.cross_entropy's mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b, keep = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        dh = dw = db = None
        if grad_h is not None:
            B, T, D = ctx.shape
            dh = grad_h.new_zeros(B * T, D).index_copy_(0, keep, grad_h)  # ignored positions get 0
            dh = (dh * grad_out.to(h_dtype)).view(B, T, D)
        if grad_w is not None:
            dw = (grad_w * grad_out).to(w_dtype)
        if grad_b is not None:
            db = (grad_b * grad_out).to(b_dtype)
        return dh, dw, db, None, None, None
