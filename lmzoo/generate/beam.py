"""Beam search for any model with a cache that can reorder its rows: decoder-only or encoder-decoder.

Each of the B inputs keeps ``num_beams`` running hypotheses. A step scores every (beam, token)
continuation by its summed log-probability, takes the best K = max(2, 1 + n_eos) · num_beams of
them (so that num_beams stay running even if the best ones end), moves candidates that end (EOS or
the length limit) among the best num_beams into the finished pool, scored sum / length**length_penalty,
and continues with the num_beams best that did not end. The cache rows follow their beams
(``cache.reorder``). The search stops when no running beam can beat the worst finished one
(transformers' heuristic for ``early_stopping=False``), when every input has num_beams finished
(``early_stopping=True``), or at ``max_new_tokens``. These are transformers' semantics, so the
same model gives the same ids.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from lmzoo.errors import LmzooError
from lmzoo.generate.sampling import LogitsProcessor, process_logits
from lmzoo.generate.seq2seq import decoder_start, eos_set

NEG = -1.0e9  # "impossible" score, as in transformers (not -inf, so sums stay finite)

Step = Callable[[torch.Tensor | None], torch.Tensor]  # last tokens (N,) or None for the prefill -> (N, V) logits


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, n, ...) rows picked per input by idx (B, k) -> (B, k, ...)."""
    return torch.take_along_dim(t, idx.view(*idx.shape, *([1] * (t.ndim - 2))), dim=1)


def _decoder_only(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None,
                  max_new: int) -> tuple[Step, object, torch.Tensor]:
    """Prompt in the cache, then one token per step; the mask grows with the sequence if padded. (The
    beams of one input share its mask, so reordering beams never reorders the mask.)"""
    N, T = ids.shape
    cache = model.new_cache(N, T + max_new)
    grown = mask if mask is not None and not bool(mask.all()) else None

    def step(tokens):
        nonlocal grown
        if tokens is None:
            return model(ids, attention_mask=grown, cache=cache, logits_to_keep=1).logits[:, -1]
        if grown is not None:
            grown = torch.cat([grown, torch.ones_like(grown[:, :1])], dim=1)
        return model(tokens[:, None], attention_mask=grown, cache=cache, logits_to_keep=1).logits[:, -1]

    return step, cache, ids


def _encoder_decoder(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, max_new: int, num_beams: int,
                     start_token_id: int | None) -> tuple[Step, object, torch.Tensor]:
    """Encode each input once, copy its states to its beams; the decoder starts from the start token."""
    enc = model.encode(ids, mask).repeat_interleave(num_beams, 0)  # (B·nb, S, D)
    mask = mask.repeat_interleave(num_beams, 0) if mask is not None else None
    N = enc.shape[0]
    cache = model.new_cache(N, 1 + max_new)
    prefix = decoder_start(model, N, enc.device, start_token_id)

    def step(tokens):
        dec = prefix if tokens is None else tokens[:, None]
        return model(attention_mask=mask, encoder_hidden_states=enc, decoder_input_ids=dec, cache=cache,
                     logits_to_keep=1).logits[:, -1]

    return step, cache, prefix


