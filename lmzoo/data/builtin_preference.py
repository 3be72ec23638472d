"""Built-in preference pairs from the verifiable tasks of ``lmzoo.data.tasks`` (no ``--data``): each
task's correct answer chosen over a wrong one, plus held-out tasks for evaluation.

- ``builtin_preference_data``: the wrong answer is made by rule, a plausible near miss (off by one or
  ten, two digits swapped, two numbers of a sorted list out of order): fast, needs no model.
- ``policy_pairs``: the wrong answer is the model's own (``data.builtin.rejected: policy``): replies
  sampled from the starting model (``lmzoo.eval.sampled_replies``), checked, and a wrong one kept as
  the rejected answer; DPO with the SFT term learns most from these (measured in docs/preference.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmzoo.data.preference import PreferencePair, _user
from lmzoo.data.tasks import Task, check, make_tasks
from lmzoo.errors import LmzooError


def _near(n: int, r: random.Random) -> int:
    """A plausible wrong number: off by one or ten, or two adjacent different digits swapped."""
    s = str(n)
    swaps = [int(s[:i] + s[i + 1] + s[i] + s[i + 2:]) for i in range(len(s) - 1)
             if s[i] != s[i + 1] and not (i == 0 and s[1] == "0")]
    return r.choice(sorted({n + 1, n - 1, n + 10, n - 10, *swaps} - {n} - set(range(-10, 0))))


def wrong_answer(task: Task, r: random.Random) -> str:
    """A plausible answer to ``task`` that ``check`` rejects."""
    from lmzoo.data.numerals import from_chinese, to_chinese

    if task.kind == "sort":
        xs = [int(x) for x in task.answer.split()]
        swaps = [i for i in range(len(xs) - 1) if xs[i] != xs[i + 1]]
        if swaps:
            i = r.choice(swaps)
            xs[i], xs[i + 1] = xs[i + 1], xs[i]
        else:  # all equal: no order is wrong, so one number goes missing
            xs = xs[:-1]
        wrong = " ".join(map(str, xs))
    elif task.kind == "to_chinese":
        wrong = to_chinese(_near(from_chinese(task.answer), r))
    else:
        wrong = str(_near(int(task.answer), r))
    if check(task, wrong):  # cannot happen by construction; never ship a "wrong" answer that is right
        raise LmzooError(f"internal: the wrong answer {wrong!r} passes {task}")
    return wrong


@dataclass
class BuiltinPreference:
    train: list[PreferencePair]
    train_tasks: list[Task]  # train[i] asks train_tasks[i]
    eval_tasks: list[Task]  # held out: no prompt among the training prompts


def builtin_preference_data(n: int = 2000, seed: int = 0, lang: str = "mixed", level: str = "full",
                            n_eval: int = 200, kinds="all") -> BuiltinPreference:
    """``n`` pairs (a task's prompt, its answer chosen over a wrong one) and ``n_eval`` held-out tasks;
    ``kinds``, ``lang`` and ``level`` as ``lmzoo.data.tasks.make_tasks``. Deterministic for a seed."""
    if n < 1 or n_eval < 0:
        raise LmzooError(f"n must be at least 1 and n_eval at least 0, got n={n}, n_eval={n_eval}")
    r = random.Random(seed)
    tasks = make_tasks(kinds, n, seed=seed, lang=lang, level=level)
    train = [PreferencePair(_user(t.prompt, "prompt"), t.answer, wrong_answer(t, r)) for t in tasks]
    seen, eval_tasks = {t.prompt for t in tasks}, []
    for k in range(1, 51):  # fresh seeds until enough unseen prompts
        for t in make_tasks(kinds, 2 * n_eval, seed=seed * 1_000_003 + 7919 * k, lang=lang, level=level):
            if t.prompt not in seen and len(eval_tasks) < n_eval:
                seen.add(t.prompt)
                eval_tasks.append(t)
        if len(eval_tasks) == n_eval:
            break
    else:
        raise LmzooError(f"could not find {n_eval} task prompts unseen in training")
    return BuiltinPreference(train=train, train_tasks=tasks, eval_tasks=eval_tasks)


@dataclass
class PolicyPairs:
    pairs: list[PreferencePair]
    counts: dict  # prompts, sampled, right (share of sampled replies that check), pairs, all_right

    def summary(self) -> str:
        c = self.counts
        return (f"{c['pairs']} pairs from {c['prompts']} prompts × {c['samples']} sampled replies "
                f"({c['right']:.0%} of replies right; {c['all_right']} prompts with no wrong reply left out)")


def policy_pairs(tasks: list[Task], replies: list[list[str]]) -> PolicyPairs:
    """On-policy pairs: for each task, the model's own replies (``replies[i]`` answer ``tasks[i]``), the
    task's right answer chosen over the first reply ``check`` rejects. A prompt whose every reply is
    right has no mistake to learn from and is left out (counted). Chosen is the task's canonical answer,
    not a sampled right reply, so every chosen answer is in the trained form.

    Why: the rule-made near misses of ``builtin_preference_data`` are answers the model rarely gives
    (their log-probability sits far below the chosen one's from the start), so DPO has little to move
    there and mostly pushes both down; the model's own mistakes are where its greedy answers go wrong
    (the "online" or on-policy pairs of Iterative RPO, Pang et al. 2024, and of RLHF's sampled pairs)."""
    if len(tasks) != len(replies):
        raise LmzooError(f"internal: {len(tasks)} tasks but {len(replies)} reply lists")
    pairs, n_right, n_all_right = [], 0, 0
    for t, rs in zip(tasks, replies):
        wrong = [x for x in rs if x.strip() and not check(t, x)]
        n_right += sum(check(t, x) for x in rs)
        if not wrong:
            n_all_right += 1
            continue
        pairs.append(PreferencePair(_user(t.prompt, "prompt"), t.answer, wrong[0]))
    n_samples = sum(len(rs) for rs in replies)
    counts = {"prompts": len(tasks), "samples": n_samples // max(1, len(tasks)), "right": n_right / max(1, n_samples),
              "pairs": len(pairs), "all_right": n_all_right}
    return PolicyPairs(pairs, counts)
