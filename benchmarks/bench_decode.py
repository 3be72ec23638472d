"""Batch-1 decode: lmzoo, transformers and llama.cpp side by side on the same weights, against the roofline.

The parent builds a random ``transformers.LlamaForCausalLM`` (sizes below), trains a byte-level BPE
tokenizer for it (llama.cpp will not load a GGUF file without one), saves both, and exports the same
weights to GGUF with ``lmzoo export gguf`` (``lmzoo/interop/gguf.py``: llama.cpp's tensor names and
Q/K row permutation; a wrong permutation shows up as different ids below). Then one fresh process
per (engine, format, round), rounds alternating the order:

  lmzoo         ``lmzoo.generate`` on ``fuse_for_decode``'s layout (what ``lmzoo generate``/``chat``/
                ``serve`` run): fp32; bf16; int8 = RTN 8-bit per channel; int4 = RTN 4-bit groups of 32
                (both on torch's weight-only kernels, lmzoo/quant/kernels.py)
  lmzoo compiled  the same with ``--compile`` (``lmzoo/generate/compiled.py``: ``torch.compile`` of the decode
                step on a static KV cache; compile time is spent in the warm-up and reported apart)
  transformers  ``model.generate`` (sdpa): fp32; bf16
  llama.cpp     ``llama_cpp`` (lmzoo/interop/llamacpp.py, its own process): F32, F16, Q8_0, Q4_0

Decode rate = new tokens / time, from generating ``new_tokens + 1`` minus generating 1 token after the
same prompt (prefill and the first token excluded, as llama.cpp's timing excludes its prompt). Bytes per
token = the bytes of every matrix a decode step reads (all linear weights and the LM head; one embedding
row is negligible) in that format, so bytes/token × tokens/s is the weight bandwidth achieved. The
roofline is the machine's copy bandwidth measured in the same run (a 512 MB float32 ``copy_``, read +
written bytes over time, the threads used), divided by bytes per token: the rate a decoder that only
streams its weights once per token could reach. Greedy ids of lmzoo fp32, transformers fp32 and
llama.cpp F32 are compared.

    python benchmarks/bench_decode.py                 # the 30.9M and ~150M models, a few minutes
    python benchmarks/bench_decode.py --models 31m    # one of them
    python benchmarks/bench_decode.py --quick         # tiny sizes, well under a minute (the test)

Writes benchmarks/results/bench_decode.{md,json,png} (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {  # name: (vocab, d_model, layers, heads, kv heads, d_ff)
    "31m": (8192, 512, 8, 8, 2, 1408),
    "150m": (8192, 1024, 12, 16, 4, 2816),
    "quick": (512, 64, 2, 4, 2, 128),
}
RUNS = [("lmzoo", "fp32"), ("lmzoo", "bf16"), ("lmzoo", "int8"), ("lmzoo", "int4"),
        ("lmzoo compiled", "fp32"), ("lmzoo compiled", "bf16"), ("lmzoo compiled", "int8"), ("lmzoo compiled", "int4"),
        ("transformers", "fp32"), ("transformers", "bf16"),
        ("llama.cpp", "F32"), ("llama.cpp", "F16"), ("llama.cpp", "Q8_0"), ("llama.cpp", "Q4_0")]
QUICK_RUNS = [("lmzoo", "fp32"), ("lmzoo", "int8"), ("transformers", "fp32"), ("llama.cpp", "F32"), ("llama.cpp", "Q8_0")]
BITS = {"fp32": 32, "F32": 32, "bf16": 16, "F16": 16, "Q8_0": 8.5, "Q4_0": 4.5,
        "int8": 8 + 16 / 512, "int4": 4 + (16 + 4) / 32}  # per weight, scales included (int8: one fp16 per row of 512)
SAME_BYTES = {"fp32": "F32", "bf16": "F16", "int8": "Q8_0", "int4": "Q4_0"}  # lmzoo format -> llama.cpp's


# -- workers (each in its own process) ------------------------------------------------------------------
def _timed_decode(gen, new_tokens: int, repeats: int) -> tuple[float, list, float]:
    t0 = time.perf_counter()
    gen(1), gen(new_tokens + 1)  # warm up (and compile, for lmzoo compiled)
    warm = time.perf_counter() - t0
    rates, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        gen(1)
        t1 = time.perf_counter()
        out = gen(new_tokens + 1)
        t2 = time.perf_counter()
        rates.append(new_tokens / max((t2 - t1) - (t1 - t0), 1e-9))
    return statistics.median(rates), out, warm


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    ids = torch.tensor([spec["prompt"]])
    n = spec["new_tokens"]
    if spec["engine"] == "copy":
        src = torch.ones(spec["copy_mib"] * 2**20 // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        return {"copy_gb_s": 2 * src.numel() * 4 / min(times) / 1e9}
    if spec["engine"] == "llama.cpp":
        from lmzoo.interop import llamacpp

        path = spec["gguf"][spec["fmt"]]
        rates = [llamacpp.decode_speed(path, spec["prompt"], n, n_threads=spec["threads"], n_ctx=512)["tokens_per_s"]
                 for _ in range(spec["repeats"])]
        out = llamacpp.greedy(path, spec["prompt"], n, n_threads=spec["threads"]) if spec["fmt"] == "F32" else None
        return {"tokens_per_s": statistics.median(rates), "ids": out}
    dtype = torch.bfloat16 if spec["fmt"] == "bf16" else torch.float32
    if spec["engine"].startswith("lmzoo"):
        import lmzoo
        from lmzoo.generate.compiled import compile_for_decode
        from lmzoo.generate.fastpath import fuse_for_decode

        model = lmzoo.load(spec["model_dir"], dtype=dtype)
        if spec["fmt"] in ("int8", "int4"):
            import contextlib
            import io

            with contextlib.redirect_stderr(io.StringIO()):
                model = lmzoo.quantize(model, "rtn", bits=8 if spec["fmt"] == "int8" else 4,
                                       group_size=None if spec["fmt"] == "int8" else 32)
        changed = fuse_for_decode(model)
        if spec["engine"] == "lmzoo compiled" and not compile_for_decode(model):
            raise SystemExit("torch.compile unavailable (no C++ compiler)")

        def gen(k):
            return lmzoo.generate(model, ids, max_new_tokens=k, pad_token_id=0)
    else:
        import transformers

        model = transformers.LlamaForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype,
                                                              attn_implementation="sdpa").eval()
        changed = None

        def gen(k):
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                                  do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        rate, out, warm = _timed_decode(gen, n, spec["repeats"])
    return {"tokens_per_s": rate, "ids": out[0, ids.shape[1]:ids.shape[1] + n].tolist(), "fused": changed,
            "warmup_s": warm}


# -- parent ---------------------------------------------------------------------------------------------
def _child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _tokenizer(vocab: int):
    """A byte-level BPE tokenizer of at most ``vocab`` tokens (GGUF files carry one; llama.cpp needs it)."""
    import lmzoo
    from lmzoo.data.builtin import builtin_corpus

    corpus = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora" / "en" / "tinyshakespeare.txt"
    texts = corpus.read_text(encoding="utf-8").splitlines() if corpus.exists() else builtin_corpus()
    return lmzoo.train_tokenizer("bpe", texts=texts, vocab_size=vocab, special_tokens=["<|endoftext|>"])


def build(name: str, root: Path, ggufs: tuple[str, ...] | None = None) -> dict:
    """Save the random model ``name`` under ``root`` and export it to GGUF in ``ggufs`` (default: the
    formats the run compares; none: no tokenizer is trained either)."""
    import torch
    import transformers

    import lmzoo
    from lmzoo.interop.gguf import export_gguf

    vocab, d, L, H, Hkv, ff = MODELS[name]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=L,
                                   num_attention_heads=H, num_key_value_heads=Hkv, max_position_embeddings=512,
                                   tie_word_embeddings=False, initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(cfg)
    model_dir = root / name
    hf.save_pretrained(model_dir)
    n_params = sum(p.numel() for p in hf.parameters())
    matrix_weights = n_params - vocab * d - d * (2 * L + 1)  # minus the embedding and the norms
    del hf
    if ggufs is None:
        ggufs = ("F32", "Q8_0") if name == "quick" else ("F32", "F16", "Q8_0", "Q4_0")
    tok = _tokenizer(vocab) if ggufs else None
    model = lmzoo.load(model_dir)
    files = {}
    for fmt in ggufs:
        files[fmt] = str(root / f"{name}-{fmt}.gguf")
        export_gguf(model, tok, files[fmt], fmt.lower())
    return {"model_dir": str(model_dir), "gguf": files, "n_params": n_params, "matrix_weights": matrix_weights,
            "sizes": dict(zip(("vocab", "d_model", "layers", "heads", "kv_heads", "d_ff"), MODELS[name]))}


def run_model(name: str, args, root: Path, llama_ok: bool) -> dict:
    info = build(name, root)
    vocab = MODELS[name][0]
    prompt = [(7 * i + 3) % vocab for i in range(args.prompt_len)]
    base = {"model_dir": info["model_dir"], "gguf": info["gguf"], "prompt": prompt, "new_tokens": args.new_tokens,
            "threads": args.threads, "repeats": args.repeats}
    runs = [r for r in (QUICK_RUNS if name == "quick" else RUNS) if r[0] != "llama.cpp" or llama_ok]
    results: dict[str, list] = {}
    for rnd in range(args.rounds):
        for engine, fmt in (runs if rnd % 2 == 0 else runs[::-1]):
            print(f"  {name} round {rnd + 1}: {engine} {fmt} ...", file=sys.stderr, flush=True)
            results.setdefault(f"{engine} {fmt}", []).append(_child({**base, "engine": engine, "fmt": fmt}))
    copy = _child({**base, "engine": "copy", "copy_mib": args.copy_mib})
    rows = []
    for engine, fmt in runs:
        got = results[f"{engine} {fmt}"]
        errors = [r["error"] for r in got if "error" in r]
        ok = [r for r in got if "error" not in r]
        bpt = info["matrix_weights"] * BITS[fmt] / 8
        tps = statistics.median([r["tokens_per_s"] for r in ok]) if ok else None
        rows.append({"engine": engine, "format": fmt, "tokens_per_s": tps, "bytes_per_token": bpt,
                     "warmup_s": statistics.median([r["warmup_s"] for r in ok]) if ok and "warmup_s" in ok[0] else None,
                     "gb_s": tps * bpt / 1e9 if tps else None, "ids": ok[0].get("ids") if ok else None,
                     "error": errors[0] if errors and not ok else None})
    return {"name": name, **info, "copy_gb_s": copy.get("copy_gb_s"), "rows": rows}


def _row(res, engine, fmt):
    return next((r for r in res["rows"] if r["engine"] == engine and r["format"] == fmt), None)


def checks(res) -> list[str]:
    out = []
    ref = _row(res, "lmzoo", "fp32")
    for engine, fmt in (("lmzoo compiled", "fp32"), ("transformers", "fp32"), ("llama.cpp", "F32")):
        other = _row(res, engine, fmt)
        if other is None or not other["ids"] or not ref["ids"]:
            continue
        same = other["ids"] == ref["ids"]
        first = next((i for i, (a, b) in enumerate(zip(ref["ids"], other["ids"])) if a != b), None)
        out.append(f"{res['name']}: lmzoo fp32 and {engine} {fmt} greedy ids " +
                   (f"agree ({len(ref['ids'])} tokens)" if same else f"DIFFER from token {first}"))
    return out


def markdown(all_res: list[dict], meta: dict) -> str:
    lines = ["# bench_decode: batch-1 decode, lmzoo vs transformers vs llama.cpp", "",
             f"CPU: {meta['cpu']}; {meta['threads']} threads; prompt {meta['prompt_len']} tokens, "
             f"{meta['new_tokens']} new tokens (greedy), decode only; median of {meta['rounds']} processes × "
             f"{meta['repeats']} calls. torch {meta['torch']}, transformers {meta['transformers']}, "
             f"llama.cpp {meta['llama_cpp']}.", ""]
    for res in all_res:
        s = res["sizes"]
        lines += [f"## {res['name']}: {res['n_params'] / 1e6:.1f}M parameters (d {s['d_model']}, {s['layers']} layers, "
                  f"{s['heads']}/{s['kv_heads']} heads, d_ff {s['d_ff']}, vocab {s['vocab']})", "",
                  f"Copy bandwidth (read + write) measured in the same run: **{res['copy_gb_s']:.1f} GB/s**.", "",
                  "| engine | format | bytes/token (MB) | tokens/s | weight GB/s | % of roofline | lmzoo / llama.cpp (same bytes) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            if r["tokens_per_s"] is None:
                lines.append(f"| {r['engine']} | {r['format']} | {r['bytes_per_token'] / 1e6:.1f} | failed: {r['error']} | | | |")
                continue
            roof = res["copy_gb_s"] * 1e9 / r["bytes_per_token"]
            ratio = ""
            if r["engine"].startswith("lmzoo"):
                other = _row(res, "llama.cpp", SAME_BYTES[r["format"]])
                if other and other["tokens_per_s"]:
                    ratio = f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}×"
            lines.append(f"| {r['engine']} | {r['format']} | {r['bytes_per_token'] / 1e6:.1f} | {r['tokens_per_s']:.1f} | "
                         f"{r['gb_s']:.1f} | {100 * r['tokens_per_s'] / roof:.0f}% | {ratio} |")
        warm = [f"{r['format']} {r['warmup_s']:.0f} s" for r in res["rows"]
                if r["engine"] == "lmzoo compiled" and r.get("warmup_s") is not None]
        lines += [""] + [f"- {c}" for c in checks(res)]
        lines += [f"- lmzoo compiled: first two generate calls (compile included): {', '.join(warm)}"] if warm else []
        lines += [""]
    lines += ["Bytes per token count the matrices a decode step reads (linear weights and the LM head) at the "
              "format's bits per weight, scales included (Q8_0 8.5, Q4_0 4.5, lmzoo int4 with groups of 32 4.625). "
              "% of roofline: tokens/s against copy bandwidth / bytes per token.", ""]
    return "\n".join(lines)


def figure(all_res: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_res), figsize=(6 * len(all_res), 4.5), squeeze=False)
    markers = {"lmzoo": "o", "lmzoo compiled": "D", "transformers": "s", "llama.cpp": "^"}
    for ax, res in zip(axes[0], all_res):
        xs = [r["bytes_per_token"] / 1e6 for r in res["rows"]]
        lo, hi = min(xs) * 0.7, max(xs) * 1.4
        grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
        ax.plot(grid, [res["copy_gb_s"] * 1e3 / x for x in grid], "k--", lw=1,
                label=f"roofline: copy bandwidth {res['copy_gb_s']:.0f} GB/s / bytes")
        for engine, m in markers.items():
            pts = [(r["bytes_per_token"] / 1e6, r["tokens_per_s"], r["format"]) for r in res["rows"]
                   if r["engine"] == engine and r["tokens_per_s"]]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=m, s=50, label=engine)
                for x, y, f in pts:
                    ax.annotate(f, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("weight bytes read per token (MB)")
        ax.set_ylabel("decode tokens/s (batch 1)")
        ax.set_title(f"{res['name']}: {res['n_params'] / 1e6:.0f}M parameters")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="31m,150m", help="comma-separated: 31m, 150m")
    p.add_argument("--quick", action="store_true", help="one tiny model, short runs (what the test runs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--copy-mib", type=int, default=512)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.models, args.new_tokens, args.repeats, args.rounds, args.copy_mib = "quick", 8, 1, 1, 64
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        print(f"bench_decode: unknown model {unknown or names}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    from lmzoo.interop import llamacpp

    llama_ok, llama_version = llamacpp.available()
    if not llama_ok:
        print(f"bench_decode: skipping llama.cpp: {llama_version}", file=sys.stderr)
    import torch
    import transformers

    meta = {"cpu": _cpu_name(), "threads": args.threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "rounds": args.rounds, "repeats": args.repeats, "torch": torch.__version__,
            "transformers": transformers.__version__, "llama_cpp": llama_version if llama_ok else "not run",
            "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        all_res = [run_model(n, args, Path(tmp), llama_ok) for n in names]
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(all_res, meta)
    (args.out / "bench_decode.md").write_text(md, encoding="utf-8")
    (args.out / "bench_decode.json").write_text(json.dumps({"meta": meta, "models": all_res}, indent=1), encoding="utf-8")
    figure(all_res, args.out / "bench_decode.png")
    print(md)
    bad = [c for res in all_res for c in checks(res) if "DIFFER" in c]
    return 1 if bad else 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
