"""Reward functions: task verifiers by value with the format bonus, user callables checked (one clear error
naming ``module:function``), penalties, sums, and a reward model scoring exactly what ``lmzoo.score``
gives for the same rendered text."""

from __future__ import annotations

import math

import pytest
import torch

import lmzoo
from lmzoo.data.tasks import Task
from lmzoo.errors import ConfigError, LmzooError
from lmzoo.rl import load_reward, task_reward, with_penalties
from tests.stages.test_sft import tiny_decoder, tok  # noqa: F401  (tok: the shared tokenizer fixture)

TASKS = [Task("add", "What is 37 + 58?", "95", "en"), Task("to_chinese", "把 305 写成中文数字。", "三百零五", "zh"),
         Task("sort", "Sort ascending: 9 3 7", "3 7 9", "en"), Task("add", "计算 2 + 2。", "4", "zh"),
         Task("from_chinese", "Write 三百零五 in digits.", "305", "en")]
REPLIES = ["95", "答案：三百零五。", "3 9 7", "I think\n5", " 305 "]


def test_task_rewards_by_value_with_the_format_bonus():
    prompts = [t.prompt for t in TASKS]
    plain = load_reward("task:all")
    assert plain(prompts, REPLIES, tasks=TASKS) == [1.0, 1.0, 0.0, 0.0, 1.0]
    bonus = load_reward("task:all", format_reward=0.1)
    # bare answers earn the bonus, right ("95", " 305 ") or wrong ("3 9 7"); a labelled or two-line reply does not
    got = bonus(prompts, REPLIES, tasks=[t.to_dict() for t in TASKS])  # dicts work as well as Tasks
    assert got == pytest.approx([1.1, 1.0, 0.1, 0.0, 1.1])
    adds = [0, 3]
    assert load_reward("task:add")([prompts[k] for k in adds], ["95", "4"], tasks=[TASKS[k] for k in adds]) == [1, 1]
    with pytest.raises(LmzooError, match="response 1 answers a 'to_chinese' task"):
        load_reward("task:add")(prompts, REPLIES, tasks=TASKS)
    with pytest.raises(LmzooError, match="needs ctx tasks"):
        plain(prompts, REPLIES)
    with pytest.raises(LmzooError, match="4 tasks for 5 responses"):
        plain(prompts, REPLIES, tasks=TASKS[:4])
    with pytest.raises(ConfigError, match="unknown task kind"):
        task_reward("div")


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import math\n"
        "def brevity(prompts, responses):\n    return [-len(r) / 10 for r in responses]\n"
        "def wants_tasks(prompts, responses, tasks):\n    return [float(t.answer in r) for t, r in zip(tasks, responses)]\n"
        "def boom(prompts, responses, **kw):\n    raise KeyError('score')\n"
        "def nan(prompts, responses):\n    return [0.0] * (len(responses) - 1) + [math.nan]\n"
        "def short(prompts, responses):\n    return [1.0] * (len(responses) - 1)\n"
        "def words(prompts, responses):\n    return ['good'] * len(responses)\n"
        "CONSTANT = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_module_functions_and_their_errors(user_rewards):
    prompts, replies = ["q1", "q2", "q3"], ["abc", "", "hello world"]
    assert load_reward(f"{user_rewards}:brevity")(prompts, replies, tasks=TASKS[:3]) == [-0.3, 0.0, -1.1]
    tasks = [TASKS[0], TASKS[1], TASKS[2]]  # given only the ctx keys it names
    assert load_reward(f"{user_rewards}:wants_tasks")(prompts, ["95!", "三百", "3 7 9"], tasks=tasks,
                                                      ended_with_eos=[True] * 3) == [1.0, 0.0, 1.0]
    for fn, msg in (("boom", "raised KeyError: 'score'"), ("nan", "returned nan for response 2"),
                    ("short", "returned 2 values for 3 responses"), ("words", "returned str 'good' for response 0")):
        with pytest.raises(LmzooError, match=f"reward {user_rewards}:{fn} {msg}"):
            load_reward(f"{user_rewards}:{fn}")(prompts, replies)
    with pytest.raises(ConfigError, match=f"reward {user_rewards}:CONSTANT: 'CONSTANT' is a int, not a function"):
        load_reward(f"{user_rewards}:CONSTANT")
    with pytest.raises(ConfigError, match="has no 'missing'"):
        load_reward(f"{user_rewards}:missing")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        load_reward("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="neither a reward-model directory"):
        load_reward("brevity")
    inf = load_reward(lambda p, r: torch.tensor([1.0, math.inf, 0.0]))  # a callable, its tensor checked too
    with pytest.raises(LmzooError, match="returned inf for response 1"):
        inf(prompts, replies)
    with pytest.raises(LmzooError, match="2 prompts for 3 responses"):
        load_reward(f"{user_rewards}:brevity")(prompts[:2], replies)


def test_penalties_and_sums(user_rewards):
    prompts, replies = [t.prompt for t in TASKS[:3]], REPLIES[:3]
    ctx = dict(tasks=TASKS[:3], ended_with_eos=torch.tensor([True, False, False]),
               response_lengths=torch.tensor([2, 9, 5]))
    fn = load_reward(["task:all", f"{user_rewards}:brevity"], missing_eos_penalty=0.5, length_target=4,
                     length_penalty=0.1)
    # task: 1, 1, 0; brevity: -0.2, -0.8, -0.5; no EOS: 0, -0.5, -0.5; beyond 4 tokens: 0, -0.5, -0.1
    assert fn(prompts, replies, **ctx) == pytest.approx([0.8, -0.8, -1.1])
    assert with_penalties(task_reward(), missing_eos=1.0)(prompts, replies, **ctx) == [1.0, 0.0, -1.0]
    with pytest.raises(LmzooError, match="need ctx ended_with_eos"):
        with_penalties(task_reward(), missing_eos=1.0)(prompts, replies, tasks=TASKS[:3])


@pytest.fixture
def reward_dir(tok, tmp_path):
    torch.manual_seed(1)
    rm = lmzoo.reward_model(tiny_decoder("llama", tok), pad_token_id=tok.pad_id)
    return lmzoo.save(rm, tmp_path / "rm", tokenizer=tok)


def _rendered(tok, prompt: str, reply: str) -> str:
    """The text ``lmzoo reward`` trains on: the chat-rendered turn, cut after the reply's <|im_end|>."""
    text = tok.render_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                           template="chatml")[0]
    return text[:text.rindex("<|im_end|>") + len("<|im_end|>")]


