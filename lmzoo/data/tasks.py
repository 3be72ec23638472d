"""Tasks with verifiable answers, for the SFT and RL stages: each kind has a generator and a checker.

| kind | prompt (English or Chinese) | answer | checked by |
|---|---|---|---|
| ``add`` / ``sub`` / ``mul`` | "What is 37 + 58?" / "计算 37 + 58。" | "95" | the integer value |
| ``to_chinese`` | "Write 305 in Chinese numerals." | "三百零五" | ``from_chinese`` of the response equals 305 |
| ``from_chinese`` | "Write 三百零五 in digits." | "305" | the integer value |
| ``sort`` | "Sort ascending: 9 3 7" | "3 7 9" | the list of integers |

``make_tasks(kind, n, seed)`` is deterministic. ``check(task, response)`` reads the response's last
non-empty line, drops an "Answer:" / "答案：" label and closing punctuation, and compares *values*,
so "95", " 95." and "答案：95" all pass and "96" fails. It never raises on a malformed response:
that is simply wrong (False), which is what a reward function needs.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Callable

from lmzoo.data.numerals import from_chinese, to_chinese
from lmzoo.errors import LmzooError


@dataclass(frozen=True)
class Task:
    kind: str
    prompt: str
    answer: str
    lang: str  # "en" or "zh"

    def to_dict(self) -> dict:
        return asdict(self)


# How large the numbers get: "full" is the default; "easy" keeps every answer a few tokens long, for
# models small enough to finetune in seconds (tests, tiny demos); "medium" (two-digit operands) has
# too many problems to memorise (10,000 additions), so a model must learn the digits' rule; "small"
# sits between easy and medium: every kind but mul has more problems than a few thousand training
# tasks cover (961 additions, 1,000 numerals, 8,000 lists of three), so held-out problems exist for
# each, while the answers stay as short as easy's (the speedrun's level).
LEVELS = {"full": {"add": 999, "sub": 999, "mul": 99, "numeral": (99, 99999, 10 ** 9), "sort": (3, 8, 99)},
          "medium": {"add": 99, "sub": 99, "mul": 20, "numeral": (99, 9999), "sort": (3, 5, 99)},
          "small": {"add": 30, "sub": 30, "mul": 12, "numeral": (99, 999), "sort": (3, 3, 19)},
          "easy": {"add": 20, "sub": 20, "mul": 9, "numeral": (99,), "sort": (3, 3, 9)}}


def _arith(op: str, fn: Callable[[int, int], int], kind: str):
    def make(r: random.Random, lang: str, level: dict) -> Task:
        hi = level[kind]
        a, b = r.randint(0, hi), r.randint(0, hi)
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        prompt = f"What is {a} {op} {b}?" if lang == "en" else f"计算 {a} {op} {b}。"
        return Task({"+": "add", "-": "sub", "*": "mul"}[op], prompt, str(fn(a, b)), lang)
    return make


def _number(r: random.Random, level: dict) -> int:
    """0-99, 100-99999 or 10^5-10^9 with equal chance (the ranges the level allows)."""
    bounds = level["numeral"]
    k = r.randrange(len(bounds))
    return r.randint(0 if k == 0 else bounds[k - 1] + 1, bounds[k])


def _to_chinese(r: random.Random, lang: str, level: dict) -> Task:
    n = _number(r, level)
    prompt = f"Write {n} in Chinese numerals." if lang == "en" else f"把 {n} 写成中文数字。"
    return Task("to_chinese", prompt, to_chinese(n), lang)


def _from_chinese(r: random.Random, lang: str, level: dict) -> Task:
    n = _number(r, level)
    prompt = f"Write {to_chinese(n)} in digits." if lang == "en" else f"把 {to_chinese(n)} 写成阿拉伯数字。"
    return Task("from_chinese", prompt, str(n), lang)


def _sort(r: random.Random, lang: str, level: dict) -> Task:
    shortest, longest, hi = level["sort"]
    xs = [r.randint(0, hi) for _ in range(r.randint(shortest, longest))]
    shown = " ".join(map(str, xs))
    prompt = f"Sort ascending: {shown}" if lang == "en" else f"从小到大排序：{shown}"
    return Task("sort", prompt, " ".join(map(str, sorted(xs))), lang)


def _int(text: str) -> int:
    return int(text.replace(",", "").replace("，", ""))


def _ints(text: str) -> list[int]:
    parts = [p for p in re.split(r"[\s,，、]+", text) if p]
    return [int(p) for p in parts]


# kind -> (generator, parse: text -> comparable value)
TASKS: dict[str, tuple[Callable[[random.Random, str], Task], Callable[[str], object]]] = {
    "add": (_arith("+", lambda a, b: a + b, "add"), _int),
    "sub": (_arith("-", lambda a, b: a - b, "sub"), _int),
    "mul": (_arith("*", lambda a, b: a * b, "mul"), _int),
    "to_chinese": (_to_chinese, from_chinese),
    "from_chinese": (_from_chinese, _int),
    "sort": (_sort, _ints),
}


def make_tasks(kind, n: int, seed: int = 0, lang: str = "mixed", level: str = "full") -> list[Task]:
    """``n`` tasks of ``kind`` (a kind, a list of kinds, or ``"all"``: kinds in turn); ``lang`` is "en",
    "zh" or "mixed"; ``level`` "full", "medium" or "easy" (smaller numbers, see ``LEVELS``)."""
    if level not in LEVELS:
        raise LmzooError(f"unknown task level '{level}'; known: {sorted(LEVELS)}")
    kinds = sorted(TASKS) if kind == "all" else [kind] if isinstance(kind, str) else list(kind)
    if not kinds:
        raise LmzooError("make_tasks: no task kind given")
    for k in kinds:
        if k not in TASKS:
            raise LmzooError(f"unknown task kind '{k}'; known: {sorted(TASKS)} or 'all'")
    if lang not in ("en", "zh", "mixed"):
        raise LmzooError(f"lang must be 'en', 'zh' or 'mixed', got '{lang}'")
    r = random.Random(seed)
    out = []
    for i in range(n):
        use = lang if lang != "mixed" else r.choice(("en", "zh"))
        out.append(TASKS[kinds[i % len(kinds)]][0](r, use, LEVELS[level]))
    return out


_LABEL = re.compile(r"^\s*(answer|the answer is|答案|答)\s*[:：是为]?\s*", re.IGNORECASE)


def extract_answer(response: str) -> str:
    """The last non-empty line without an answer label or closing punctuation."""
    lines = [ln for ln in response.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    return _LABEL.sub("", lines[-1]).strip().rstrip("。.!！").strip()


def check(task: Task, response: str) -> bool:
    """True when ``response`` states the task's answer (compared as values; see the module docstring)."""
    parse = TASKS[task.kind][1]
    try:
        return parse(extract_answer(response)) == parse(task.answer)
    except (ValueError, TypeError):
        return False
