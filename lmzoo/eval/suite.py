"""The built-in evaluation tasks of ``lmzoo eval --tasks``: lmzoo's verifiable tasks answered greedily
and scored by exact match, and the same tasks as four-way multiple choice scored by log-likelihood.

| name | asks | scored by |
|---|---|---|
| ``add`` ``sub`` ``mul`` ``to_chinese`` ``from_chinese`` ``sort`` | the task's prompt (``lmzoo.data.tasks``) | ``exact_match``: ``check`` of the greedy reply |
| ``choice_<kind>`` (e.g. ``choice_from_chinese``: which digits 三百零五 means) | the prompt, then each of 4 answers | ``acc``, ``acc_norm`` |

Multiple choice is scored as the lm-evaluation-harness scores it: each option's continuation gets
its summed log-probability given the prompt,

    acc      = 1[argmax_i  log p(option_i | prompt)            = gold]
    acc_norm = 1[argmax_i  log p(option_i | prompt) / bytes_i  = gold]

(``bytes_i`` the UTF-8 length of the option's text, as the harness's ``acc_norm`` uses its length),
and chance is 1/4. The three wrong options are near misses (``wrong_answer``: off by one, a digit
swapped, two numbers out of order), so the task separates knowing the answer from knowing its shape (where too few near misses
exist, e.g. for 0, other tasks' answers fill the options).

A model with a chat template is asked through it (the prompt as a user turn; the option is the
assistant's reply up to and including its end-of-turn tokens); a model without one (a pretrained
base) reads ``Question: <prompt>\\nAnswer:`` and answers on one line (``PLAIN_TEMPLATE``). T5 reads the
prompt in its encoder and answers in its decoder. Task sets are drawn with ``seed`` (default
``EVAL_SEED``, not the training data's seed 0); at the ``easy`` level there are few distinct prompts,
so training sets drawn from it hold most of them: a stage's own held-out accuracy (its metrics.jsonl)
is the clean number there.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from lmzoo.data.builtin_preference import wrong_answer
from lmzoo.data.tasks import TASKS, Task, check, make_tasks
from lmzoo.errors import ConfigError

EVAL_SEED = 10_007
N_OPTIONS = 4
GENERATIVE = sorted(TASKS)
CHOICE = [f"choice_{k}" for k in GENERATIVE]
GROUPS = {"all": GENERATIVE + CHOICE, "generative": GENERATIVE, "choice": CHOICE}


def plain_template(tail: str = "") -> str:
    """A model without a chat template (a base model) is asked in plain text and answers on one line;
    ``tail`` ends the question where the model reads its prefix off tokens (ChatGLM-6B's [gMASK] <sop>)."""
    return ("{{ bos_token if bos_token else '' }}{% for m in messages %}"
            "{% if m['role'] == 'user' %}Question: {{ m['content'] }}\nAnswer:" + tail +
            "{% elif m['role'] == 'assistant' %} {{ m['content'] }}\n{% endif %}{% endfor %}")


PLAIN_TEMPLATE = plain_template()


def task_names(names: list[str]) -> list[str]:
    """``names`` with groups (all, generative, choice) expanded, in order, each once; an unknown name is
    an error listing the known ones."""
    out: list[str] = []
    for name in names:
        for n in GROUPS.get(name, [name]):
            if n not in GENERATIVE and n not in CHOICE:
                raise ConfigError(f"unknown task '{name}'; built-in tasks: {', '.join(GENERATIVE + CHOICE)} "
                                  f"(groups: {', '.join(GROUPS)}); lm-evaluation-harness tasks go to --harness")
            if n not in out:
                out.append(n)
    return out


@dataclass(frozen=True)
class Choice:
    """One multiple-choice item: a task's prompt, its options and which one is right."""
    task: Task
    options: tuple[str, ...]
    gold: int


def choice_items(kind: str, n: int, seed: int = EVAL_SEED, level: str = "easy") -> list[Choice]:
    """``n`` four-way items of ``kind``: the right answer among three distinct near misses, shuffled."""
    r = random.Random(seed + 1)
    others = [t.answer for t in make_tasks(kind, 200, seed=seed + 2, level=level)]
    items = []
    for t in make_tasks(kind, n, seed=seed, level=level):
        wrong: list[str] = []
        for _ in range(50):  # near misses repeat at small numbers ("0" has few): draw until three differ
            w = wrong_answer(t, r)
            if w not in wrong:
                wrong.append(w)
            if len(wrong) == N_OPTIONS - 1:
                break
        pool = [a for a in others if a not in wrong and not check(t, a)]
        wrong += r.sample(pool, N_OPTIONS - 1 - len(wrong))  # else other tasks' answers fill the options
        options = [t.answer] + wrong
        r.shuffle(options)
        items.append(Choice(t, tuple(options), options.index(t.answer)))
    return items


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, float]
    n: int
    examples: list[dict] = field(default_factory=list)  # a few prompts, answers and replies for the report
    right: list[bool] = field(default_factory=list)  # per item, for paired comparisons (generative tasks)

    def to_dict(self) -> dict:
        return {**self.metrics, "n": self.n, "examples": self.examples}