@torch.inference_mode()
def beam_search(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                num_beams: int = 4, max_new_tokens: int = 32, eos_token_id=None, pad_token_id: int | None = None,
                length_penalty: float = 1.0, early_stopping: bool | str = False, num_return_sequences: int = 1,
                repetition_penalty: float | None = None, decoder_start_token_id: int | None = None,
                do_sample: bool = False, **unused) -> torch.Tensor:
    """The best ``num_return_sequences`` hypotheses per input, (B·n, P + longest new), padded after EOS.

    P is the prompt length for a decoder-only model and 1 (the start token) for an encoder-decoder.
    """
    if do_sample:
        raise LmzooError("generate: beam search here is deterministic; use num_beams=1 to sample")
    for name, v in unused.items():
        if v not in (None, 1.0):
            raise LmzooError(f"generate: '{name}' is not used by beam search")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be in 1..num_beams ({num_beams})")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    mask = attention_mask.to(device) if attention_mask is not None else None
    B, nb = input_ids.shape[0], num_beams
    if getattr(model, "is_encoder_decoder", False):
        step, cache, prefix = _encoder_decoder(model, input_ids, mask, max_new_tokens, nb, decoder_start_token_id)
    else:
        if not hasattr(model, "new_cache"):
            raise LmzooError(f"generate: {type(model).__name__} is not a decoder; it has no next-token head or cache")
        limit = getattr(model.config, "max_positions", None)
        if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
            raise LmzooError(f"generate: prompt of {input_ids.shape[1]} tokens + max_new_tokens {max_new_tokens} "
                             f"exceeds the model's context of {limit} tokens")
        rows = input_ids.repeat_interleave(nb, 0)
        step, cache, prefix = _decoder_only(model, rows, mask.repeat_interleave(nb, 0) if mask is not None else None,
                                            max_new_tokens)
    P = prefix.shape[1]
    max_len = P + max_new_tokens
    eos = torch.tensor(eos_set(eos_token_id), device=device, dtype=torch.long)
    fill = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    K = max(2, 1 + len(eos)) * nb
    in_top = torch.arange(K, device=device) < nb  # only the best nb candidates may become final
    proc = LogitsProcessor(repetition_penalty=repetition_penalty)

    running = torch.full((B, nb, max_len), fill, dtype=torch.long, device=device)
    running[:, :, :P] = prefix.view(B, nb, P)  # prefix has one row per beam
    running_scores = torch.full((B, nb), NEG, device=device)
    running_scores[:, 0] = 0.0  # all beams start identical: let only the first one propose
    final, final_scores = running.clone(), torch.full((B, nb), NEG, device=device)
    final_len = torch.full((B, nb), P, dtype=torch.long, device=device)
    finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    cur, tokens = P, None
    while cur < max_len:
        logits = step(tokens).float()  # (B·nb, V)
        V = logits.shape[-1]
        logp = process_logits(F.log_softmax(logits, dim=-1), running[:, :, :cur].reshape(B * nb, cur), proc)
        total = (logp.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        top_scores, top_idx = torch.topk(total, K)  # (B, K)
        src, tok = top_idx // V, top_idx % V
        cand = _gather(running, src)  # (B, K, max_len)
        cand[:, :, cur] = tok
        ends = torch.isin(tok, eos) | (cur + 1 >= max_len)  # (B, K)

        # the best nb candidates that go on
        go_on = top_scores + ends.float() * NEG
        keep = torch.topk(go_on, nb).indices
        running, running_scores, beam_src = _gather(cand, keep), _gather(go_on, keep), _gather(src, keep)

        # candidates that end join the finished pool if they beat what is there
        score = top_scores / float(cur + 1 - P) ** length_penalty
        full = finished.all(-1, keepdim=True) & (early_stopping is True)
        score = score + (full | ~improvable | ~(ends & in_top)).float() * NEG
        pool = torch.topk(torch.cat([final_scores, score], 1), nb).indices
        final = _gather(torch.cat([final, cand], 1), pool)
        final_scores = _gather(torch.cat([final_scores, score], 1), pool)
        final_len = _gather(torch.cat([final_len, torch.full_like(tok, cur + 1)], 1), pool)
        finished = _gather(torch.cat([finished, ends & in_top], 1), pool)

        cache.reorder((beam_src + torch.arange(B, device=device)[:, None] * nb).view(-1))
        cur += 1
        tokens = running[:, :, cur - 1].reshape(-1)
        # can a running beam still beat the worst finished one?
        best_len = (max_len if early_stopping == "never" and length_penalty > 0 else cur) - P
        best_running = running_scores[:, :1] / float(best_len) ** length_penalty
        worst_final = torch.where(finished, final_scores.min(1, keepdim=True).values, torch.full_like(final_scores, NEG))
        improvable = improvable & (best_running > worst_final).any(-1, keepdim=True)
        if not bool(improvable.any()) or (bool(finished.all()) and early_stopping is True) or bool(ends.all()):
            break
    final, final_len = final[:, :num_return_sequences], final_len[:, :num_return_sequences]
    return final.reshape(B * num_return_sequences, max_len)[:, : int(final_len.max())]
