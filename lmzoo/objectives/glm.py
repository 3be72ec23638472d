"""GLM's autoregressive blank infilling (Du et al. 2022, section 2.1), as ChatGLM-6B is pretrained
(GLM-130B's mix: short [MASK] blanks and one long [gMASK] blank at the end).

A row x is split into Part A, the text with each chosen span replaced by one mask token, and
Part B, the spans in a random order, each opened by <sop> and written left to right:

    x      = x0 x1 x2 x3 x4 x5          spans: (x2 x3) and (x5)
    input  = x0 x1 [M] x4 [M] | <sop> x5 <sop> x2 x3          (span order shuffled)
    target = -  -  -   -  -   |  x5  <eop> x2  x3  <eop>
    pos    = 0  1  2   3  4   |  4    4    2   2   2          (a span's tokens sit at its [M])
    block  = 0  0  0   0  0   |  1    2    1   2   3          (1, 2, ... inside each span)

Part A attends bidirectionally, Part B causally (plus all of A): exactly ChatGLM-6B's prefix mask,
which the model derives from the first <sop>. Target t is the token at input t+1 of the same span
(or <eop> after its last token), so the loss needs no shift. ``lmzoo/models/chatglm`` reads
positions as (B, 2, T) = (position, block position), [MASK] = ``mask_token_id``, [gMASK] =
``gmask_token_id``, <sop> = ``bos_token_id``, <eop> = ``eos_token_id``.

The sampling (GLM-130B, section 2.1 of its paper): with probability ``gmask_prob`` (0.7) one
[gMASK] span covers a suffix of 50-100% of the row (GLM's "document-level" objective, section 2.3);
otherwise [MASK] spans cover 15% of the row with mean length 3 (T5's ``random_spans_noise_mask``).
Rows differ in length, so the batch is right-padded (attention_mask 0, target -100).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmzoo.objectives.span_corruption import random_spans_noise_mask


@dataclass(frozen=True)
class GLMTokens:
    mask_id: int  # [MASK]
    gmask_id: int  # [gMASK]
    sop_id: int  # <sop>, the model's bos_token_id
    eop_id: int  # <eop>, the model's eos_token_id
    pad_id: int = 0

    @classmethod
    def from_config(cls, cfg) -> "GLMTokens":
        return cls(cfg.mask_token_id, cfg.gmask_token_id, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id or 0)


def blank_infill(tokens: list[int], spans: list[tuple[int, int]], order: list[int], mask_id: int,
                 ids: GLMTokens) -> tuple[list[int], list[int], list[int], list[int]]:
    """(input, target, position, block) of one row with ``spans`` [(start, end), ...] (sorted, not
    overlapping) replaced by ``mask_id``, and Part B written in the span order ``order``."""
    part_a, where = [], []  # where[k]: the index in Part A of span k's mask token
    prev = 0
    for s, e in spans:
        part_a += tokens[prev:s]
        where.append(len(part_a))
        part_a.append(mask_id)
        prev = e
    part_a += tokens[prev:]
    inp, tgt = list(part_a), [-100] * len(part_a)
    pos, block = list(range(len(part_a))), [0] * len(part_a)
    for k in order:
        s, e = spans[k]
        span = tokens[s:e]
        inp += [ids.sop_id] + span
        tgt += span + [ids.eop_id]
        pos += [where[k]] * (len(span) + 1)
        block += list(range(1, len(span) + 2))
    return inp, tgt, pos, block


def sample_spans(length: int, generator: torch.Generator, gmask_prob: float = 0.7, density: float = 0.15,
                 mean_span: float = 3.0) -> tuple[list[tuple[int, int]], bool]:
    """(spans, is_gmask): one suffix of 50-100% of the row, or T5-style short spans."""
    if float(torch.rand((), generator=generator)) < gmask_prob:
        lo = max(1, (length + 1) // 2)
        n = int(torch.randint(lo, length, (), generator=generator)) if length > lo else length - 1
        return [(length - n, length)], True
    noise = random_spans_noise_mask(length, generator, density, mean_span).tolist()
    spans, start = [], None
    for i, z in enumerate(noise + [False]):
        if z and start is None:
            start = i
        elif not z and start is not None:
            spans.append((start, i))
            start = None
    return spans, False


def make_transform(ids: GLMTokens, gmask_prob: float = 0.7, density: float = 0.15, mean_span: float = 3.0):
    """``transform(batch, generator)``: (B, L) packed rows -> input_ids, position_ids (B, 2, N),
    targets and attention_mask, right-padded to the longest row."""

    def transform(batch: dict, generator: torch.Generator) -> dict:
        rows = []
        for row in batch["input_ids"].tolist():
            spans, g = sample_spans(len(row), generator, gmask_prob, density, mean_span)
            order = torch.randperm(len(spans), generator=generator).tolist()
            rows.append(blank_infill(row, spans, order, ids.gmask_id if g else ids.mask_id, ids))
        N = max(len(r[0]) for r in rows)
        out = {k: torch.full((len(rows), N), v, dtype=torch.long) for k, v in
               (("input_ids", ids.pad_id), ("targets", -100), ("attention_mask", 0))}
        out["position_ids"] = torch.zeros(len(rows), 2, N, dtype=torch.long)
        for i, (inp, tgt, pos, block) in enumerate(rows):
            n = len(inp)
            out["input_ids"][i, :n] = torch.tensor(inp)
            out["targets"][i, :n] = torch.tensor(tgt)
            out["attention_mask"][i, :n] = 1
            out["position_ids"][i, 0, :n] = torch.tensor(pos)
            out["position_ids"][i, 1, :n] = torch.tensor(block)
        return out

    return transform


def glm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, N, V) logits against position-aligned targets (no shift); -100 is ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def make_step_fn():
    """``step_fn(model, batch)`` for ChatGLM-6B (``GLMPrefixLM``): explicit 2D positions, prefix from <sop>."""

    def step_fn(model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"])
        return glm_loss(out.logits, batch["targets"]), {"n_tokens": int((batch["targets"] != -100).sum())}

    return step_fn
