"""The built-in SFT data: deterministic, bilingual, short verifiable answers, held-out tasks never trained on."""

from __future__ import annotations

import re

import pytest

from lmzoo.data.conversations import check_conversation
from lmzoo.data.instructions import builtin_sft_data, task_messages
from lmzoo.data.tasks import check
from lmzoo.errors import LmzooError

CJK = re.compile(r"[\u4e00-\u9fff]")


def test_deterministic_and_seeded():
    a, b, c = builtin_sft_data(200, seed=0), builtin_sft_data(200, seed=0), builtin_sft_data(200, seed=1)
    assert a.train == b.train and a.eval_tasks == b.eval_tasks
    assert a.train != c.train


def test_conversations_are_valid_bilingual_and_short():
    data = builtin_sft_data(1000, seed=0, n_eval=100)
    for conv in data.train:
        check_conversation(conv)  # raises on anything untrainable
    users = [m["content"] for c in data.train for m in c if m["role"] == "user"]
    answers = [m["content"] for c in data.train for m in c if m["role"] == "assistant"]
    assert any(CJK.search(u) for u in users) and any(not CJK.search(u) for u in users)
    assert any(u.startswith("Translate into") for u in users) and any(u.startswith("把下面的句子翻译成") for u in users)
    assert sum(len(c) >= 4 for c in data.train) > 100  # multi-turn conversations
    assert sum(c[0]["role"] == "system" for c in data.train) > 50
    task_answers = {t.answer for t in data.train_tasks}
    assert task_answers <= set(answers)
    assert max(len(t.answer) for t in data.train_tasks) <= 40
    assert {t.kind for t in data.train_tasks} == {"add", "sub", "mul", "to_chinese", "from_chinese", "sort"}


def test_held_out_tasks_are_unseen_and_checkable():
    data = builtin_sft_data(1000, seed=0, n_eval=200)
    trained = {m["content"] for c in data.train for m in c if m["role"] == "user"}
    assert len(data.eval_tasks) == 200 and not {t.prompt for t in data.eval_tasks} & trained
    for t in data.eval_tasks + data.train_tasks:
        assert check(t, t.answer) and check(t, f"答案：{t.answer}。")
    assert not any(check(t, t.answer + "1") for t in data.eval_tasks if t.kind != "to_chinese")
    assert task_messages(data.eval_tasks[0]) == [{"role": "user", "content": data.eval_tasks[0].prompt}]


def test_languages():
    en, zh = builtin_sft_data(300, seed=0, lang="en"), builtin_sft_data(300, seed=0, lang="zh")
    assert {t.lang for t in en.train_tasks + en.eval_tasks} == {"en"}
    assert {t.lang for t in zh.train_tasks + zh.eval_tasks} == {"zh"}
    assert all(CJK.search(t.prompt) for t in zh.train_tasks)
    with pytest.raises(LmzooError, match="lang must be"):
        builtin_sft_data(10, lang="fr")
