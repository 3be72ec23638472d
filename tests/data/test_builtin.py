"""Built-in text: Chinese numerals, the bilingual generator's facts, the pydoc prose, the task checkers."""

import datetime as dt
import random
import re

import numpy as np
import pytest

from lmzoo.data.baselines import unigram_cross_entropy
from lmzoo.data.bilingual import bilingual_documents, english_number
from lmzoo.data.builtin import builtin_corpus, describe_corpus, pydoc_documents
from lmzoo.data.numerals import digits_to_chinese, from_chinese, to_chinese
from lmzoo.data.tasks import TASKS, Task, check, extract_answer, make_tasks

HAND = {0: "零", 7: "七", 10: "十", 15: "十五", 20: "二十", 101: "一百零一", 110: "一百一十", 1005: "一千零五",
        1050: "一千零五十", 1500: "一千五百", 10010: "一万零一十", 100000: "十万", 100500: "十万零五百",
        1000001: "一百万零一", 100010000: "一亿零一万", 123456789: "一亿二千三百四十五万六千七百八十九",
        10 ** 12: "一万亿", -36: "负三十六"}


def test_chinese_numerals_by_hand_and_round_trip():
    for n, z in HAND.items():
        assert to_chinese(n) == z, n
        assert from_chinese(z) == n, z
    r = random.Random(0)
    for _ in range(3000):
        n = r.randrange(10 ** r.randrange(1, 16))
        assert from_chinese(to_chinese(n)) == n
    assert from_chinese("两千") == 2000 and from_chinese("二〇二四") == 2024 and digits_to_chinese(2024) == "二〇二四"
    assert from_chinese("一万二千亿") == 1_200_000_000_000
    assert [from_chinese(z) for z in ("三百五", "一万五", "两千零五", "十五", "三百五十万")] == [350, 15000, 2005, 15, 3_500_000]
    for bad in ("", "abc", "三x"):
        with pytest.raises(ValueError):
            from_chinese(bad)


def test_english_numbers():
    assert [english_number(n) for n in (0, 13, 42, 305, 1999)] == [
        "zero", "thirteen", "forty-two", "three hundred five", "one thousand nine hundred ninety-nine"]


def test_bilingual_documents_are_seeded_and_true():
    docs = bilingual_documents(200, seed=5)
    assert docs == bilingual_documents(200, seed=5) and docs != bilingual_documents(200, seed=6)
    text = "\n".join(docs)
    sums = re.findall(r"(\d+) plus (\d+) equals (\d+)\.", text)
    assert len(sums) > 20 and all(int(a) + int(b) == int(c) for a, b, c in sums)
    written = re.findall(r"数字(\d+)写作([零一二三四五六七八九十百千万亿]+)。", text)
    assert len(written) > 20 and all(from_chinese(z) == int(n) for n, z in written)
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
              "November", "December"]
    dates = re.findall(r"(\w+) (\d+), (\d{4}) was a (\w+)\.", text)
    assert len(dates) > 20
    for m, d, y, w in dates:
        assert dt.date(int(y), months.index(m) + 1, int(d)).strftime("%A") == w
    zh_sums = re.findall(r"([零一二三四五六七八九十百]+)加([零一二三四五六七八九十百]+)等于([零一二三四五六七八九十百]+)。", text)
    assert len(zh_sums) > 20 and all(from_chinese(a) + from_chinese(b) == from_chinese(c) for a, b, c in zh_sums)


def test_builtin_corpus_has_pydoc_prose_and_chinese():
    py = pydoc_documents()
    from pydoc_data.topics import topics

    assert len(py) == len([v for v in topics.values() if v.strip()])
    assert any(d.startswith('The "if" statement') for d in py)
    docs = builtin_corpus(scale=0.1)
    info = describe_corpus(docs)
    assert info["documents"] == round(0.1 * len(py)) + 300 and 0.1 < info["cjk_share"] < 0.5
    assert builtin_corpus(scale=0.1) == docs


def test_task_generators_and_checkers():
    for kind in TASKS:
        tasks = make_tasks(kind, 20, seed=1)
        assert tasks == make_tasks(kind, 20, seed=1)
        assert all(check(t, t.answer) for t in tasks), kind
        assert {t.lang for t in tasks} == {"en", "zh"}
    t = Task("add", "What is 37 + 58?", "95", "en")
    assert check(t, "95") and check(t, "Answer: 95.") and check(t, "let me think\n答案：95。")
    assert not check(t, "96") and not check(t, "") and not check(t, "ninety-five")
    z = Task("to_chinese", "Write 305 in Chinese numerals.", "三百零五", "en")
    assert check(z, "三百零五") and not check(z, "三百五") and not check(z, "305")
    s = Task("sort", "Sort ascending: 9 3 7", "3 7 9", "en")
    assert check(s, "3, 7, 9") and not check(s, "3 9 7")
    assert extract_answer("x\n  the answer is 12!  \n") == "12"
    mixed = make_tasks("all", 12, seed=0)
    assert {t.kind for t in mixed} == set(TASKS)
    a = [t for t in make_tasks("add", 50, seed=2)]
    assert all(int(t.answer) == sum(map(int, re.findall(r"\d+", t.prompt))) for t in a)


def test_unigram_baseline_by_hand():
    # counts [2, 1, 0] + 1 over 3 + 3 -> p = [1/2, 1/3, 1/6]
    h = unigram_cross_entropy(np.array([0, 0, 1]), np.array([0, 2]), 3)
    assert h == pytest.approx(-(np.log(1 / 2) + np.log(1 / 6)) / 2)


def test_task_levels_bound_the_numbers():
    """easy ≤ 20, small ≤ 30, medium ≤ 99 (two-digit operands: 10,000 additions, too many to memorise),
    full ≤ 999."""
    import re

    from lmzoo.data.tasks import LEVELS, check, make_tasks

    assert set(LEVELS) == {"easy", "small", "medium", "full"}
    for level, hi in (("easy", 20), ("small", 30), ("medium", 99), ("full", 999)):
        tasks = make_tasks("add", 400, seed=3, level=level)
        operands = [int(x) for t in tasks for x in re.findall(r"\d+", t.prompt)]
        assert max(operands) <= hi and max(operands) > hi * 0.9, level
        assert all(check(t, t.answer) for t in tasks)
