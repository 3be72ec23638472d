"""On-policy built-in pairs: the model's own wrong replies become the rejected answers."""

from __future__ import annotations

import pytest

from lmzoo.data.builtin_preference import policy_pairs
from lmzoo.data.tasks import make_tasks
from lmzoo.errors import LmzooError


def test_policy_pairs_keep_the_first_wrong_reply_and_count_the_rest():
    tasks = make_tasks(["sort"], 3, seed=0, lang="en", level="easy")
    right = [t.answer for t in tasks]
    replies = [[right[0], "9 9", "1 2"],  # the first wrong reply is the rejected one
               [right[1], right[1]],  # nothing wrong: left out, counted
               ["", "   ", right[2] + " 0"]]  # empty replies are no answer to prefer against
    made = policy_pairs(tasks, replies)
    assert [(p.chosen, p.rejected) for p in made.pairs] == [(right[0], "9 9"), (right[2], right[2] + " 0")]
    assert made.pairs[0].prompt == [{"role": "user", "content": tasks[0].prompt}]
    assert made.counts == {"prompts": 3, "samples": 2, "right": 3 / 8, "pairs": 2, "all_right": 1}
    assert "1 prompts with no wrong reply left out" in made.summary()
    with pytest.raises(LmzooError, match="2 reply lists"):
        policy_pairs(tasks, replies[:2])
