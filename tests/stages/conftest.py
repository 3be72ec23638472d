from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN_STEPS = 150


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (tests/conftest.py's ``one_thread``)."""


@pytest.fixture(scope="session")
def pretrained_base(tmp_path_factory) -> Path:
    """A 0.86M-parameter LLaMA (``configs/llama/tiny.yaml``) pretrained for 150 steps on a slice of the
    built-in corpus with its own tokenizer: the start of the end-to-end stage tests (SFT, then preference
    learning), built once per session."""
    from lmzoo.stages import pretrain

    tmp = tmp_path_factory.mktemp("pretrained")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    pre = yaml.safe_load((ROOT / "configs" / "llama" / "tiny.yaml").read_text())
    for k, v in {"train.steps": PRETRAIN_STEPS, "train.progress": False, "train.plot": False, "train.eval_every": 0,
                 "data.builtin_scale": 0.05, "data.seq_len": 64, "tokenizer.max_chars": 80_000,
                 "data.cache_dir": str(tmp / "cache")}.items():
        pretrain.set_path(pre, k, v)
    try:
        return pretrain.run(pre, tmp / "pre").final_dir
    finally:
        torch.set_num_threads(before)


SORTING = {"n": 2000, "n_eval": 100, "level": "easy", "kinds": ["sort"], "translation_fraction": 0.0}


@pytest.fixture(scope="session")
def sft_sorting(pretrained_base, tmp_path_factory):
    """``pretrained_base`` finetuned for 250 steps with ``lmzoo sft`` on the built-in sorting tasks (``SORTING``:
    three digits), its ``SFTResult`` (accuracy on 100 held-out prompts before and after): partly trained
    (about 40 % right), the SFT end-to-end test's run and the start of the preference and RL ones, built
    once per session."""
    from lmzoo.stages import sft
    from tests.stages.test_sft import small_cfg

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = small_cfg(steps=250, builtin=SORTING)
    cfg["data"].update(batch_size=16)
    cfg["eval"].update(n=100)
    cfg["train"].update(lr=2e-3, warmup_steps=20, log_every=10)
    try:
        return sft.run(cfg, pretrained_base, tmp_path_factory.mktemp("sft_sorting") / "sft")
    finally:
        torch.set_num_threads(before)

