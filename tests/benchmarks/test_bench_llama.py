"""benchmarks/bench_llama.py --quick end to end: every row measured, both libraries agree.

Timings are never asserted (they depend on the machine); the test checks that each row holds a
positive number for both libraries, that greedy decoding picked the same ids on both sides and
that the training losses of the two libraries track each other from the same weights.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
MEASUREMENTS = ["decode b=1", "decode b=8", "train b=2×32"]


@pytest.mark.slow
def test_bench_llama_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_llama.py"), "--quick", "--threads", "1",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "bench_llama_quick.json").read_text())
    assert (tmp_path / "bench_llama_quick.md").read_text().count("\n| ") == 1 + 3 * len(MEASUREMENTS)

    rows = {w["name"]: w for w in r["rows"]}
    expected = [f"{m} throughput" for m in MEASUREMENTS] + [f"{m} peak RSS" for m in MEASUREMENTS]
    assert sorted(rows) == sorted(expected + [f"{m} RSS added" for m in MEASUREMENTS])
    for name in expected:
        w = rows[name]
        assert w["lmzoo"] > 0 and w["transformers"] > 0, w
        assert w["ratio"] == pytest.approx(w["lmzoo"] / w["transformers"])
    for m in MEASUREMENTS:  # the measurement's own allocation can be ~0 at quick sizes, never negative
        w = rows[f"{m} RSS added"]
        assert w["lmzoo"] >= 0 and w["transformers"] >= 0, w

    for m in ("decode b=1", "decode b=8"):
        c = r["checks"][m]
        assert c["agree"] and c["mismatched_tokens"] == 0, c
        assert c["shape"] == [int(m[-1]), 8 + 8]
    train = r["checks"]["train b=2×32"]
    assert train["max_abs_loss_diff"] < 1e-4, train
    assert all(len(r["runs"][m][side]["times_s"]) == 2 for m in MEASUREMENTS for side in ("lmzoo", "transformers"))