def run_generative(lm, kind: str, n: int, *, seed: int = EVAL_SEED, level: str = "easy",
                   max_new_tokens: int = 24) -> TaskResult:
    """Exact match of ``lm.replies`` (greedy) on ``n`` tasks of ``kind``."""
    return score_tasks(lm, kind, make_tasks(kind, n, seed=seed, level=level), max_new_tokens=max_new_tokens)


def score_tasks(lm, name: str, tasks: list[Task], *, max_new_tokens: int = 24) -> TaskResult:
    """Exact match of ``lm.replies`` (greedy) on the given tasks (e.g. a training run's held-out ones)."""
    if not tasks:
        raise ConfigError(f"task {name}: no items to score")
    replies = lm.replies([t.prompt for t in tasks], max_new_tokens=max_new_tokens)
    right = [check(t, r) for t, r in zip(tasks, replies)]
    examples = [{"prompt": t.prompt, "answer": t.answer, "reply": r, "right": ok}
                for t, r, ok in list(zip(tasks, replies, right))[:4]]
    return TaskResult(name, {"exact_match": sum(right) / len(tasks)}, len(tasks), examples, right)


def paired_change(before: list[bool], after: list[bool]) -> dict:
    """Two models' right/wrong on the same items: how many each got right that the other missed, the
    change in exact match, and the two-sided exact sign test's p-value on those discordant items
    (McNemar's exact test: under "no change" each discordant item goes either way with probability 1/2).
    On the same items this is far more sensitive than two accuracies' separate error bars."""
    if len(before) != len(after) or not before:
        raise ConfigError(f"paired_change: {len(before)} and {len(after)} items; the same non-empty items needed")
    gained = sum(1 for a, b in zip(before, after) if b and not a)
    lost = sum(1 for a, b in zip(before, after) if a and not b)
    n = gained + lost
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n if n else 1.0
    return {"gained": gained, "lost": lost, "change": (gained - lost) / len(before), "p": min(1.0, 2 * tail)}


def run_choice(lm, name: str, n: int, *, seed: int = EVAL_SEED, level: str = "easy") -> TaskResult:
    """``acc`` and ``acc_norm`` of ``lm.option_logps`` on ``n`` four-way items of ``choice_<kind>``."""
    items = choice_items(name.removeprefix("choice_"), n, seed=seed, level=level)
    scores = lm.option_logps([(c.task.prompt, list(c.options)) for c in items])
    acc = acc_norm = 0
    examples = []
    for c, lps in zip(items, scores):
        norm = [lp / max(1, len(o.encode("utf-8"))) for lp, o in zip(lps, c.options)]
        pick, pick_norm = _argmax(lps), _argmax(norm)
        acc += pick == c.gold
        acc_norm += pick_norm == c.gold
        if len(examples) < 4:
            examples.append({"prompt": c.task.prompt, "options": list(c.options), "gold": c.gold, "picked": pick})
    return TaskResult(name, {"acc": acc / len(items), "acc_norm": acc_norm / len(items),
                             "chance": 1 / N_OPTIONS}, len(items), examples)


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])


def run_tasks(lm, names: list[str], *, limit: int | None = None, seed: int = EVAL_SEED, level: str = "easy",
              max_new_tokens: int = 24, progress=None) -> dict[str, TaskResult]:
    """Each named task (groups expanded) on ``limit`` items (default 100); ``progress(name)`` before each."""
    n = limit or 100
    if n < 1:
        raise ConfigError(f"--limit must be at least 1, got {n}")
    out = {}
    for name in task_names(names):
        if progress is not None:
            progress(name)
        out[name] = (run_choice(lm, name, n, seed=seed, level=level) if name in CHOICE else
                     run_generative(lm, name, n, seed=seed, level=level, max_new_tokens=max_new_tokens))
    return out
