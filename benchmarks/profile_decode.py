"""Where a batch-1 decode token's time goes in lmzoo: the matrix products against everything else.

Builds the random LLaMA of ``bench_decode.py`` (same sizes and seed), runs ``lmzoo.generate`` on
``fuse_for_decode``'s layout under ``torch.profiler``, and takes the difference between generating
n + 1 tokens and 1 token, so the prompt is excluded. Each op's self time per token is grouped into the
matrix products (``aten::mm``/``addmm``/``linear`` and the int8/int4 kernels) and the other ops; what the
ops do not account for (wall time minus their sum) is Python and dispatch between them. The profiler adds
overhead of its own, so the un-profiled rate is measured too (bench_decode's method) and printed beside it.

    python benchmarks/profile_decode.py                       # 31m model, fp32 and int4, 2 threads
    python benchmarks/profile_decode.py --model 150m --formats fp32,int8,int4

Writes benchmarks/results/profile_decode.md (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_weight_int8pack_mm",
              "aten::_weight_int4pack_mm_for_cpu"}


def _bench_decode():
    spec = importlib.util.spec_from_file_location("bench_decode", HERE / "bench_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def profile(model_dir: str, fmt: str, prompt: list[int], n: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import lmzoo
    from lmzoo.generate.fastpath import fuse_for_decode

    model = lmzoo.load(model_dir)
    if fmt in ("int8", "int4"):
        with contextlib.redirect_stderr(io.StringIO()):
            model = lmzoo.quantize(model, "rtn", bits=8 if fmt == "int8" else 4, group_size=None if fmt == "int8" else 32)
    fuse_for_decode(model)
    ids = torch.tensor([prompt])

    def gen(k):
        with torch.inference_mode():
            lmzoo.generate(model, ids, max_new_tokens=k, pad_token_id=0)

    def timed(k):
        t0 = time.perf_counter()
        gen(k)
        return time.perf_counter() - t0

    gen(1), gen(n + 1)
    plain = min(timed(n + 1) - timed(1) for _ in range(2)) / n

    def measure(k):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            gen(k)
            wall = time.perf_counter() - t0
        ops: dict[str, float] = {}
        for e in prof.key_averages():
            ops[e.key] = ops.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
        return wall, ops

    w1, o1 = measure(1)
    wn, on = measure(n + 1)
    per = {k: (on.get(k, 0.0) - o1.get(k, 0.0)) / n for k in on}
    per = {k: v for k, v in per.items() if v > 0}
    matmul = sum(v for k, v in per.items() if k in MATMUL_OPS)
    ops_total = sum(per.values())
    wall = (wn - w1) / n
    return {"format": fmt, "plain_ms": 1e3 * plain, "profiled_ms": 1e3 * wall, "matmul_ms": 1e3 * matmul,
            "other_ops_ms": 1e3 * (ops_total - matmul), "python_ms": 1e3 * (wall - ops_total),
            "top": sorted(per.items(), key=lambda kv: -kv[1])[:10]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="31m")
    p.add_argument("--formats", default="fp32,int4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    bd = _bench_decode()
    if args.model not in bd.MODELS:
        print(f"profile_decode: unknown model {args.model!r}; choose from {', '.join(bd.MODELS)}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    vocab = bd.MODELS[args.model][0]
    prompt = [(7 * i + 3) % vocab for i in range(32)]
    with tempfile.TemporaryDirectory(prefix="profile_decode_") as tmp:
        info = bd.build(args.model, Path(tmp), ggufs=())
        rows = [profile(info["model_dir"], f.strip(), prompt, args.new_tokens) for f in args.formats.split(",")]
    lines = [f"# profile_decode: where a batch-1 decode token's time goes (lmzoo, {args.model}, "
             f"{info['n_params'] / 1e6:.1f}M parameters, {args.threads} threads, CPU {bd._cpu_name()})", "",
             "| format | ms/token (no profiler) | ms/token (profiled) | matrix products | other ops | Python + dispatch |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        w = r["profiled_ms"]
        lines.append(f"| {r['format']} | {r['plain_ms']:.2f} | {w:.2f} | {r['matmul_ms']:.2f} ({100 * r['matmul_ms'] / w:.0f}%) | "
                     f"{r['other_ops_ms']:.2f} ({100 * r['other_ops_ms'] / w:.0f}%) | "
                     f"{r['python_ms']:.2f} ({100 * r['python_ms'] / w:.0f}%) |")
    for r in rows:
        lines += ["", f"Top ops per token, {r['format']} (ms): " +
                  ", ".join(f"`{k}` {1e3 * v:.3f}" for k, v in r["top"])]
    md = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_decode.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
