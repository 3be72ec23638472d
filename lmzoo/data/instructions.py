"""Built-in instruction data, made by lmzoo itself: what ``lmzoo sft`` trains on without ``--data``.

Two sources, both deterministic for a seed and with short answers a tiny model can learn:

- the verifiable tasks of ``lmzoo.data.tasks`` (arithmetic, Chinese numerals, sorting), the prompt
  as the user turn and the bare answer as the assistant turn ("What is 37 + 58?" -> "95");
- the bilingual sentences of ``lmzoo.data.bilingual`` as translation requests
  ("Translate into Chinese: 37 plus 58 equals 95." -> "三十七加五十八等于九十五。").

A fifth of the conversations have two rounds and a tenth a system prompt, so multi-turn masking and
system turns are trained too. ``builtin_sft_data`` also returns held-out tasks whose prompts never
occur in the training data; evaluation asks each with ``task_messages(task)`` (and
``add_generation_prompt=True``), decodes greedily and scores the reply with
``lmzoo.data.tasks.check(task, reply)``: exact-match accuracy by value.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmzoo.data.bilingual import TEMPLATES as SENTENCES
from lmzoo.data.tasks import Task, make_tasks
from lmzoo.errors import LmzooError

SYSTEM = {"en": "You are a precise assistant. Reply with the answer only.",
          "zh": "你是一个严谨的助手，只回答结果。"}
TRANSLATE = {("en", "zh"): "Translate into Chinese: ", ("zh", "en"): "Translate into English: "}
TRANSLATE_ZH = {("en", "zh"): "把下面的句子翻译成中文：", ("zh", "en"): "把下面的句子翻译成英文："}


@dataclass
class BuiltinSFT:
    train: list[list[dict]]  # conversations
    train_tasks: list[Task]  # the verifiable tasks inside ``train`` (one or two per conversation)
    eval_tasks: list[Task]  # held out: no prompt among the training prompts


def task_messages(task: Task) -> list[dict]:
    """The prompt of ``task`` as a conversation to continue (render it with add_generation_prompt)."""
    return [{"role": "user", "content": task.prompt}]


def _translation(r: random.Random, lang: str) -> tuple[str, str]:
    """(instruction, answer): an English or Chinese sentence to translate the other way."""
    en, zh = r.choice(SENTENCES)(r)
    src, dst = r.choice([("en", "zh"), ("zh", "en")])
    text, answer = (en, zh) if src == "en" else (zh, en)
    ask = TRANSLATE if lang == "en" else TRANSLATE_ZH
    return ask[(src, dst)] + text, answer


def builtin_sft_data(n: int = 2000, seed: int = 0, lang: str = "mixed", n_eval: int = 200,
                     translation_fraction: float = 0.25, kinds="all", level: str = "full") -> BuiltinSFT:
    """``n`` training conversations and ``n_eval`` held-out tasks; ``lang`` is "en", "zh" or "mixed"
    (the language of the instructions; translations always pair both); ``kinds`` and ``level`` choose
    the tasks (``lmzoo.data.tasks.make_tasks``)."""
    if lang not in ("en", "zh", "mixed"):
        raise LmzooError(f"lang must be 'en', 'zh' or 'mixed', got '{lang}'")
    if n < 1 or n_eval < 0:
        raise LmzooError(f"n must be at least 1 and n_eval at least 0, got n={n}, n_eval={n_eval}")
    r = random.Random(seed)
    tasks = iter(make_tasks(kinds, 2 * n, seed=seed, lang=lang, level=level))
    train, train_tasks = [], []
    for _ in range(n):
        use = lang if lang != "mixed" else r.choice(("en", "zh"))
        rounds = 2 if r.random() < 0.2 else 1
        messages = [{"role": "system", "content": SYSTEM[use]}] if r.random() < 0.1 else []
        for _ in range(rounds):
            if r.random() < translation_fraction:
                prompt, answer = _translation(r, use)
            else:
                task = next(tasks)
                train_tasks.append(task)
                prompt, answer = task.prompt, task.answer
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        train.append(messages)
    seen = {m["content"] for c in train for m in c if m["role"] == "user"}
    eval_tasks, k = [], 1
    while len(eval_tasks) < n_eval:  # fresh seeds until enough unseen prompts (nearly all are unseen)
        for t in make_tasks(kinds, 2 * n_eval, seed=seed * 1_000_003 + k, lang=lang, level=level):
            if t.prompt not in seen and len(eval_tasks) < n_eval:
                seen.add(t.prompt)
                eval_tasks.append(t)
        k += 1
        if k > 50:
            raise LmzooError(f"could not find {n_eval} task prompts unseen in training")
    return BuiltinSFT(train=train, train_tasks=train_tasks, eval_tasks=eval_tasks)
