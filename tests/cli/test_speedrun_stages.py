"""The speedrun's held-out tasks: balanced per kind and never among the training prompts (SFT's
conversations, DPO's tasks, which are drawn afresh)."""

import copy

import pytest

from lmzoo.cli.speedrun import SETTINGS
from lmzoo.cli.speedrun_stages import builtin_data, fresh_tasks, held_out_tasks
from lmzoo.data.instructions import builtin_sft_data
from lmzoo.errors import ConfigError


@pytest.mark.parametrize("setting", ["tiny", "default"])
def test_held_out_tasks_are_unseen_by_sft_and_dpo_and_balanced(setting):
    s = SETTINGS[setting]
    tasks = held_out_tasks(s, seed=0)
    assert sorted(tasks) == sorted(s["tasks"]["kinds"])
    assert {len(v) for v in tasks.values()} == {s["tasks"]["n_eval"]}
    b = builtin_data(s, 0)
    built = builtin_sft_data(n=b["n"], seed=0, n_eval=0, kinds=b["kinds"], level=b["level"],
                             translation_fraction=b["translation_fraction"])
    seen = {m["content"] for c in built.train for m in c if m["role"] == "user"}
    prompts = [t.prompt for ts in tasks.values() for t in ts]
    assert not seen & set(prompts) and len(set(prompts)) == len(prompts)
    assert all(t.kind == k for k, ts in tasks.items() for t in ts)
    rl = fresh_tasks(s, 0, tasks)
    assert len({t.prompt for t in rl}) == len(rl) and not {t.prompt for t in rl} & set(prompts)  # distinct, unseen
    assert len(rl) == (s["dpo"]["n_prompts"] if setting == "tiny" else 13439)  # the small level's distinct problems
    assert {t.kind for t in rl} == set(s["tasks"]["kinds"])
    if setting == "default":  # drawn afresh: many of DPO's prompts are new to SFT (the point of the draw)
        assert len({t.prompt for t in rl} - seen) > 0.3 * len(rl)


def test_a_kind_without_enough_unseen_problems_is_refused():
    s = copy.deepcopy(SETTINGS["tiny"])
    s["tasks"].update(kinds=["mul"], level="easy", n=3000, n_eval=150)  # 100 products, all in training
    with pytest.raises(ConfigError, match="mul tasks at level easy are unseen"):
        held_out_tasks(s, seed=0)


def test_refit_sizes_a_later_stage_from_the_speed_the_stage_before_measured():
    """The machine ran pretraining at 0.3 s per step where 0.2 was planned: SFT gets its share of the
    budget at the measured speed (2/3 of the planned steps); a resumed stage's seconds measure nothing."""
    from lmzoo.cli.speedrun import refit

    s = SETTINGS["default"]
    sec, minutes = 0.2, 10.0
    steps = {x: int(minutes * 60 * s[x]["share"] / (sec * s[x]["cost"])) for x in ("pretrain", "sft", "dpo")}
    state = {"plan": {"steps": dict(steps), "minutes": minutes, "sec_per_step": sec},
             "stages": {"pretrain": {"done": True, "seconds": 0.3 * steps["pretrain"]}}}
    refit(s, state, "sft")
    assert state["plan"]["steps"]["sft"] == int(minutes * 60 * s["sft"]["share"] / 0.3)
    assert state["plan"]["refit"]["sft"]["from"] == "pretrain"
    state["stages"]["sft"] = {"done": True, "resumed": True, "seconds": 1.0}
    before = dict(state["plan"]["steps"])
    refit(s, state, "dpo")  # measured by pretraining again, not by the resumed SFT's last call
    assert state["plan"]["steps"]["dpo"] == int(minutes * 60 * s["dpo"]["share"] / (0.3 * s["dpo"]["cost"]))
    assert before["sft"] == state["plan"]["steps"]["sft"]
    tiny = {"plan": {"steps": {"sft": 20}, "minutes": None}, "stages": {"pretrain": {"done": True, "seconds": 9}}}
    refit(SETTINGS["tiny"], tiny, "sft")
    assert tiny["plan"]["steps"]["sft"] == 20  # fixed steps stay
