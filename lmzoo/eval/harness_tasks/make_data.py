"""Regenerate the JSONL files of the shipped harness tasks, deterministically, from lmzoo's own generators:
``python -m lmzoo.eval.harness_tasks.make_data`` rewrites them byte for byte (tests check this).

The text task reads the built-in corpus's bilingual documents only (``lmzoo.data.bilingual``, generated
by lmzoo), not its pydoc prose: builtin.py keeps that out of the repository, and it changes with the
Python version, so the committed file would not regenerate the same everywhere.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmzoo.data.bilingual import bilingual_documents
from lmzoo.data.numerals import to_chinese
from lmzoo.data.tasks import make_tasks

HERE = Path(__file__).resolve().parent
N_NUMBERS, N_ADD, N_TEXT_LINES = 100, 100, 200


def _distractors(n: int, r: random.Random) -> list[int]:
    """Three numbers a reader of the numeral could mistake for ``n``: a place off, a digit off, digits swapped."""
    s = str(n)
    near = {n * 10, n // 10, n + 1, n - 1, n + 10, n - 10, int(s[::-1]), int(s[0] + "0" + s[1:])}
    if len(s) > 1:
        near.add(int(s[1] + s[0] + s[2:]))
    near = sorted(m for m in near if m >= 0 and m != n)
    return r.sample(near, 3)


def zh_numbers(n: int = N_NUMBERS, seed: int = 0) -> list[dict]:
    """{"numeral", "choices" (4 digit strings), "label"}: the index of the digits the numeral means."""
    rows = []
    for i, task in enumerate(make_tasks("from_chinese", n, seed=seed, lang="en")):
        value = int(task.answer)
        r = random.Random(seed * 100_003 + i)
        choices = [value] + _distractors(value, r)
        r.shuffle(choices)
        assert to_chinese(value) in task.prompt
        rows.append({"numeral": to_chinese(value), "choices": [str(c) for c in choices],
                     "label": choices.index(value)})
    return rows


def add(n: int = N_ADD, seed: int = 0) -> list[dict]:
    """{"prompt": "What is 7 + 12?", "answer": "19"}: easy additions, answers of one or two tokens."""
    return [{"prompt": t.prompt, "answer": t.answer} for t in make_tasks("add", n, seed=seed, lang="en", level="easy")]


def text(n_lines: int = N_TEXT_LINES, seed: int = 0) -> list[dict]:
    """{"text": one line}: the first ``n_lines`` non-empty lines of the bilingual documents."""
    lines = [ln.strip() for doc in bilingual_documents(n_lines, seed=seed) for ln in doc.splitlines() if ln.strip()]
    return [{"text": ln} for ln in lines[:n_lines]]


FILES = {"zh_numbers.jsonl": zh_numbers, "add.jsonl": add, "text.jsonl": text}


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def write_all(directory: str | Path = HERE) -> list[Path]:
    """Write every task's JSONL into ``directory``; returns the paths."""
    out = []
    for name, make in FILES.items():
        path = Path(directory) / name
        path.write_text(render(make()), encoding="utf-8")
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write_all():
        print(f"{p}: {p.stat().st_size} bytes")
