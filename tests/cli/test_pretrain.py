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


pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize("given", ["configs/llama/tiny.yaml", "llama/tiny", "llama/tiny.yaml"])
def test_a_shipped_config_is_found_from_any_folder(given, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the name resolves to the package's file
    args = _args(corpus, tmp_path / "run", tmp_path / "cache", "--steps", "1", "--save-every", "1")
    args[args.index(CONFIG)] = given
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count(f"using the shipped {Path(CONFIG).resolve()}") == 1
    assert lmzoo.load(tmp_path / "run" / "final").config.n_kv_heads == 2  # llama/tiny.yaml's model


def test_a_missing_config_names_the_path_and_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", "configs/llama/huge.yaml"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmzoo") and "configs/llama/huge.yaml: cannot read the run config" in err
    assert "llama/tiny" in err and "gpt2/tiny" in err and len(err.splitlines()) == 1


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
    rel = max(abs(a - b) / abs(b) for a, b in zip(two, one))
    print(f"torchrun fsdp vs one process: max relative loss difference {rel:.2e}")
    assert rel <= 3e-7, (rel, two, one)
    assert (tmp_path / "two" / "checkpoints" / "step_00000004" / "dcp" / ".metadata").exists()  # sharded
    a, b = lmzoo.load(tmp_path / "one" / "final"), lmzoo.load(tmp_path / "two" / "final")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-4, atol=1e-5)


def _train_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"]


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes_bitwise(corpus, tmp_path, capsys):
    """A real `lmzoo pretrain` process gets SIGINT mid-training: one line on stderr (no traceback), exit 130,
    a checkpoint at the interrupted step, and --resume ends at the uninterrupted run's weights bit for bit."""
    import signal
    import time

    from tests.train.test_resume import _assert_bitwise_equal, _last_logged_step

    steps, cache = 60, tmp_path / "cache"
    common = ["--steps", str(steps), "--set", "train.log_every=1", "--set", "train.warmup_steps=3"]  # save_every 0
    assert main(_args(corpus, tmp_path / "ref", cache, *common)) == 0  # the uninterrupted run, in this process
    out = tmp_path / "interrupted"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "lmzoo", *_args(corpus, out, cache, *common)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _last_logged_step(out) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("llama: "), stderr  # the run's start line, then one line
    stopped = _last_logged_step(out)
    ckpt = out / "checkpoints" / f"step_{stopped:08d}"
    assert 4 <= stopped < steps and lines[1].startswith(f"lmzoo pretrain: interrupted at step {stopped}; "
                                                         f"checkpoint {ckpt}; continue with: lmzoo pretrain "), lines[1]
    assert lines[1].endswith(f"--out {out} --no-progress --resume")
    assert [s for s, _ in __import__("lmzoo.train.checkpoint", fromlist=["x"]).list_checkpoints(
        out / "checkpoints")] == [stopped]  # written at the interrupt (save_every is 0)
    capsys.readouterr()
    assert main(_args(corpus, out, cache, *common, "--resume")) == 0
    assert f"resumed from {ckpt} (step {stopped})" in capsys.readouterr().err
    _assert_bitwise_equal(lmzoo.load(out / "final").state_dict(), lmzoo.load(tmp_path / "ref" / "final").state_dict())
    assert _train_losses(out) == _train_losses(tmp_path / "ref")


def test_resume_without_a_checkpoint_is_an_error_unless_resume_or_start(corpus, tmp_path, capsys):
    out, cache, log = tmp_path / "run", tmp_path / "cache", ("--set", "train.log_every=1")
    assert main(_args(corpus, out, cache, "--steps", "2", "--resume")) == 1
    err = capsys.readouterr().err
    assert err.startswith("lmzoo pretrain: error: --resume: ") and "holds no checkpoint" in err
    assert "--resume-or-start" in err and len(err.strip().splitlines()) == 1 and "Warning" not in err
    assert not (out / "tokenizer").exists()  # refused before any work
    assert main(_args(corpus, out, cache, "--steps", "2", "--resume-or-start", *log)) == 0
    assert "nothing to resume in" in capsys.readouterr().err
    assert len(_train_losses(out)) == 2 and (out / "checkpoints" / "step_00000002").is_dir()
    assert main(_args(corpus, out, cache, "--steps", "3", "--resume-or-start", *log)) == 0  # now it resumes
    assert "resumed from" in capsys.readouterr().err and len(_train_losses(out)) == 3
    (out / "checkpoints" / "step_00000003" / "manifest.json").unlink()
    assert main(_args(corpus, out, cache, "--steps", "3", "--resume", *log)) == 0
    err = capsys.readouterr().err  # a warning is one line as well, without Python's source line
    assert "lmzoo pretrain: warning: skipping checkpoint step_00000003: " in err and "warnings.warn" not in err
    assert "resumed from" in err and "step_00000002" in err


