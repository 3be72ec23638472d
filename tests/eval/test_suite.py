"""The built-in tasks' scoring, on stub models whose answers are known: one that is handed the right
answers must score 1.0 and one that answers at random must score near chance, on every task."""

import random

import pytest

from lmzoo.data.tasks import check, make_tasks
from lmzoo.errors import ConfigError
from lmzoo.eval.suite import (CHOICE, GENERATIVE, N_OPTIONS, choice_items, paired_change, run_tasks, score_tasks,
                              task_names)


class OracleStubLM:
    """A stand-in for a model, handed the right answers: it replies with them and puts all its
    probability on them."""

    def __init__(self, seed, level, n):
        self.answers = {t.prompt: t.answer for k in GENERATIVE for t in make_tasks(k, n, seed=seed, level=level)}

    def replies(self, prompts, max_new_tokens=24):
        return [self.answers[p] for p in prompts]

    def option_logps(self, items):
        return [[0.0 if o == self.answers[p] else -50.0 for o in options] for p, options in items]


class RandomStubLM:
    """A stand-in for a model that answers at random: a random number, random log-likelihoods."""

    def __init__(self, seed=0):
        self.r = random.Random(seed)

    def replies(self, prompts, max_new_tokens=24):
        return [str(self.r.randint(0, 99)) for _ in prompts]

    def option_logps(self, items):
        return [[-self.r.uniform(1, 10) * len(o) for o in options] for _, options in items]


@pytest.mark.parametrize("level", ["easy", "small", "full"])
def test_a_model_handed_the_answers_scores_one_on_every_task(level):
    res = run_tasks(OracleStubLM(seed=3, level=level, n=50), ["all"], limit=50, seed=3, level=level)
    assert sorted(res) == sorted(GENERATIVE + CHOICE)
    for name, r in res.items():
        main = r.metrics["exact_match"] if name in GENERATIVE else r.metrics["acc"]
        assert main == 1.0, (name, r.metrics)
        if name in CHOICE:
            assert r.metrics["acc_norm"] == 1.0 and r.metrics["chance"] == 1 / N_OPTIONS


def test_a_model_answering_at_random_scores_near_chance():
    res = run_tasks(RandomStubLM(), ["all"], limit=400, seed=5)
    for name in GENERATIVE:  # a random number is almost never the answer (the sort answers have 3 numbers)
        assert res[name].metrics["exact_match"] < 0.1, (name, res[name].metrics)
    for name in CHOICE:  # 4 options: 0.25 with a standard error of 0.022 over 400 items
        assert abs(res[name].metrics["acc"] - 0.25) < 0.09, (name, res[name].metrics)
        assert abs(res[name].metrics["acc_norm"] - 0.25) < 0.09, (name, res[name].metrics)


@pytest.mark.parametrize("kind", GENERATIVE)
def test_choice_items_have_one_right_option_and_three_distinct_near_misses(kind):
    for c in choice_items(kind, 60, seed=1):
        assert len(c.options) == N_OPTIONS and len(set(c.options)) == N_OPTIONS, c
        assert [check(c.task, o) for o in c.options] == [i == c.gold for i in range(N_OPTIONS)], c
    golds = [c.gold for c in choice_items(kind, 200, seed=2)]
    assert len(set(golds)) == N_OPTIONS  # the right option is not always in one place


def test_task_names_expand_groups_and_refuse_unknown_names():
    assert task_names(["sort", "generative"]) == ["sort"] + [k for k in GENERATIVE if k != "sort"]
    assert task_names(["choice", "add"]) == CHOICE + ["add"]
    assert set(task_names(["all"])) == set(GENERATIVE + CHOICE)
    with pytest.raises(ConfigError, match="unknown task 'hellaswag'.*--harness"):
        task_names(["hellaswag"])


def test_score_tasks_scores_the_tasks_it_is_given_and_refuses_none():
    tasks = make_tasks("sort", 8, seed=1, level="small")
    lm = OracleStubLM(seed=1, level="small", n=8)
    lm.answers[tasks[0].prompt] = "0 0 0"  # one wrong
    r = score_tasks(lm, "sort", tasks)
    assert r.n == 8 and r.metrics["exact_match"] == 7 / 8 and r.examples[0]["right"] is False
    assert r.right == [False] + [True] * 7
    with pytest.raises(ConfigError, match="no items"):
        score_tasks(lm, "sort", [])


def test_paired_change_counts_discordant_items_and_gives_the_exact_sign_test():
    # 10 items right only after, 2 right only before, 8 alike: P(X <= 2 | n 12, 1/2) = 79 / 4096, two-sided x2
    before = [False] * 10 + [True] * 2 + [True] * 5 + [False] * 3
    after = [True] * 10 + [False] * 2 + [True] * 5 + [False] * 3
    r = paired_change(before, after)
    assert (r["gained"], r["lost"], r["change"]) == (10, 2, 8 / 20) and r["p"] == pytest.approx(2 * 79 / 4096)
    assert paired_change(after, before)["p"] == r["p"] and paired_change(after, before)["change"] == -8 / 20
    assert paired_change([True, False], [True, False]) == {"gained": 0, "lost": 0, "change": 0.0, "p": 1.0}
    assert paired_change([False] * 3, [True] * 3)["p"] == 0.25  # 3 of 3 one way: 2 / 8
    with pytest.raises(ConfigError, match="the same non-empty items"):
        paired_change([True], [True, False])
