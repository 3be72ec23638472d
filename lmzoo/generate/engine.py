"""The decode loop behind ``generate`` and ``stream``: every causal decoder runs on the serving engine.

A causal decoder's or T5's batch goes through ``continuous.Engine`` (the paged KV cache and scheduler that
``lmzoo serve`` and the RL rollouts use too): the left pads are dropped, each row becomes a request,
and the engine is sized so that every row is prefilled in the first step and decoded one token per step
after it (all rows admitted at once, enough blocks that nothing is preempted, no prefix sharing). A row
leaves the batch when it stops; ``stream`` keeps yielding the pad token for it, as transformers does, so
the output stays one rectangular tensor. Sampled rows draw from their own generators, seeded from
``generator`` (or torch's global generator) in row order, so the same generator state gives the same
tokens. The models the pool cannot hold keep their own loops: the prefix decoder (ChatGLM-6B, per-row
cache state) and a model with a compiled decode step (``compiled.py``: static shapes) the static cache loop below, an encoder-decoder whose cross-attention K/V do not fit the
pool's slots ``seq2seq.py``.

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
from lmzoo.generate.compiled import cache_bucket, mark_dynamic
from lmzoo.generate.paged import pageable
from lmzoo.generate.requests import SamplingParams, is_sharded
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


def _stream(model, input_ids, attention_mask, *, max_new_tokens, do_sample, temperature, top_k, top_p,
            repetition_penalty, eos_token_id, pad_token_id, generator, decoder_start_token_id, with_logits,
            all_done) -> Iterator:
    enc_dec = bool(getattr(model, "is_encoder_decoder", False))  # the prompt goes to the encoder
    if enc_dec and (with_logits or all_done is not None):
        raise LmzooError("generate: with_logits and all_done are for decoder-only models; an encoder-decoder "
                         "streams ids only")
    step = getattr(model, "decode_step", None)  # compiled.py: a compiled forward runs the static-cache loop
    paged = pageable(model) and step is None  # the serving engine can hold its cache
    if enc_dec and not paged:  # cross-attention K/V the pool cannot hold: seq2seq.py's own loop
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
        raise LmzooError("generate: the input is empty; give the encoder at least one token" if enc_dec else
                         "generate: the prompt is empty; give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    # the context the model was trained for (an encoder-decoder's relative positions have none)
    limit = None if enc_dec else getattr(model.config, "max_positions", None)
    if limit is not None and T + max_new_tokens > limit:
        raise LmzooError(f"generate: prompt of {T} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"context of {limit} tokens")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)).long()
    eos = torch.tensor(_eos_set(eos_token_id), device=device, dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    if paged:
        yield from _stream_paged(model, input_ids, mask, max_new_tokens=max_new_tokens, proc=proc, eos=eos.tolist(),
                                 pad=pad, generator=generator, with_logits=with_logits, all_done=all_done,
                                 context=limit or T + 1 + max_new_tokens, decoder_start=decoder_start_token_id)
        return
    cache = model.new_cache(B, T + max_new_tokens if step is None else cache_bucket(T + max_new_tokens, limit))
    if step is not None:
        mark_dynamic(input_ids, mask, cache)
    seen = input_ids
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_ids, step_mask = input_ids, mask
    for _ in range(max_new_tokens):
        logits = (step or model)(step_ids, attention_mask=step_mask if not bool(mask.all()) else None, cache=cache,
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


def _stream_paged(model, input_ids, mask, *, max_new_tokens, proc, eos, pad, generator, with_logits, all_done,
                  context, decoder_start=None) -> Iterator:
    """``_stream`` on the continuous-batching engine (see the module docstring)."""
    from lmzoo.generate.continuous import Engine, blocks_needed

    if max_new_tokens == 0:
        return
    B, device = input_ids.shape[0], input_ids.device
    rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask)]  # each row without its pads
    if not all(rows):
        raise LmzooError("generate: a row of the batch is all padding (its attention mask has no 1)")
    seeds = [None] * B
    if proc.do_sample:  # one seed per row from the caller's generator, so its state decides every token
        seeds = torch.randint(0, 2 ** 62, (B,), generator=generator,
                              device=generator.device if generator is not None else "cpu").tolist()
    block = 16
    was_training = model.training
    enc_dec = bool(getattr(model, "is_encoder_decoder", False))
    blocks = sum(blocks_needed(len(r), max_new_tokens, block, enc_dec) for r in rows)
    eng = Engine(model, block_size=block, num_blocks=blocks, max_batch=B, max_batched_tokens=sum(map(len, rows)) + B,
                 prefix_caching=False, context_length=context, keep_logits=with_logits,
                 decoder_start_token_id=decoder_start)
    try:
        rids = {eng.add_request(r, SamplingParams(
            max_tokens=max_new_tokens, temperature=proc.temperature if proc.do_sample else 0.0,
            top_p=proc.top_p or 1.0, top_k=proc.top_k or 0, repetition_penalty=proc.repetition_penalty or 1.0,
            seed=seed, stop_token_ids=tuple(eos), ignore_eos=True)): i for i, (r, seed) in enumerate(zip(rows, seeds))}
        vocab, live = None, set(rids)
        while True:
            if eng.has_unfinished():
                outs = eng.step()  # one forward: the prefill of every row, then one decode step each
                if {o.request_id for o in outs} != live:  # the engine was sized so that this never happens
                    raise LmzooError("generate: the engine left a row without its next token")
                live -= {o.request_id for o in outs if o.finished}
            else:  # this rank is done but others are not: the same forward calls keep FSDP's collectives paired
                outs = []
                with torch.no_grad():
                    model(torch.full((1, 1), pad, dtype=torch.long, device=device), logits_to_keep=1)
            nxt = torch.full((B,), pad, dtype=torch.long, device=device)
            raw = None
            for o in outs:
                nxt[rids[o.request_id]] = o.new_token_ids[0]
            if with_logits:
                vocab = vocab or (outs[0].new_logits[0].shape[-1] if outs else model.config.vocab_size)
                raw = torch.zeros(B, vocab, device=device)
                for o in outs:
                    raw[rids[o.request_id]] = o.new_logits[0]
            yield (nxt, raw) if with_logits else nxt
            finished = not eng.has_unfinished()
            if all_done(finished) if all_done is not None else finished:
                return
    finally:
        model.train(was_training)


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
