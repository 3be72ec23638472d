"""benchmarks/bench_decode.py --quick end to end: lmzoo, transformers and llama.cpp on the same weights.

Timings are never asserted; the test checks that every run measured a positive rate, that the greedy
ids of lmzoo, transformers and llama.cpp (through the GGUF export, so its Q/K permutation) agree, and
that the bandwidth columns follow from the rate and the bytes per token. llama.cpp runs where it can be
imported, and must where the prebuilt wheels are (tests/interop/test_gguf.py says the same).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from lmzoo.interop import llamacpp  # noqa: E402
from tests.shared_data import REQUIRED, WHEELS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_decode_quick(tmp_path):
    ok, why = llamacpp.available()
    if not ok and (WHEELS.is_dir() or REQUIRED):
        pytest.fail(f"{why}, though {WHEELS} holds prebuilt wheels (make installs one)")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), "--quick", "--threads", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    r = json.loads((tmp_path / "bench_decode.json").read_text())
    (res,) = r["models"]
    engines = {(row["engine"], row["format"]) for row in res["rows"]}
    assert {("lmzoo", "fp32"), ("lmzoo", "int8"), ("transformers", "fp32")} <= engines
    assert (("llama.cpp", "F32") in engines) == ok
    assert res["copy_gb_s"] > 0
    for row in res["rows"]:
        assert row["tokens_per_s"] > 0, row
        assert row["gb_s"] == pytest.approx(row["tokens_per_s"] * row["bytes_per_token"] / 1e9)
    ids = {row["engine"]: row["ids"] for row in res["rows"] if row["format"] in ("fp32", "F32")}
    assert len(ids["lmzoo"]) == 8 and ids["transformers"] == ids["lmzoo"]
    if ok:
        assert ids["llama.cpp"] == ids["lmzoo"]
    md = (tmp_path / "bench_decode.md").read_text()
    assert md.count("greedy ids agree") == (2 if ok else 1) and "DIFFER" not in md
    assert (tmp_path / "bench_decode.png").stat().st_size > 10_000
    if not ok:
        print(f"llama.cpp not run: {why}")
