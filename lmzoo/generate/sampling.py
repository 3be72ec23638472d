"""Turning next-token logits into a choice: repetition penalty, temperature, top-k, top-p.

The order is transformers' (penalty, then temperature, then top-k, then top-p), so that a seeded
sampler sees the same distribution as ``transformers.generate`` would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogitsProcessor:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def process_logits(logits: torch.Tensor, seen: torch.Tensor, p: LogitsProcessor) -> torch.Tensor:
    """(B, V) float32 logits -> processed logits; ``seen`` (B, S) holds the ids generated or prompted so far."""
    if p.repetition_penalty is not None and p.repetition_penalty != 1.0:
        # CTRL (Keskar et al. 2019): make every seen token less likely, whatever its logit's sign.
        score = logits.gather(1, seen)
        score = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
        logits = logits.scatter(1, seen, score)
    if not p.do_sample:
        return logits
    if p.temperature != 1.0:
        logits = logits / p.temperature
    if p.top_k is not None and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): keep the smallest set whose mass reaches top_p.
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= (1 - p.top_p)
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose(logits: torch.Tensor, p: LogitsProcessor, generator: torch.Generator | None) -> torch.Tensor:
    if not p.do_sample:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