def test_a_reward_model_scores_the_rendered_text_as_lmzoo_score_does(tok, reward_dir):
    prompts = ["What is 3 + 4?", "Translate into Chinese: two", "把 5 写成中文数字。"]
    replies = ["7", "二 二 二 二 二 二", ""]  # three lengths: the batch pads
    ref = lmzoo.score(reward_dir, [_rendered(tok, p, r) for p, r in zip(prompts, replies)], add_special_tokens=False)
    got = load_reward(str(reward_dir), template="chatml", batch_size=2)(prompts, replies)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-5, rtol=0)
    assert len(set(round(r, 4) for r in got)) == 3  # the rows were not all scored alike
    # the template saved with the reward model's tokenizer (as ``lmzoo reward`` saves it) is the default
    from lmzoo.tokenizers.chat import resolve_template

    with pytest.raises(ConfigError, match="its tokenizer has no chat template; pass template="):
        load_reward(reward_dir)
    saved = lmzoo.load_tokenizer(reward_dir)
    saved.chat_template = resolve_template("chatml")
    saved.save(reward_dir)
    torch.testing.assert_close(torch.tensor(load_reward(reward_dir)(prompts, replies)), torch.tensor(ref),
                               atol=1e-5, rtol=0)


def test_a_reward_model_without_a_tokenizer_needs_a_policy_tokenizer_that_fits(tok, tmp_path):
    from lmzoo.models.llama.config import LlamaConfig

    small = LlamaConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, pad_token_id=0)
    bare = lmzoo.save(lmzoo.reward_model(lmzoo.build(small)), tmp_path / "bare")
    with pytest.raises(ConfigError, match="has no tokenizer; save it with one or pass tokenizer="):
        load_reward(str(bare), template="chatml")
    with pytest.raises(ConfigError, match=f"the policy's \\({tok.vocab_size} tokens\\) does not fit its vocabulary "
                                          "of 100"):
        load_reward(str(bare), tokenizer=tok, template="chatml")
