"""Exact-match accuracy on verifiable tasks: ask each task's prompt through the chat template, decode
greedily with the one inference engine (``lmzoo.generate``), and score the reply with the task's
checker (``lmzoo.data.tasks.check``: compared as values, so "95", "95." and "答案：95" all count).

    accuracy = |{t : check(t, greedy_reply(t))}| / |tasks|
"""

from __future__ import annotations

import torch

from lmzoo.data.instructions import task_messages
from lmzoo.data.tasks import Task, check


def greedy_replies(model, tok, conversations, template: str | None, *, max_new_tokens: int = 32,
                   stop_ids: list[int] | None = None, batch_size: int = 16, max_len: int | None = None) -> list[str]:
    """The greedy reply to each conversation (rendered with ``add_generation_prompt``), decoded without
    special tokens and cut at the first stop id. Prompts are left-padded in batches."""
    return [r[0] for r in sampled_replies(model, tok, conversations, template, max_new_tokens=max_new_tokens,
                                          stop_ids=stop_ids, batch_size=batch_size, max_len=max_len)]


@torch.no_grad()
def sampled_replies(model, tok, conversations, template: str | None, *, n: int = 1, temperature: float = 0.0,
                    seed: int = 0, max_new_tokens: int = 32, stop_ids: list[int] | None = None, batch_size: int = 16,
                    max_len: int | None = None, progress=None) -> list[list[str]]:
    """``n`` replies to each conversation: greedy at ``temperature`` 0, else sampled at that temperature
    with a generator seeded by ``seed`` (the same replies for the same seed). One list per conversation.
    Prompts are left-padded in batches of ``batch_size`` rows (each prompt repeated ``n`` times); longer
    prompts than ``max_len - max_new_tokens`` keep their end (where they ask). ``progress(done, total)``
    is called after each batch."""
    from lmzoo.generate import generate

    stops = [i for i in (stop_ids if stop_ids is not None else [tok.eos_id]) if i is not None]
    pad = tok.pad_id if tok.pad_id is not None else (stops[0] if stops else 0)
    device = next(model.parameters()).device
    sample = temperature > 0
    gen = torch.Generator(device=device).manual_seed(seed) if sample else None
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, template=template).ids for c in conversations]
    if max_len is not None:
        prompts = [p[-(max_len - max_new_tokens):] for p in prompts]
    rows = [p for p in prompts for _ in range(n)]
    was = model.training
    model.eval()
    texts = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # (B, T) left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                       pad_token_id=pad, do_sample=sample, temperature=temperature if sample else 1.0, generator=gen)
        for row in out[:, width:].tolist():
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            texts.append(tok.decode(row[:cut], skip_special_tokens=True))
        if progress is not None:
            progress(min(start + batch_size, len(rows)), len(rows))
    model.train(was)
    return [texts[i * n:(i + 1) * n] for i in range(len(conversations))]


def task_accuracy(model, tok, tasks: list[Task], template: str | None, **kw) -> tuple[float, list[str]]:
    """(exact-match accuracy, the replies) of greedy answers to ``tasks``."""
    if not tasks:
        return float("nan"), []
    replies = greedy_replies(model, tok, [task_messages(t) for t in tasks], template, **kw)
    right = sum(check(t, r) for t, r in zip(tasks, replies))
    return right / len(tasks), replies
