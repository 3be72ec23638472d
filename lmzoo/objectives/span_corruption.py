"""T5's span corruption (Raffel et al. 2020, section 3.1.4 and 3.3.4): 15% noise, mean span length 3.

Following the T5 code's ``random_spans_noise_mask`` for a sequence of L tokens:

    n_noise  = clip(round(L · density), 1, L - 1)
    n_spans  = max(round(n_noise / mean_span), 1)
    noise span lengths:     a random split of n_noise into n_spans positive parts
    non-noise span lengths: a random split of L - n_noise into n_spans positive parts
    spans alternate non-noise, noise, non-noise, noise, ... (the sequence starts with non-noise)

(a random split of n items into k positive parts: shuffle k - 1 "start here" marks among the
first n - 1 gaps.) Then ``noise_span_to_unique_sentinel``: in the input every noise span becomes
one sentinel, in the target every non-noise span becomes one, numbered from the end of the
vocabulary (sentinel i = vocab_size - 1 - i, as <extra_id_0> is T5's last id), and both end in eos:

    tokens  x0 x1 x2 x3 x4 x5 x6 x7 ,  noise at x2 x3 and x6 x7
    input   x0 x1 <X0> x4 x5 <X1> </s>
    target  <X0> x2 x3 <X1> x6 x7 </s>

(a kept span at the very end would give the target a last sentinel too, as in the T5 code.)

Every row of length L gives inputs of L - n_noise + n_spans + 1 and targets of n_noise + n_spans + 1
tokens, both fixed by L, so a packed batch needs no padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def noise_counts(length: int, density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(n_noise, n_spans) for a sequence of ``length`` tokens, as random_spans_noise_mask computes them."""
    length = max(length, 2)
    n_noise = min(max(int(round(length * density)), 1), length - 1)
    n_spans = max(int(round(n_noise / mean_span)), 1)
    return n_noise, n_spans


def _random_segmentation(n_items: int, n_segments: int, generator: torch.Generator) -> torch.Tensor:
    """(n_segments,) positive lengths summing to n_items, uniformly over the compositions."""
    marks = (torch.arange(n_items - 1) < n_segments - 1).long()[torch.randperm(n_items - 1, generator=generator)]
    first_in_segment = F.pad(marks, (1, 0))  # (n_items,): 1 where a new segment starts
    segment_id = first_in_segment.cumsum(0)
    return torch.bincount(segment_id, minlength=n_segments)


def random_spans_noise_mask(length: int, generator: torch.Generator, density: float = 0.15,
                            mean_span: float = 3.0) -> torch.Tensor:
    """(length,) bool: True on noise tokens; starts with a non-noise span (T5's rule)."""
    orig = length
    length = max(length, 2)
    n_noise, n_spans = noise_counts(length, density, mean_span)
    noise_lens = _random_segmentation(n_noise, n_spans, generator)
    keep_lens = _random_segmentation(length - n_noise, n_spans, generator)
    interleaved = torch.stack([keep_lens, noise_lens], 1).reshape(-1)  # (2·n_spans,) keep, noise, keep, ...
    span_starts = interleaved.cumsum(0)[:-1]
    indicator = torch.zeros(length, dtype=torch.long)
    indicator[span_starts] = 1
    return (indicator.cumsum(0) % 2 == 1)[:orig]


def sentinel_ids(vocab_size: int, n: int) -> torch.Tensor:
    """The first ``n`` sentinels: vocab_size - 1, vocab_size - 2, ... (<extra_id_0>, <extra_id_1>, ...)."""
    return vocab_size - 1 - torch.arange(n)


def noise_span_to_unique_sentinel(tokens: torch.Tensor, noise_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Replace each run of ``noise_mask`` tokens by one sentinel (the i-th run by sentinel i)."""
    prev = F.pad(noise_mask[:-1], (1, 0))
    first = noise_mask & ~prev
    later = noise_mask & prev
    sentinel = vocab_size - first.long().cumsum(0)  # vocab_size - 1 at the first run, - 2 at the second...
    return torch.where(first, sentinel, tokens)[~later]


def corrupt(tokens: torch.Tensor, noise_mask: torch.Tensor, vocab_size: int, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) of one sequence: sentinels for noise in the input and for kept text in the target."""
    eos = tokens.new_tensor([eos_id])
    inputs = noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size)
    targets = noise_span_to_unique_sentinel(tokens, ~noise_mask, vocab_size)
    return torch.cat([inputs, eos]), torch.cat([targets, eos])


def make_transform(*, vocab_size: int, eos_id: int, density: float = 0.15, mean_span: float = 3.0):
    """``transform(batch, generator)``: (B, L) packed rows -> ``input_ids`` and ``labels`` (no padding)."""

    def transform(batch: dict, generator: torch.Generator) -> dict:
        ins, outs = [], []
        for row in batch["input_ids"]:
            noise = random_spans_noise_mask(row.shape[0], generator, density, mean_span)
            i, t = corrupt(row, noise, vocab_size, eos_id)
            ins.append(i)
            outs.append(t)
        return {"input_ids": torch.stack(ins), "labels": torch.stack(outs)}

    return transform


def seq2seq_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of decoder logits (B, T, V) against the labels themselves (no shift: the
    decoder reads the labels shifted right); -100 is ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def make_step_fn():
    """``step_fn(model, batch)`` for an encoder-decoder that builds its decoder inputs from ``labels``."""

    def step_fn(model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
        return seq2seq_loss(out.logits, batch["labels"]), {"n_tokens": int((batch["labels"] != -100).sum())}

    return step_fn
