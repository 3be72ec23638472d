"""metrics.jsonl: one record per "\n" line, written as ASCII, read back whole."""

from __future__ import annotations

import json

from lmzoo.train.metrics import MetricsLog, read_metrics


def test_record_with_a_raw_line_separator_is_read_back(tmp_path):
    """JSON allows a raw U+2028 inside a string (json.dumps(..., ensure_ascii=False) writes one);
    str.splitlines() cut such a line in two and the old reader dropped both halves."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"split": "train", "step": 1, "loss": 2.5}, {"split": "eval", "step": 1, "note": "上\u2028下\x85"},
            {"split": "train", "step": 2, "loss": 2.0}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + '{"split": "tr',
                    encoding="utf-8")  # the last line cut short by a crash
    assert read_metrics(path) == rows


def test_written_lines_are_ascii_and_truncate_keeps_them(tmp_path):
    log = MetricsLog(tmp_path)
    rows = [{"split": "train", "step": s, "loss": 1.0 / s, "run": "中文\u2028"} for s in (1, 2, 3)]
    for r in rows:
        log.write(r)
    raw = (tmp_path / "metrics.jsonl").read_bytes()
    assert raw.isascii() and raw.count(b"\n") == 3 and b"\\u2028" in raw
    log.truncate_after(2)
    assert read_metrics(tmp_path / "metrics.jsonl") == rows[:2]
    assert (tmp_path / "metrics.jsonl").read_bytes().isascii()
