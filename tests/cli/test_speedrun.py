"""`lmzoo speedrun --tiny`: every stage end to end (killed in the middle of DPO and resumed there),
the report card, the final model chatting and in GGUF; --stages subsets; refusals in one line."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lmzoo
from lmzoo.cli.main import main
from lmzoo.train.checkpoint import list_checkpoints

ROWS = ["pretrain", "sft", "dpo", "int8", "gguf q8_0"]


def _state(out: Path) -> dict:
    return json.loads((out / "state.json").read_text())


def _kill_during_dpo(out: Path, cache: Path) -> None:
    """Start the tiny speedrun in a subprocess and SIGKILL it once DPO has saved a checkpoint."""
    cmd = [sys.executable, "-m", "lmzoo.cli.main", "speedrun", "--tiny", "--out", str(out), "--cache-dir", str(cache),
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ,
                                                                                        "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    try:
        while not list_checkpoints(out / "dpo" / "checkpoints"):
            if proc.poll() is not None:
                pytest.fail(f"the speedrun ended (rc {proc.returncode}) before DPO checkpointed: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "DPO did not checkpoint within 240 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def test_tiny_speedrun_killed_in_dpo_resumes_there_and_reports_every_stage(tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    _kill_during_dpo(out, cache)
    state = _state(out)
    assert state["stages"]["pretrain"]["done"] and state["stages"]["sft"]["done"]
    assert state["stages"]["dpo"] == {"started": True}  # killed midway: neither done nor evaluated
    pretrain_metrics = (out / "pretrain" / "metrics.jsonl").read_bytes()
    saved = list_checkpoints(out / "dpo" / "checkpoints")[0][0]  # the newest, as --resume picks

    assert main(["speedrun", "--tiny", "--out", str(out), "--cache-dir", str(cache), "--no-progress",
                 "--resume"]) == 0
    captured = capsys.readouterr()
    assert "pretrain: done in an earlier call" in captured.out and "sft: done in an earlier call" in captured.out
    assert f"(step {saved})" in captured.err and "resumed from" in captured.err  # DPO went on from its checkpoint
    assert (out / "pretrain" / "metrics.jsonl").read_bytes() == pretrain_metrics  # pretraining did not run again
    state = _state(out)
    assert all(state["stages"][s]["done"] for s in ("pretrain", "sft", "dpo", "quantize"))
    assert state["stages"]["dpo"]["resumed"] and not state["stages"]["sft"]["resumed"]
    dpo_steps = [r["step"] for r in map(json.loads, (out / "dpo" / "metrics.jsonl").read_text().splitlines())
                  if r["split"] == "train"]
    assert dpo_steps == sorted(set(dpo_steps)) and dpo_steps[-1] == state["plan"]["steps"]["dpo"]

    # the report card: a row per stage's model, held-out exact match per task kind, size and speed
    assert sorted(state["evals"]) == sorted(ROWS)
    for label, row in state["evals"].items():
        assert 0.0 <= row["mean_exact_match"] <= 1.0 and row["perplexity"] > 1.0, (label, row)
        assert set(row["exact_match"]) == set(row["n_tasks"]) and set(row["n_tasks"].values()) == {5}
        assert any("计算" in p or "排序" in p for p in row["samples"])  # Chinese prompts asked of every stage
    ev = state["evals"]
    assert ev["pretrain"]["template"].startswith("plain") and ev["sft"]["template"] == "chat"
    assert ev["gguf q8_0"]["bytes"] < 0.35 * ev["dpo"]["bytes"] and ev["int8"]["bytes"] < ev["dpo"]["bytes"]
    assert "decode_tok_s" in ev["int8"] and "decode_tok_s" not in ev["gguf q8_0"]
    # pretraining learnt context; SFT learnt its answers (loss on the response tokens fell)
    pre = state["stages"]["pretrain"]
    assert pre["val_ppl"] * 2 < pre["unigram_ppl"], pre
    sft_loss = [r["loss"] for r in map(json.loads, (out / "sft" / "metrics.jsonl").read_text().splitlines())
                if r["split"] == "train"]
    assert sft_loss[-1] < sft_loss[0] - 0.5, sft_loss
    report = (out / "report.md").read_text()
    assert "## Report card" in report and "## Samples" in report and "lmzoo chat --model" in report
    assert all(f"| {label} |" in report for label in ROWS)
    assert "llama-cli -m" in report and "lmzoo serve --model" in report
    # each model against the one it came from, task by task on the same tasks (the right/wrong bits kept)
    for label, row in ev.items():
        assert {k: len(v) for k, v in row["right"].items()} == row["n_tasks"]
        assert {k: v.count("1") / len(v) for k, v in row["right"].items()} == row["exact_match"]
    for label, src in (("sft", "pretrain"), ("dpo", "sft"), ("int8", "dpo"), ("gguf q8_0", "dpo")):
        assert f"| {label} | {src} | " in report, label
    # DPO's pairs on disk: the SFT model's mistakes on fresh tasks, none of them held out (the held-out
    # file is the report's tasks), the right answer chosen over the model's wrong one
    from lmzoo.data.tasks import Task, check

    held = {json.loads(x)["prompt"] for x in (out / "data" / "held_out.jsonl").read_text().splitlines()}
    pairs = [json.loads(x) for x in (out / "data" / "dpo_pairs.jsonl").read_text().splitlines()]
    counts = state["stages"]["dpo"]["pairs"]
    assert len(held) == 25 and counts["pairs"] >= 16
    assert counts["replay"] == min(counts["prompts"] - counts["pairs"], 2 * counts["pairs"])  # right answers, replay 2
    assert len(pairs) == counts["pairs"] + counts["replay"]
    assert not held & {r["prompt"] for r in pairs}
    for r in pairs:
        assert r["chosen"] != r["rejected"] and r["rejected"].strip(), r
        if " + " in r["prompt"] or " - " in r["prompt"]:  # arithmetic: checkable without the task's record
            t = Task("add" if " + " in r["prompt"] else "sub", r["prompt"], r["chosen"], "en")
            assert check(t, r["chosen"]) and not check(t, r["rejected"]), r

    # the final model loads, chats, and its GGUF file is the quantized model's weights
    final = out / "dpo" / "final"
    model, tok = lmzoo.load(final), lmzoo.load_tokenizer(final)
    assert model.config.vocab_size == tok.vocab_size and tok.chat_template
    assert main(["chat", "--model", str(final), "--prompt", "计算 3 + 4。", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.endswith("\n")  # the reply (a 0.15M model's may be empty), one line
    from lmzoo.interop.gguf import read_gguf

    gg, _ = read_gguf(out / "model-q8_0.gguf")
    assert gg.config.n_layers == model.config.n_layers
    pytest.importorskip("matplotlib")
    assert (out / "speedrun.png").stat().st_size > 20_000 and (out / "sft" / "sft.png").is_file()


def test_stages_run_a_subset_and_later_calls_add_to_it(tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["speedrun", "--tiny", "--out", str(out), "--cache-dir", str(cache), "--no-progress"]
    assert main(args + ["--stages", "pretrain"]) == 0
    state = _state(out)
    assert set(state["stages"]) == {"pretrain"} and set(state["evals"]) == {"pretrain"}
    assert not (out / "sft").exists() and "| pretrain |" in (out / "report.md").read_text()
    capsys.readouterr()
    # DPO starts from SFT's model, which this run does not have: one line, nothing done
    assert main(args + ["--resume", "--stages", "dpo"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("it starts from sft's model, which " + f"{out} does not hold; add sft to --stages") \
        and len(err.splitlines()) == 1, err
    assert not (out / "dpo").exists()
    # quantize the pretrained model: the report card gains its rows, pretraining is kept
    assert main(args + ["--resume", "--stages", "quantize"]) == 0
    state = _state(out)
    assert state["stages"]["quantize"]["source"] == "pretrain"
    assert set(state["evals"]) == {"pretrain", "int8", "gguf q8_0"}
    assert "pretrain: done in an earlier call" not in capsys.readouterr().out  # not asked for: not listed
    drop = state["evals"]["pretrain"]["perplexity"] - state["evals"]["int8"]["perplexity"]
    assert math.isfinite(drop) and abs(drop) < 0.05 * state["evals"]["pretrain"]["perplexity"]  # int8 ~ lossless


@pytest.mark.parametrize("argv, needle", [
    (["--resume"], "holds no speedrun state (state.json) to resume"),
    (["--stages", "sft"], "it starts from pretrain's model"),
    (["--stages", "quantize"], "holds no trained model to quantize"),
    (["--minutes", "0"], "--minutes must be a positive number of minutes, got 0"),
])
def test_speedrun_refusals_are_one_line_before_any_work(tmp_path, capsys, argv, needle):
    assert main(["speedrun", "--tiny", "--out", str(tmp_path / "new"), "--no-progress", *argv]) == 1
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "new").exists()


def test_speedrun_refuses_a_used_folder(tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    assert main(["speedrun", "--tiny", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "x").read_text() == "keep me"
