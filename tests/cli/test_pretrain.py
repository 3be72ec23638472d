"""``lmzoo pretrain``: overrides reach the run, errors are clear, and the same command under
``torchrun`` (2 CPU processes, FSDP2) follows the one-process loss curve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmzoo
from lmzoo.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "llama" / "tiny.yaml")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small made-up text (counting sentences), enough for a 300-token tokenizer and a few batches."""
    d = tmp_path_factory.mktemp("corpus")
    words = "zero one two three four five six seven eight nine".split()
    lines = [f"{words[i % 10]} plus {words[(3 * i) % 10]} is {i % 10 + (3 * i) % 10}." for i in range(3000)]
    (d / "count.txt").write_text("\n".join(lines) + "\n")
    return d / "count.txt"


def _args(corpus, out, cache, *extra):
    return ["pretrain", "--config", CONFIG, "--data", str(corpus), "--out", str(out), "--no-progress",
            "--seq-len", "32", "--batch-size", "8", "--set", f"data.cache_dir={cache}",
            "--set", "tokenizer.vocab_size=300", "--set", "train.plot=false", "--set", "train.eval_every=0",
            "--set", "data.val_fraction=0.02", *extra]


def test_overrides_reach_the_run(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(corpus, out, tmp_path / "cache", "--steps", "4", "--seed", "5", "--save-every", "1",
                      "--lr", "0.01", "--set", "train.log_every=1", "--set", "train.keep_last=2")) == 0
    assert capsys.readouterr().out.strip() == str(out / "final")
    run = json.loads((out / "run.json").read_text())["train"]
    assert (run["steps"], run["seed"], run["lr"], run["save_every"]) == (4, 5, 0.01, 1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert rows[0]["tokens"] == 8 * 31  # --batch-size 8 rows of --seq-len 32 (31 predictions each)
    model = lmzoo.load(out / "final")
    assert model.config.vocab_size == lmzoo.load_tokenizer(out / "final").vocab_size <= 300


def test_errors_are_one_line_with_the_cause(corpus, tmp_path, capsys):
    assert main(["pretrain", "--config", str(tmp_path / "none.yaml")]) == 1
    assert "none.yaml: cannot read the run config" in capsys.readouterr().err
    assert main(_args(corpus, tmp_path / "r", tmp_path / "c", "--set", "train.warmup=3")) == 1
    assert "unknown training option(s) ['warmup']" in capsys.readouterr().err
    assert main(_args(corpus, tmp_path / "r", tmp_path / "c", "--set", "novalue")) == 1
    assert "expected SECTION.KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_fsdp_follows_the_one_process_run(corpus, tmp_path):
    common = ["--steps", "4", "--set", "train.log_every=1", "--set", "train.save_every=2"]
    assert main(_args(corpus, tmp_path / "one", tmp_path / "cache", *common)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmzoo",
           *_args(corpus, tmp_path / "two", tmp_path / "cache", *common, "--parallel", "fsdp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    def losses(d):
        return [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["split"] == "train"]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(two) == 4 and json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert max(abs(a - b) / abs(b) for a, b in zip(two, one)) <= 1e-5, (two, one)
    assert (tmp_path / "two" / "checkpoints" / "step_00000004" / "dcp" / ".metadata").exists()  # sharded
    a, b = lmzoo.load(tmp_path / "one" / "final"), lmzoo.load(tmp_path / "two" / "final")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-4, atol=1e-5)
