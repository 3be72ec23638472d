"""The decode loop: prefill the prompt into a KV cache, then one token per step.

The engine owns the cache (``model.new_cache``) and the growing attention mask; left-padded
batches work because the model derives positions from the mask. Finished rows (EOS seen) keep
emitting the pad token, as transformers does, so the output stays one rectangular tensor.

``stream(..., with_logits=True)`` also yields each step's (B, V) float32 logits as the model gave them
(before the penalty, temperature, top-k and top-p): the one seam through which RL rollouts
(``lmzoo.rl.rollout``) record the log-probabilities of what was sampled, without a loop of their own.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from lmzoo.errors import LmzooError
from lmzoo.generate.sampling import LogitsProcessor, choose, process_logits
from lmzoo.generate.beam import beam_search
from lmzoo.generate.seq2seq import decoder_start, stream_seq2seq


def _eos_set(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def stream(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
           max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, repetition_penalty: float | None = None, eos_token_id=None,
           pad_token_id: int | None = None, generator: torch.Generator | None = None,
           decoder_start_token_id: int | None = None, with_logits: bool = False,
           all_done=None) -> Iterator:
    """Yield the (B,) next-token ids one step at a time (pad for rows that already finished);
    ``with_logits``: yield (ids, the (B, V) float32 logits they were chosen from, unprocessed).
    ``all_done(mine: bool) -> bool`` decides when to stop instead of this batch alone: under FSDP every
    rank must make the same forward calls, so ranks stop together (``lmzoo.rl.rollout.ranks_done``).
    Runs under ``torch.inference_mode``, or ``no_grad`` on a model FSDP2 sharded (it keeps the buffers it
    gathers parameters into, and tensors made in inference mode could not be reused by training)."""
    mode = torch.no_grad() if is_sharded(model) else torch.inference_mode()
    yield from mode(_stream)(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                             pad_token_id=pad_token_id, generator=generator,
                             decoder_start_token_id=decoder_start_token_id, with_logits=with_logits,
                             all_done=all_done)


def is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(model, FSDPModule) or getattr(model, "sharded", False) is True  # or a view of one


def _stream(model, input_ids, attention_mask, *, max_new_tokens, do_sample, temperature, top_k, top_p,
            repetition_penalty, eos_token_id, pad_token_id, generator, decoder_start_token_id, with_logits,
            all_done) -> Iterator:
    if getattr(model, "is_encoder_decoder", False):  # the prompt goes to the encoder: see seq2seq.py
        if with_logits or all_done is not None:
            raise LmzooError("generate: with_logits and all_done are for decoder-only models; an encoder-decoder "
                             "streams ids only")
        yield from stream_seq2seq(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                  do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                                  pad_token_id=pad_token_id, generator=generator,
                                  decoder_start_token_id=decoder_start_token_id)
        return
    if not hasattr(model, "new_cache"):  # an encoder (BERT) predicts masked tokens, not the next one
        raise LmzooError(f"generate: {type(model).__name__} is not a decoder; it has no next-token head or cache")
    proc = LogitsProcessor(do_sample, temperature, top_k, top_p, repetition_penalty)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    B, T = input_ids.shape
    if T == 0:
        raise LmzooError("generate: the prompt is empty; give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = getattr(model.config, "max_positions", None)  # the context the model was trained for
    if limit is not None and T + max_new_tokens > limit:
        raise LmzooError(f"generate: prompt of {T} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"context of {limit} tokens")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)).long()
    eos = torch.tensor(_eos_set(eos_token_id), device=device, dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    cache = model.new_cache(B, T + max_new_tokens)
    seen = input_ids
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_ids, step_mask = input_ids, mask
    for _ in range(max_new_tokens):
        logits = model(step_ids, attention_mask=step_mask if not bool(mask.all()) else None, cache=cache,
                       logits_to_keep=1).logits
        raw = logits[:, -1].float()  # (B, V)
        nxt = choose(process_logits(raw, seen, proc), proc, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        yield (nxt, raw) if with_logits else nxt
        if len(eos):
            done |= torch.isin(nxt, eos)
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_ids, step_mask = nxt[:, None], mask
        finished = bool(done.all())
        if all_done(finished) if all_done is not None else finished:
            return


def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             num_beams: int = 1, **kw) -> torch.Tensor:
    """Prompt followed by the new tokens, (B, T + n_new), like ``transformers.generate``; for an
    encoder-decoder, the decoder's start token followed by the new tokens. ``num_beams > 1`` runs
    beam search (``beam.py``)."""
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if num_beams > 1:
        return beam_search(model, input_ids, attention_mask, num_beams=num_beams, **kw)
    head = input_ids
    if getattr(model, "is_encoder_decoder", False):
        head = decoder_start(model, input_ids.shape[0], input_ids.device, kw.get("decoder_start_token_id"))
    steps = list(stream(model, input_ids, attention_mask, **kw))
    if not steps:
        return head
    return torch.cat([head.to(steps[0].device), torch.stack(steps, dim=1)], dim=1)