@pytest.mark.parametrize("flag,message", [
    (["--set", "data.seq_len=64.5"], r"data\.seq_len must be an integer, got 64\.5 \(float\)"),
    (["--set", "data.seq_len='64'"], r"data\.seq_len must be an integer, got '64' \(str\)"),
    (["--set", "data.batch_size=true"], r"data\.batch_size must be an integer, got True \(bool\)"),
    (["--set", "tokenizer.vocab_size=300.0"], r"tokenizer\.vocab_size must be an integer, got 300\.0 \(float\)"),
    (["--set", "model.n_layers='4'"], r"model\.n_layers must be an integer, got '4' \(str\)"),
    (["--set", "model.d_ff=128.0"], r"model\.d_ff must be an integer, got 128\.0 \(float\)"),
    (["--set", "model.rope={max_positions: 64.5}"], r"model\.rope\.max_positions must be an integer, got 64\.5"),
    (["--set", "train.steps='4'"], r"train\.steps must be an integer >= 1, got '4' \(str\)"),
    (["--set", "train.grad_accum=2.0"], r"train\.grad_accum must be an integer >= 1, got 2\.0 \(float\)"),
])
def test_integer_fields_take_integers_only(flag, message, corpus, tmp_path, capsys):
    import re

    assert main(_args(corpus, tmp_path / "r", tmp_path / "c", *flag)) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()  # checked before any work


def _init_args(corpus, out, cache, init_from, *extra):
    return ["pretrain", "--config", CONFIG, "--init-from", str(init_from), "--data", str(corpus), "--out", str(out),
            "--no-progress", "--seq-len", "32", "--batch-size", "8", "--set", f"data.cache_dir={cache}",
            "--set", "train.plot=false", "--set", "train.log_every=1", "--set", "data.val_fraction=0.02", *extra]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A run trained for 40 steps: its final/ is what --init-from continues."""
    out = tmp_path_factory.mktemp("source")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(_args(corpus, out, out / "cache", "--steps", "40", "--lr", "0.01", "--set", "train.warmup_steps=4",
                      "--set", "train.log_every=1")) == 0
    torch.set_num_threads(before)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "eval"]
    return out, evals[-1]["loss"]


def test_init_from_continues_the_trained_model_with_its_tokenizer(corpus, trained, tmp_path, monkeypatch, capsys):
    import math

    from lmzoo.stages import pretrain

    source, source_eval = trained
    at_start = {}

    class Spy(pretrain.Trainer):  # the weights the loop is given, i.e. the weights at step 0
        def __init__(self, model, *a, **kw):
            at_start.update({k: v.detach().clone() for k, v in model.state_dict().items()})
            super().__init__(model, *a, **kw)

    monkeypatch.setattr(pretrain, "Trainer", Spy)
    out = tmp_path / "continued"
    assert main(_init_args(corpus, out, tmp_path / "cache", source / "final", "--steps", "3", "--lr", "1e-3")) == 0
    assert f"from {source / 'final'}" in capsys.readouterr().err
    src = lmzoo.load(source / "final").state_dict()
    assert at_start.keys() == src.keys() and all(torch.equal(at_start[k], v) for k, v in src.items())
    first = _train_losses(out)[0]
    vocab = lmzoo.load_tokenizer(source / "final").vocab_size
    print(f"init-from: first-step loss {first:.3f}, source's last eval loss {source_eval:.3f}, "
          f"ln V {math.log(vocab):.3f}")
    assert abs(first - source_eval) < 0.25 and first < math.log(vocab) - 2, (first, source_eval)
    tok_files = sorted(p.name for p in (source / "final").iterdir() if p.name.startswith("tokenizer"))
    assert tok_files and all((out / "final" / n).read_bytes() == (source / "final" / n).read_bytes() for n in tok_files)
    assert not (out / "tokenizer").exists()  # no tokenizer was trained
    assert json.loads((out / "run.json").read_text())["train"]["extra"]["init_from"] == str(source / "final")


@pytest.mark.parametrize("extra,message", [
    (["--set", "model.n_layers=3"], r"init_from .* fixes the architecture.*n_layers: 3 here, 4 there"),
    (["--set", "model.family=gpt2"], "is a llama model, not gpt2"),
    (["--set", "tokenizer.vocab_size=300"], r"\['vocab_size'\] apply to training a tokenizer"),
    (["--set", "tokenizer.path=TOK"], r"tokenizer: path .* has 299 tokens, the model in .* has vocab_size"),
])
def test_init_from_refuses_what_disagrees_with_the_checkpoint(extra, message, corpus, trained, tmp_path, capsys):
    import re

    source, _ = trained
    if "tokenizer.path=TOK" in extra:  # a tokenizer of another size
        small = lmzoo.train_tokenizer("bpe", texts=corpus.read_text().splitlines()[:500], vocab_size=299)
        small.save(tmp_path / "tok")
        assert small.vocab_size == 299
        extra = ["--set", f"tokenizer.path={tmp_path / 'tok'}"]
    assert main(_init_args(corpus, tmp_path / "r", tmp_path / "c", source / "final", "--steps", "1", *extra)) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err


def test_init_from_needs_a_saved_model(corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(_init_args(corpus, tmp_path / "r", tmp_path / "c", tmp_path / "empty", "--steps", "1")) == 1
    err = capsys.readouterr().err
    assert f"init_from {tmp_path / 'empty'}: no config.json there" in err and len(err.strip().splitlines()) == 1
