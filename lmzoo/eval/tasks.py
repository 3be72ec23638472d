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
    from lmzoo.generate import generate

    stops = [i for i in (stop_ids if stop_ids is not None else [tok.eos_id]) if i is not None]
    pad = tok.pad_id if tok.pad_id is not None else (stops[0] if stops else 0)
    device = next(model.parameters()).device
    replies = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        prompts = [tok.apply_chat_template(c, add_generation_prompt=True, template=template).ids for c in chunk]
        if max_len is not None:
            prompts = [p[-(max_len - max_new_tokens):] for p in prompts]  # the prompt's end: where it asks
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # (B, T) left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                       pad_token_id=pad)
        for row in out[:, width:].tolist():
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            replies.append(tok.decode(row[:cut], skip_special_tokens=True))
    return replies


def task_accuracy(model, tok, tasks: list[Task], template: str | None, **kw) -> tuple[float, list[str]]:
    """(exact-match accuracy, the replies) of greedy answers to ``tasks``."""
    if not tasks:
        return float("nan"), []
    replies = greedy_replies(model, tok, [task_messages(t) for t in tasks], template, **kw)
    right = sum(check(t, r) for t, r in zip(tasks, replies))
    return right / len(tasks), replies
