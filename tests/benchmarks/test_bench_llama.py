"""benchmarks/bench_llama.py --quick end to end: every row measured, both libraries agree.

Timings are never asserted (they depend on the machine); the test checks that each row holds a
positive number for both libraries, that greedy decoding picked the same ids on both sides, that
the training losses of the two libraries track each other from the same weights, and that the
step's achieved GFLOP/s and share of the GEMM rate follow from its time, the FLOP formula and the
GEMM rate each process measured.
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
                           "--optimizer-impl", "fused", "--chunked-ce", "16", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "bench_llama_quick.json").read_text())
    assert (tmp_path / "bench_llama_quick.md").read_text().count("\n| ") == 1 + 3 * len(MEASUREMENTS) + 2

    rows = {w["name"]: w for w in r["rows"]}
    expected = [f"{m} throughput" for m in MEASUREMENTS] + [f"{m} peak RSS" for m in MEASUREMENTS]
    roofline = ["train b=2×32 achieved", "train b=2×32 of the GEMM rate"]
    assert sorted(rows) == sorted(expected + roofline + [f"{m} RSS added" for m in MEASUREMENTS])
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
    train = r["checks"]["train b=2×32"]  # lmzoo with fused AdamW and a 16-token chunked loss: the same losses
    assert r["train_options"] == {"optimizer_impl": "fused", "compile": False, "chunked_ce": 16}
    assert train["max_abs_loss_diff"] < 1e-4, train
    assert all(len(r["runs"][m][side]["times_s"]) == 2 for m in MEASUREMENTS for side in ("lmzoo", "transformers"))

    # 6 · N_gemm · tokens + attention, N_gemm by hand for the quick sizes (d 64, 2 layers, 4 heads / 2 KV
    # heads of 16, d_ff 128, vocab 256): per layer q, o 64·64 each, k, v 64·32 each, MLP 3·64·128; head 256·64
    n_gemm = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 256 * 64
    f = r["train_flops"]
    assert f["n_gemm_params"] == n_gemm and f["flops"] == 6 * n_gemm * 64 + 12 * 2 * 32 * 64 * 64
    for side in ("lmzoo", "transformers"):
        res = r["runs"]["train b=2×32"][side]
        gemm = res["gemm_per_round"][0]
        assert gemm["linear_gflops"] > 0 and gemm["square_gflops"] > 0 and gemm["shape_mkn"] == [64, 64, 128]
        assert res["gflops"] == pytest.approx(f["flops"] / res["median_s"] / 1e9)
        assert res["pct_of_gemm_rate"] == pytest.approx(100 * res["gflops"] / gemm["linear_gflops"])
        assert rows["train b=2×32 of the GEMM rate"][side] == res["pct_of_gemm_rate"]
