"""`lmzoo eval` on every family that predicts tokens: a random tiny model of each (initialised as
pretraining starts, so its next-token distribution is near uniform) must score text at a perplexity
near its vocabulary size, and answer the generative and multiple-choice tasks."""

import json
import math

import pytest
import torch

import lmzoo
from lmzoo.cli.main import main
from tests.stages.test_sft import tiny_decoder, tok  # noqa: F401  (tok: the fixture)

FAMILIES = ["gpt2", "llama", "bloom", "chatglm", "chatglm2", "deepseek_v2", "t5"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """On one thread (tests/conftest.py)."""


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_runs_on_every_family(family, tok, tmp_path, capsys):  # noqa: F811
    from lmzoo.train.init import init_weights

    with torch.no_grad():
        model = init_weights(tiny_decoder(family, tok))
    d = lmzoo.save(model, tmp_path / family, tokenizer=tok)
    text = tmp_path / "t.txt"
    text.write_text("What is 3 + 4? 7. 从小到大排序：3 1 2 -> 1 2 3. " * 6)
    assert main(["eval", "--model", str(d), "--data", str(text), "--tasks", "add", "choice_add", "--limit", "3",
                 "--max-new-tokens", "3", "--context", "48", "--stride", "24", "--json", "--no-progress"]) == 0
    (r,) = json.loads(capsys.readouterr().out)["models"]
    t = r["text"][str(text)]
    assert t["tokens"] > 48 and math.isfinite(t["loss"])
    assert tok.vocab_size / 2 < t["perplexity"] < tok.vocab_size * 2, (family, t["perplexity"])
    assert r["tasks"]["add"]["n"] == 3 and len(r["tasks"]["add"]["examples"]) == 3
    assert 0.0 <= r["tasks"]["choice_add"]["acc"] <= 1.0
