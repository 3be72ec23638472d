"""`lmzoo grpo` and `lmzoo ppo` on every causal-decoder family (llama runs in test_grpo.py / test_ppo.py):
a random tiny policy rewarded for one character learns to emit it, and the first step is on-policy."""

from __future__ import annotations

import pytest
import torch

import lmzoo
from lmzoo.cli.main import main
from lmzoo.train.metrics import read_metrics
from tests.stages.test_grpo import TINY, prompts_file  # noqa: F401  (prompts_file: the fixture)
from tests.stages.test_ppo import FLAGS
from tests.stages.test_sft import tiny_decoder, tok  # noqa: F401  (tok: the fixture)

FAMILIES = ["gpt2", "bloom", "chatglm2", "deepseek_v2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_and_ppo_learn_on_every_family(family, tok, prompts_file, tmp_path):  # noqa: F811
    from lmzoo.train.init import init_weights

    with torch.no_grad():  # as pretraining starts (N(0, 0.02²)): near-uniform next tokens, so the policy explores
        model = init_weights(tiny_decoder(family, tok))
    base = lmzoo.save(model, tmp_path / "base", tokenizer=tok)
    assert main(["grpo", "--model", str(base), "--data", str(prompts_file), "--out", str(tmp_path / "grpo"),
                 "--reward", "tests.stages.test_grpo:sevens", "--steps", "24", *TINY]) == 0
    rec = [r for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if r["split"] == "train"]
    reward = [r["reward/mean"] for r in rec]
    assert rec[0]["kl"] < 1e-5 and sum(reward[-3:]) / 3 > reward[0] + 0.5, (family, reward)  # of at most 6
    out = tmp_path / "ppo"
    # 24 rollouts (96 steps): at 12 the greedy replies of Bloom's random start had flipped to "o"s in 1 of 3
    # seeds tried; at 24 in both tried, and the rollouts' reward climbs (0.44 -> 5.0 at seed 2)
    assert main(["ppo", "--model", str(base), "--reward", "tests.stages.test_ppo:count_o", "--out", str(out),
                 "--steps", "96", "--lr", "1e-3", *FLAGS]) == 0
    ev = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    assert ev[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert ev[-1]["reward/mean"] > ev[0]["reward/mean"] + 1.0, (family, ev[0], ev[-1])
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert train[0]["clip_fraction"] == 0.0  # the first minibatch of a rollout: ratio 1
