"""Encoder-decoder decoding (T5): encode once, then grow the decoder one token per step.

diff from the decoder-only loop in ``engine.py``: the prompt goes to the encoder, not into the
cache; the decoder starts from ``decoder_start_token_id`` (T5: the pad token); the first forward
computes every layer's cross-attention K/V from the encoder output and leaves them in the
``EncoderDecoderCache``, so later steps run the decoder alone on one new token. The result is the
decoder's sequence, start token first, as ``transformers.generate`` returns it.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from lmzoo.errors import LmzooError
from lmzoo.generate.sampling import LogitsProcessor, choose, process_logits


def eos_set(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def decoder_start(model: nn.Module, batch: int, device, start_token_id: int | None = None) -> torch.Tensor:
    """(B, 1) column of the decoder's start token."""
    start = model.decoder_start_token_id if start_token_id is None else start_token_id
    return torch.full((batch, 1), start, dtype=torch.long, device=device)


@torch.inference_mode()
def stream_seq2seq(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                   eos_token_id=None, pad_token_id: int | None = None, generator: torch.Generator | None = None,
                   decoder_start_token_id: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the (B,) next decoder ids one step at a time (pad for rows that already finished)."""
    proc = LogitsProcessor(do_sample, temperature, top_k, top_p, repetition_penalty)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.shape[1] == 0:
        raise LmzooError("generate: the input is empty; give the encoder at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    mask = attention_mask.to(device) if attention_mask is not None else None
    B = input_ids.shape[0]
    eos = torch.tensor(eos_set(eos_token_id), device=device, dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    seen = decoder_start(model, B, device, decoder_start_token_id)  # what the repetition penalty looks at
    cache = model.new_cache(B, 1 + max_new_tokens)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step = seen
    for _ in range(max_new_tokens):
        # input_ids and mask are read on the first step only: then the cache holds the cross K/V
        logits = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=step, cache=cache,
                       logits_to_keep=1).logits
        nxt = choose(process_logits(logits[:, -1].float(), seen, proc), proc, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        yield nxt
        if len(eos):
            done |= torch.isin(nxt, eos)
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        step = nxt[:, None]
        if bool(done.all()):
            return
