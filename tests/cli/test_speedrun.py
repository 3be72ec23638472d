"""`lmzoo speedrun --tiny` end to end: tokenizer, training, perplexity far below unigram, samples, report."""

import json

import pytest

import lmzoo
from lmzoo.cli.main import main


def test_tiny_speedrun_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["speedrun", "--tiny", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "[6/6] samples" in printed and "unigram baseline" in printed
    summary = json.loads((out / "summary.json").read_text())
    # learnt context: validation perplexity at least 2x below the unigram baseline on the same tokens
    assert summary["val"]["ppl"] * 2 < summary["unigram_ppl"], (summary["val"], summary["unigram_ppl"])
    assert summary["steps"] == 60 and summary["steps_how"] == "fixed"
    assert {g["lang"] for g in summary["samples"]} == {"en", "zh"}
    report = (out / "report.md").read_text()
    assert "## Result" in report and "unigram baseline" in report and "## Samples" in report
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["split"] == "train" and any(r["split"] == "eval" for r in rows)
    assert rows[0]["loss"] > rows[-1]["loss"] if rows[-1]["split"] == "train" else True
    pytest.importorskip("matplotlib")
    assert (out / "speedrun.png").stat().st_size > 10_000 and (out / "loss.png").is_file()
    model = lmzoo.load(out / "final")
    tok = lmzoo.load_tokenizer(out / "final")
    assert model.config.vocab_size == tok.vocab_size == summary["tokenizer_vocab"]


def test_speedrun_refuses_a_used_folder(tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    assert main(["speedrun", "--tiny", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "x").read_text() == "keep me"
