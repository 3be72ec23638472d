"""benchmarks/bench_sft.py --quick end to end: lmzoo's SFT recipe reaches transformers + PEFT's losses.

Timings are never asserted. What is checked are the benchmark's correctness claims: from the same
weights and the same conversations, lmzoo (packed rows, chunked loss) and transformers + PEFT
(padded rows, full logits) start at the same per-token loss in float32 for full finetuning, LoRA and
QLoRA, with the same initial LoRA adapters, stay together over the steps, every ablation
variant gives that loss as well, and the memory processes measure what they say (the lmzoo one
never imports transformers). Memory runs for full finetuning only, to keep the test short.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

ROOT = Path(__file__).resolve().parents[2]
VOCAB, STEPS = 2048, 3  # the --quick sizes


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_sft")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sft.py"), "--quick", "--threads", "1",
                           "--memory-modes", "full", "--out-dir", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "bench_sft_quick.png").stat().st_size > 0
    return json.loads((out / "bench_sft_quick.json").read_text()), (out / "bench_sft_quick.md").read_text()


@pytest.mark.slow
def test_every_cell_is_measured(result):
    r, md = result
    cells = [(w["mode"], w["precision"]) for w in r["rows"]]
    assert cells == [(m, p) for m in ("full", "lora", "qlora") for p in ("fp32", "bf16")]
    assert md.count("\n| full |") == 2 and md.count("\n| qlora |") == 2
    for w in r["rows"]:
        assert w["lmzoo"]["tokens_per_s"] > 0 and w["transformers"]["tokens_per_s"] > 0, w
        assert w["speed_ratio"] == pytest.approx(w["lmzoo"]["tokens_per_s"] / w["transformers"]["tokens_per_s"])
    for key, run in r["timing"].items():
        assert len(run["losses"]) == len(run["times_s"]) == STEPS, key
    # the same conversations both ways: packing fills rows, padding does not
    d = r["data"]
    assert d["packed_positions_per_step"] < d["padded_positions_per_step"]
    assert d["trained_tokens_per_step"] < d["real_tokens_per_step"] <= d["packed_positions_per_step"]


@pytest.mark.slow
def test_equal_losses(result):
    r, _ = result
    for w in r["rows"]:
        hf = w["transformers"]
        # a random init with std 0.02 predicts nearly uniformly: the per-token mean CE is ~ln(V)
        assert abs(hf["first_loss"] - math.log(VOCAB)) < 0.1, w
        if w["precision"] == "fp32":
            assert w["first_loss_diff"] < 1e-4, w
            assert w["last_loss_diff"] < 1e-3, w
        else:  # bf16 autocast rounds differently in the two libraries
            assert w["first_loss_diff"] < 1e-2 and w["last_loss_diff"] < 1e-2, w
    for mode, n_adapters in (("full", 0), ("lora", 2 * 7), ("qlora", 2 * 7)):  # 2 layers × 7 projections
        sums = [run["lora_A_sums"] for key, run in r["timing"].items() if key.startswith(mode + "/")]
        assert all(len(x) == n_adapters for x in sums), mode
        for x in sums[1:]:  # every variant's adapters start from the one PEFT file
            assert x == pytest.approx(sums[0], rel=1e-9, abs=1e-9), mode
    hf = next(w for w in r["rows"] if (w["mode"], w["precision"]) == ("lora", "fp32"))["transformers"]
    variants = {w["variant"]: w for w in r["ablation"]}
    assert set(variants) == {"lmzoo, no packing", "lmzoo, no chunked CE", "lmzoo, neither", "lmzoo", "lmzoo (bf16)"}
    for name, w in variants.items():
        if name != "lmzoo (bf16)":  # packing and the chunked loss change no loss
            assert w["first_loss_diff"] < 1e-4 and abs(w["last_loss"] - hf["last_loss"]) < 1e-3, w


@pytest.mark.slow
def test_memory_processes(result):
    r, _ = result
    assert sorted(r["memory"]) == sorted(f"full/{s}/{p}" for s in ("lmzoo", "transformers") for p in ("fp32", "bf16"))
    for key, m in r["memory"].items():
        assert m["imports_transformers"] == ("transformers" in key), key
        assert m["peak_rss_mib"] > m["rss_added_mib"] >= 0, m
    for w in r["rows"]:
        measured = w["mode"] == "full"
        assert (w["peak_rss_ratio"] is not None) == measured, w
