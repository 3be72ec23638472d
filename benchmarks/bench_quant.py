"""Quantization side by side on one trained model: quality, size, memory and decode speed.

A byte-level LLaMA is trained on tinyshakespeare with a fixed seed (``tiny_shakespeare.py``; cached
in --cache), quantized with every method, and each variant is measured in its own process
(``lmzoo.quant.report.measure``): perplexity on the held-out last 10% of the corpus, bytes of the
decoder linears against the ideal (bits per weight plus scales and zeros), peak resident memory,
greedy decode tokens/s at batch 1. A second table times decode on a larger random-weight model,
where reading the weights (not Python overhead) sets the pace.

The issue's targets are checked and printed (PASS/FAIL) under the tables:
  - 4-bit GPTQ (g128) and 4-bit AWQ each lose at most half the perplexity RTN loses on the same grid
    (GPTQ: symmetric, like RTN w4g128; AWQ: asymmetric with zero points, like RTN w4g128 asym);
  - 8-bit methods lose under 1% perplexity;
  - int8 weight-only decode (RTN w8 per channel, torch's int8 kernel) at least as fast as float32;
  - stored weight bytes within 5% of the ideal.

    python benchmarks/bench_quant.py            # trains once (~10 min on 2 busy cores), then ~10 min
    python benchmarks/bench_quant.py --quick    # a tiny model, a couple of minutes (what the test runs)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tiny_shakespeare as ts  # noqa: E402

import lmzoo  # noqa: E402
from lmzoo.quant.report import add_ratios, figure, kl_divergence, measure, table  # noqa: E402

TRAIN = {"full": dict(d_model=256, n_layers=4, n_heads=4, d_ff=768, seq_len=128, batch=16, steps=1500),
         "quick": dict(d_model=128, n_layers=2, n_heads=4, d_ff=384, seq_len=64, batch=16, steps=120)}
VARIANTS = [  # name, method, kwargs
    ("rtn w4g128", "rtn", {}),
    ("rtn w4g128 asym", "rtn", {"sym": False}),
    ("gptq w4g128", "gptq", {}),
    ("gptq w4g128 act-order", "gptq", {"desc_act": True}),
    ("awq w4g128", "awq", {}),
    ("nf4 (b64, double quant)", "nf4", {}),
    ("rtn w8 (int8 kernel)", "rtn", {"bits": 8, "group_size": None}),
    ("rtn w8 (dequant)", "rtn", {"bits": 8, "group_size": None, "_kernel": "dequant"}),
    ("gptq w8", "gptq", {"bits": 8, "group_size": None}),
    ("llm.int8", "int8", {}),
]
SPEED = {"full": dict(d_model=1024, n_layers=4, n_heads=8, d_ff=2816), "quick": dict(d_model=256, n_layers=2, n_heads=4, d_ff=768)}
SPEED_VARIANTS = [("rtn w8 (int8 kernel)", "rtn", {"bits": 8, "group_size": None}),
                  ("rtn w8 (dequant)", "rtn", {"bits": 8, "group_size": None, "_kernel": "dequant"}),
                  ("rtn w4g128", "rtn", {}), ("nf4", "nf4", {}), ("llm.int8", "int8", {})]


def quantize_to(src: Path, dst: Path, method: str, kw: dict, calib) -> str:
    """Quantize ``src`` into ``dst``; returns the kernel the variant is measured with."""
    kw = dict(kw)
    kernel = kw.pop("_kernel", "auto")
    model = lmzoo.load(src)
    lmzoo.quantize(model, method, calibration=calib, **kw)
    lmzoo.save(model, dst)
    return kernel


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cache", default="/tmp/lmzoo_bench_quant", help="trained model and quantized copies")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=0, help="held-out windows (default 128; quick 16)")
    p.add_argument("--n-calib", type=int, default=32)
    a = p.parse_args()
    if ts.corpus_path() is None:
        print(ts.missing_corpus(), file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    kind = "quick" if a.quick else "full"
    cache = Path(a.cache) / kind
    hp = TRAIN[kind]
    model_dir = cache / "float32"
    info_file = model_dir / "train_info.json"
    if not info_file.exists() or {k: json.loads(info_file.read_text()).get(k) for k in hp} != hp:
        print(f"training {hp} ...", file=sys.stderr)
        ts.train(model_dir, **hp, log_every=100)
    info = json.loads(info_file.read_text())
    train_ids, held = ts.load_ids()
    L = hp["seq_len"]
    g = torch.Generator().manual_seed(1)
    calib = [train_ids[s:s + L][None] for s in torch.randint(0, len(train_ids) - L, (a.n_calib,), generator=g).tolist()]
    windows = a.eval_windows or (16 if a.quick else 128)
    meas = dict(seq_len=L, max_windows=windows, new_tokens=16 if a.quick else 64, threads=a.threads or None)

    rows = [{"name": "float32", **measure(model_dir, held, **meas), "kl": 0.0}]
    ref = lmzoo.load(model_dir)
    for name, method, kw in VARIANTS:
        dst = cache / name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
        t0 = time.perf_counter()
        kernel = quantize_to(model_dir, dst, method, kw, calib)
        seconds = time.perf_counter() - t0
        kl = kl_divergence(ref, lmzoo.quant.set_kernel(lmzoo.load(dst), kernel), held, L, windows)
        rows.append({"name": name, **measure(dst, held, **meas, kernel=kernel), "kl": kl, "quantize_s": seconds})
        print(f"{name}: ppl {rows[-1]['perplexity']:.4f}, KL {kl:.5f}", file=sys.stderr)
    add_ratios(rows)

    speed_dir = cache / "speed"
    torch.manual_seed(0)
    sp = SPEED[kind]
    big = lmzoo.build(ts.config(**sp, seq_len=L)).eval()
    lmzoo.save(big, speed_dir / "float32")
    random_ids = torch.randint(0, 256, (4 * L + 1,))
    speed_meas = dict(meas, max_windows=2)
    speed_rows = [{"name": "float32", **measure(speed_dir / "float32", random_ids, **speed_meas)}]
    for name, method, kw in SPEED_VARIANTS:
        dst = speed_dir / name.replace(" ", "_").replace("(", "").replace(")", "")
        kernel = quantize_to(speed_dir / "float32", dst, method, kw, None)
        speed_rows.append({"name": name, **measure(dst, random_ids, **speed_meas, kernel=kernel)})
    add_ratios(speed_rows)

    by = {r["name"]: r for r in rows}
    loss = lambda n: by[n]["perplexity"] / by["float32"]["perplexity"] - 1  # noqa: E731
    kl = lambda n: by[n]["kl"]  # noqa: E731
    checks = []
    for q, r in (("gptq w4g128", "rtn w4g128"), ("awq w4g128", "rtn w4g128 asym")):
        checks.append((f"{q} loses <= 1/2 of {r}'s perplexity increase", loss(q) <= 0.5 * loss(r),
                       f"{loss(q):+.3%} vs {loss(r):+.3%} (ratio {loss(q) / loss(r):.2f})"))
        checks.append((f"{q}: KL from float <= 1/2 of {r}'s", kl(q) <= 0.5 * kl(r),
                       f"{kl(q):.5f} vs {kl(r):.5f} (ratio {kl(q) / kl(r):.2f})"))
    for n in ("rtn w8 (int8 kernel)", "rtn w8 (dequant)", "gptq w8", "llm.int8"):
        checks.append((f"{n} loses < 1% perplexity", abs(loss(n)) < 0.01, f"{loss(n):+.3%}"))
    for table_rows, where in ((rows, "trained model"), (speed_rows, f"d_model {sp['d_model']} model")):
        s = {r["name"]: r for r in table_rows}
        checks.append((f"int8 weight-only decode >= float32 ({where})",
                       s["rtn w8 (int8 kernel)"]["decode_tokens_per_s"] >= s["float32"]["decode_tokens_per_s"],
                       f"{s['rtn w8 (int8 kernel)']['speed_ratio']:.2f}×"))
    worst = max(rows[1:], key=lambda r: r["ratio_to_ideal"])
    checks.append(("stored weight bytes within 5% of ideal (every variant)", worst["ratio_to_ideal"] <= 1.05,
                   f"worst {worst['name']}: {worst['ratio_to_ideal']:.3f}"))

    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("bench_quant" + ("_quick" if a.quick else ""))
    md = [f"# Quantization on a byte-level LLaMA trained on tinyshakespeare\n",
          f"Model: {info['params']:,} parameters (d_model {hp['d_model']}, {hp['n_layers']} layers, d_ff {hp['d_ff']}), "
          f"{hp['steps']} steps (seed 0), final training loss {info['final_loss']:.3f}. Calibration: {a.n_calib} windows "
          f"of {L} tokens from the training text; perplexity on {windows} held-out windows of {L} tokens. "
          f"Decode: greedy, batch 1, {meas['new_tokens']} new tokens. {torch.get_num_threads()} torch threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}.\n",
          table(rows), "\n## Decode speed on a larger random-weight model\n",
          f"d_model {sp['d_model']}, {sp['n_layers']} layers, d_ff {sp['d_ff']}: "
          f"{speed_rows[0]['linear_bytes'] / 2**20:.0f} MiB of float32 linear weights.\n",
          table(speed_rows), "\n## Targets\n", "| target | result | value |", "|---|---|---|"]
    md += [f"| {n} | {'PASS' if ok else 'FAIL'} | {v} |" for n, ok, v in checks]
    text = "\n".join(md) + "\n"
    print(text)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"train": info, "rows": rows, "speed_rows": speed_rows,
                                                     "checks": [{"target": n, "pass": ok, "value": v} for n, ok, v in checks],
                                                     "torch": torch.__version__, "threads": torch.get_num_threads()},
                                                    indent=2) + "\n")
    figure(rows, stem.with_suffix(".png"), f"byte-level LLaMA ({info['params'] / 1e6:.1f}M) on tinyshakespeare: "
                                           "original vs quantized")
    return 0


if __name__ == "__main__":
    sys.exit(main())
