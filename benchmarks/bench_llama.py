"""lmzoo vs transformers on one tiny LLaMA, side by side in one run: decode and training throughput, memory.

The parent process builds a random ``transformers.LlamaForCausalLM``, saves it, and then starts one
fresh subprocess per (measurement, library, round): the lmzoo side ``lmzoo.load``s the saved
directory and never imports transformers, the transformers side uses ``from_pretrained``. Both hold
the same weights, and each process's memory belongs to one measurement only.

Measurements (``--warmup`` untimed calls, then ``--repeats`` timed calls per process; ``--rounds``
processes per side, alternating which side goes first; the median over all timed calls is reported):
  decode b=1, b=8   greedy ``lmzoo.generate`` (on ``fastpath.fuse_for_decode``'s layout, as ``lmzoo generate``
                    runs) vs ``model.generate``: (batch · new tokens) / wall time of the whole call
                    (prefill included); the generated ids of both sides are compared.
  train             forward + backward + ``torch.optim.AdamW`` step on batch × seq tokens, labels = ids.
                    lmzoo's step takes ``--optimizer-impl`` / ``--compile`` / ``--chunked-ce`` (the trainer's
                    ``optimizer_impl``, ``compile`` and ``loss_chunk``); transformers' is AdamW's default.
                    bf16: autocast over float32 weights (``--bf16-train weights``: bf16 weights instead).
Roofline: each train process measures the GEMM rate of its dtype right after its timed steps
(``_gemm_rates``: a linear layer's three training GEMMs at the MLP's shape) and reports the step's
achieved GFLOP/s (``train_flops``: 6 · GEMM weights · tokens + PaLM's attention term) and its
share of that rate. ``--train-only``: the train step alone, lmzoo once per ``TRAIN_VARIANTS``
entry (one option changed at a time), written to bench_llama_train*.md/.json.
Memory: peak RSS while the measurement runs (the kernel's high-water mark, reset after loading), and
that peak minus the RSS just before the first warmup call (what the measurement itself added).
A process during whose timed calls other programs took more than ``--busy-limit`` of the CPU is rerun.

    python benchmarks/bench_llama.py              # defaults, a few minutes on 2 cores
    python benchmarks/bench_llama.py --dtype bf16
    python benchmarks/bench_llama.py --quick      # tiny sizes, well under a minute (what the test runs)
    python benchmarks/bench_llama.py --train-only [--dtype bf16]   # the step's variants vs the roofline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIDES = ("lmzoo", "transformers")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}

# name: (default, quick, help). Every size is a CLI option; --quick swaps the defaults.
SIZES = {
    "vocab": (8192, 256, "vocabulary size"),
    "d_model": (512, 64, "hidden size"),
    "n_layers": (8, 2, "decoder layers"),
    "n_heads": (8, 4, "query heads"),
    "n_kv_heads": (2, 2, "key/value heads (GQA)"),
    "d_ff": (1408, 128, "SwiGLU inner size"),
    "prompt_len": (32, 8, "decode: prompt tokens"),
    "new_tokens": (64, 8, "decode: generated tokens"),
    "train_batch": (8, 2, "train: batch size"),
    "train_seq": (256, 32, "train: sequence length"),
    "warmup": (1, 1, "untimed calls before timing"),
    "repeats": (3, 2, "timed calls per process; the median over all is reported"),
    "rounds": (2, 1, "processes per side and measurement, alternating which side goes first"),
}
DECODE_BATCHES = (1, 8)


# --------------------------------------------------------------------------------------------
# worker: one library, one measurement, in its own process
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat; steal counts as busy)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_snapshot() -> tuple[float | None, float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return _busy_cpu_s(), own.ru_utime + own.ru_stime, time.perf_counter()


def _others_share(before, after) -> float | None:
    """The share of all CPUs' time that other processes used between two snapshots."""
    (busy0, own0, wall0), (busy1, own1, wall1) = before, after
    if busy0 is None or busy1 is None or wall1 - wall0 < 0.25:  # /proc/stat counts in 10 ms ticks
        return None
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * (os.cpu_count() or 1))


def _peak_kib(reset_ok: bool) -> tuple[int, str]:
    if _status_kib("VmHWM") is None:  # no /proc: includes loading, and on Linux the parent's RSS at fork
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss (whole process)"
    return _status_kib("VmHWM"), "VmHWM reset after load" if reset_ok else "VmHWM (whole process)"


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS (kernel >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _load(side: str, model_dir: str, dtype):
    if side == "lmzoo":
        import lmzoo

        return lmzoo.load(model_dir, dtype=dtype)
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").eval()


def _decode_call(side, model, ids, new_tokens):
    mask = ids.new_ones(ids.shape)
    if side == "lmzoo":
        import lmzoo
        from lmzoo.generate.fastpath import fuse_for_decode

        fuse_for_decode(model)  # what lmzoo generate / chat / serve run: fused, GEMV-friendly weights
        return lambda: lmzoo.generate(model, ids, mask, max_new_tokens=new_tokens, pad_token_id=0)
    # The saved config has no eos token, so both sides generate exactly new_tokens tokens.
    return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0)


def _train_call(side, model, ids, losses, spec):
    """One training step; the lmzoo side takes the benchmark's step options (AdamW implementation,
    torch.compile, chunked CE), the transformers side is ``torch.optim.AdamW``'s default."""
    import contextlib

    import torch

    model.train()
    opt_kwargs, loss_kwargs = {}, {}
    if side == "lmzoo":
        from lmzoo.train.optim import _impl_kwargs  # what TrainConfig.optimizer_impl picks

        opt_kwargs = _impl_kwargs(spec.get("optimizer_impl", "loop"), torch.device("cpu"))
        if spec.get("compile"):
            model.compile()  # as Trainer does for compile: true (parameter names unchanged)
        if spec.get("chunked_ce"):
            loss_kwargs = {"loss_chunk": spec["chunked_ce"]}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **opt_kwargs)
    autocast = spec.get("autocast") and spec["dtype"] == "bf16"  # bf16 weights otherwise (or fp32)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            out = model(ids, labels=ids, **loss_kwargs) if side == "lmzoo" else model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())

    return step


def _gemm_rates(spec: dict) -> dict:
    """The machine's GEMM rate in the step's dtype, GFLOP/s (median of ``repeats`` after ``warmup``):
    ``linear``: a linear layer's three training GEMMs at the MLP's shape, M = tokens, K = d_model,
    N = d_ff: forward x Wᵀ (M×K · K×N), grad-input dY W (M×N · N×K) and grad-weight dYᵀ x (N×M · M×K),
    3 · 2MKN flops over their summed times (the layouts differ in speed; a step runs all three);
    ``square``: one n×n · n×n matmul, n = 2 · d_model."""
    import torch

    dt = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    M, K, N = spec["tokens"], spec["d_model"], spec["d_ff"]
    x, w, dy = (torch.randn(*s, generator=g).to(dt) for s in ((M, K), (N, K), (M, N)))
    n = 2 * K
    a, b = (torch.randn(n, n, generator=g).to(dt) for _ in range(2))

    def median_s(f):
        for _ in range(spec["warmup"]):
            f()
        ts = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    parts = {"forward x·Wᵀ": lambda: x @ w.t(), "grad-input dY·W": lambda: dy @ w,
             "grad-weight dYᵀ·x": lambda: dy.t() @ x}
    before = _cpu_snapshot()
    times = {k: median_s(f) for k, f in parts.items()}
    sq = median_s(lambda: a @ b)
    return {"linear_gflops": 3 * 2 * M * K * N / sum(times.values()) / 1e9,
            "per_layout_gflops": {k: 2 * M * K * N / t / 1e9 for k, t in times.items()},
            "square_n": n, "square_gflops": 2 * n ** 3 / sq / 1e9, "shape_mkn": [M, K, N],
            "others_cpu_share": _others_share(before, _cpu_snapshot())}


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "gemm":
        return _gemm_rates(spec)
    # bf16 training under autocast keeps float32 weights (as lmzoo's and transformers' trainers do)
    autocast = spec["kind"] == "train" and spec["dtype"] == "bf16" and spec.get("autocast")
    dtype = torch.float32 if autocast else getattr(torch, DTYPES[spec["dtype"]])
    model = _load(spec["side"], spec["model_dir"], dtype)
    # VmHWM, not ru_maxrss: after fork + exec, ru_maxrss still reports the parent's RSS.
    load_peak_kib = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Loaders may leave weights memory-mapped from the safetensors file, paged in on first use;
    # read every parameter now so that paging them in is not counted as the measurement's memory.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    g = torch.Generator().manual_seed(1234)
    losses: list[float] = []
    if spec["kind"] == "decode":
        ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["prompt_len"]), generator=g)
        call = _decode_call(spec["side"], model, ids, spec["new_tokens"])
        tokens = spec["batch"] * spec["new_tokens"]
    else:
        ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=g)
        call = _train_call(spec["side"], model, ids, losses, spec)
        tokens = spec["batch"] * spec["seq"]
    base_kib = _status_kib("VmRSS")
    reset_ok = _reset_peak_rss()
    for _ in range(spec["warmup"]):
        out = call()
    times, before = [], _cpu_snapshot()
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    others = _others_share(before, _cpu_snapshot())
    peak_kib, method = _peak_kib(reset_ok)
    res = {"side": spec["side"], "tokens": tokens, "times_s": times, "median_s": statistics.median(times),
           "tokens_per_s": tokens / statistics.median(times), "peak_rss_mib": peak_kib / 1024,
           "delta_rss_mib": (peak_kib - base_kib) / 1024 if base_kib is not None else None,
           "load_peak_rss_mib": load_peak_kib / 1024, "memory_method": method, "others_cpu_share": others,
           "n_params": sum(p.numel() for p in model.parameters())}
    if spec["kind"] == "decode":
        res["ids"] = out.tolist()
    else:
        res["losses"] = losses
        # The GEMM rate right after the timed steps in the same process (and threads): contention from
        # other programs drifts over minutes, so the step is held against the rate measured beside it.
        res["gemm"] = _gemm_rates(dict(spec, tokens=tokens, warmup=1, repeats=3))
        res["gflops"] = spec["flops"] / res["median_s"] / 1e9
        res["pct_of_gemm_rate"] = 100 * res["gflops"] / res["gemm"]["linear_gflops"]
    return res


# --------------------------------------------------------------------------------------------
# parent: build the shared checkpoint, run the workers, compare and report
# --------------------------------------------------------------------------------------------


def make_checkpoint(a, directory: Path, max_positions: int | None = None) -> int:
    """A random transformers LLaMA of ``a``'s sizes saved to ``directory`` (both sides load it); its parameters."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.d_model, intermediate_size=a.d_ff, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, rms_norm_eps=1e-5,
        max_position_embeddings=max_positions or max(a.prompt_len + a.new_tokens, a.train_seq),
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(a.seed)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(directory, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def run_worker(spec: dict, scratch: Path, tries: int, busy_limit: float) -> dict:
    """Run the worker; while other processes took more than ``busy_limit`` of the CPU, try again."""
    attempts = []
    for _ in range(tries):
        attempts.append(run_worker_once(spec, scratch))
        if (attempts[-1]["others_cpu_share"] or 0.0) <= busy_limit:
            break
    best = min(attempts, key=lambda r: r["others_cpu_share"] or 0.0)
    best["others_cpu_share_per_try"] = [r["others_cpu_share"] for r in attempts]
    return best


def run_worker_once(spec: dict, scratch: Path) -> dict:
    path = scratch / f"{spec['kind']}-{spec.get('batch')}-{spec.get('side')}-{spec.get('variant', '')}.json"
    spec = dict(spec, result=str(path))
    path_var = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))  # lmzoo importable
    env = dict(os.environ, PYTHONPATH=path_var, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec.get('side')} {spec['kind']} {spec.get('variant', '')} failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(path.read_text())


def compare_ids(a: list, b: list) -> dict:
    mism = [(r, t) for r, (x, y) in enumerate(zip(a, b)) for t, (u, v) in enumerate(zip(x, y)) if u != v]
    same_shape = len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b))
    return {"agree": same_shape and not mism, "shape": [len(a), len(a[0]) if a else 0],
            "mismatched_tokens": len(mism), "first_mismatch": list(mism[0]) if mism else None}


def measure(label: str, specs: dict[str, dict], a, scratch: Path) -> tuple[dict, dict]:
    """``a.rounds`` rounds of one worker per contender (name -> spec), the order alternating to cancel
    drift; merged per contender. The check compares lmzoo's ids or losses with transformers'."""
    rounds = {name: [] for name in specs}
    for r in range(a.rounds):
        for name in list(specs) if r % 2 == 0 else list(specs)[::-1]:
            print(f"  {label:<18} {name:<22} round {r + 1} ...", end="", flush=True, file=sys.stderr)
            rounds[name].append(run_worker(specs[name], scratch, a.tries, a.busy_limit))
            res = rounds[name][-1]
            gemm = f", GEMM {res['gemm']['linear_gflops']:.1f} GFLOP/s" if "gemm" in res else ""
            print(f" {res['tokens_per_s']:10.1f} tokens/s{gemm}", file=sys.stderr)
    if next(iter(specs.values()))["kind"] == "decode":
        per_round = [compare_ids(x.pop("ids"), y.pop("ids")) for x, y in zip(rounds["lmzoo"], rounds["transformers"])]
        check = next((c for c in per_round if not c["agree"]), per_round[0])
    else:
        ref = rounds["transformers"][0]["losses"]
        check = {name: loss_check(rs[0]["losses"], ref) for name, rs in rounds.items() if name != "transformers"}
        check = check["lmzoo"] if list(check) == ["lmzoo"] else check
    return {name: merge(rs) for name, rs in rounds.items()}, check


def loss_check(lz: list[float], hf: list[float]) -> dict:
    return {"first_loss": [lz[0], hf[0]], "max_abs_loss_diff": max(abs(x - y) for x, y in zip(lz, hf))}


def merge_gemm(rs: list[dict]) -> dict:
    """GEMM rates of several processes -> their median (and every process's)."""
    out = dict(rs[0], per_layout_gflops={k: statistics.median(r["per_layout_gflops"][k] for r in rs)
                                         for k in rs[0]["per_layout_gflops"]})
    for k in ("linear_gflops", "square_gflops"):
        out[k] = statistics.median(r[k] for r in rs)
        out[k + "_per_round"] = [r[k] for r in rs]
    shares = [r["others_cpu_share"] for r in rs if r["others_cpu_share"] is not None]
    out["others_cpu_share"] = max(shares, default=None)
    return out


def train_flops(a) -> dict:
    """FLOPs of one training step (forward + backward; AdamW's elementwise update is not counted):

        6 · N_gemm · tokens + 12 · n_layers · seq · d_attn · tokens

    N_gemm = the weights that multiply activations in a GEMM: per layer q, k, v, o
    (d · (2 · d_attn + 2 · d_kv)) and the SwiGLU MLP (3 · d · d_ff), plus the LM head (V · d);
    the embedding (a lookup) and the norm gains are left out. 6 = 2 (multiply-add) × 3 (forward,
    grad-input, grad-weight). The attention term is PaLM's (Chowdhery et al. 2022, app. B):
    QKᵀ and AV, 2 · 2 · seq · d_attn per token and layer forward, ×3 with backward, counted as if
    unmasked (causal kernels may skip the masked half)."""
    d_head = a.d_model // a.n_heads
    d_attn, d_kv = a.n_heads * d_head, a.n_kv_heads * d_head
    n_gemm = a.n_layers * (a.d_model * (2 * d_attn + 2 * d_kv) + 3 * a.d_model * a.d_ff) + a.vocab * a.d_model
    tokens = a.train_batch * a.train_seq
    attn = 12 * a.n_layers * a.train_seq * d_attn * tokens
    return {"n_gemm_params": n_gemm, "tokens": tokens, "gemm_flops": 6 * n_gemm * tokens, "attention_flops": attn,
            "flops": 6 * n_gemm * tokens + attn}


def merge(rs: list[dict]) -> dict:
    """Rounds of one side -> one result: the median over every timed call, the largest memory."""
    times = [t for r in rs for t in r["times_s"]]
    out = dict(rs[0], times_s=times, median_s=statistics.median(times),
               tokens_per_s=rs[0]["tokens"] / statistics.median(times), rounds=len(rs))
    for k in ("peak_rss_mib", "delta_rss_mib", "load_peak_rss_mib", "others_cpu_share"):
        vals = [r[k] for r in rs if r[k] is not None]
        out[k] = max(vals) if vals else None
    out["tokens_per_s_per_round"] = [r["tokens_per_s"] for r in rs]
    if "gemm" in rs[0]:  # train: each round against its own process's GEMM rate, then the median
        out["gemm_per_round"] = [r["gemm"] for r in rs]
        out["gflops"] = statistics.median(r["gflops"] for r in rs)
        out["pct_of_gemm_rate"] = statistics.median(r["pct_of_gemm_rate"] for r in rs)
        out["gemm"] = merge_gemm(out["gemm_per_round"])
    out["others_cpu_share_per_try"] = [r["others_cpu_share_per_try"] for r in rs]
    return out


def row(name, unit, better, lz, hf) -> dict:
    return {"name": name, "unit": unit, "better": better, "lmzoo": lz, "transformers": hf,
            "ratio": lz / hf if lz is not None and hf else None}


def run(a) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="bench_llama_"))
    try:
        return _run(a, scratch)
    finally:
        shutil.rmtree(scratch)


# --train-only: the lmzoo step with one option changed at a time (on top of the command line's options)
TRAIN_VARIANTS = {"lmzoo": {}, "lmzoo fused AdamW": {"optimizer_impl": "fused"},
                  "lmzoo foreach AdamW": {"optimizer_impl": "foreach"}, "lmzoo compile": {"compile": True},
                  "lmzoo chunked CE": {"chunked_ce": 1024}}


def _run(a, scratch: Path) -> dict:
    import torch
    import transformers

    import lmzoo

    model_dir = scratch / "hf"
    n_params = make_checkpoint(a, model_dir)
    common = dict(model_dir=str(model_dir), dtype=a.dtype, threads=a.threads, vocab=a.vocab,
                  warmup=a.warmup, repeats=a.repeats)
    train_label = f"train b={a.train_batch}×{a.train_seq}"
    train = dict(common, kind="train", batch=a.train_batch, seq=a.train_seq, autocast=a.bf16_train == "autocast",
                 d_model=a.d_model, d_ff=a.d_ff, flops=train_flops(a)["flops"])
    options = dict(optimizer_impl=a.optimizer_impl, compile=a.compile, chunked_ce=a.chunked_ce)
    variants = TRAIN_VARIANTS if a.train_only else {"lmzoo": {}}
    plan = [] if a.train_only else [
        (f"decode b={b}", {side: dict(common, kind="decode", batch=b, side=side, prompt_len=a.prompt_len,
                                      new_tokens=a.new_tokens) for side in SIDES}) for b in DECODE_BATCHES]
    plan.append((train_label, {"transformers": dict(train, side="transformers"), **{
        name: dict(train, side="lmzoo", variant=str(i), **(options | change))
        for i, (name, change) in enumerate(variants.items())}}))
    runs, rows, checks = {}, [], {}
    for label, specs in plan:
        runs[label], checks[label] = measure(label, specs, a, scratch)
    flops = train_flops(a)  # achieved GFLOP/s and % of the GEMM rate: each worker's, merged in merge()
    gemm = merge_gemm([g for res in runs[train_label].values() for g in res["gemm_per_round"]])
    for label, res in runs.items():
        rows.append(row(f"{label} throughput", "tokens/s", "higher", res["lmzoo"]["tokens_per_s"],
                        res["transformers"]["tokens_per_s"]))
    lz, hf = runs[train_label]["lmzoo"], runs[train_label]["transformers"]
    rows.append(row(f"{train_label} achieved", "GFLOP/s", "higher", lz["gflops"], hf["gflops"]))
    rows.append(row(f"{train_label} of the GEMM rate", "%", "higher", lz["pct_of_gemm_rate"], hf["pct_of_gemm_rate"]))
    for label, res in runs.items():
        lz, hf = res["lmzoo"], res["transformers"]
        rows.append(row(f"{label} peak RSS", "MiB", "lower", lz["peak_rss_mib"], hf["peak_rss_mib"]))
        rows.append(row(f"{label} RSS added", "MiB", "lower", lz["delta_rss_mib"], hf["delta_rss_mib"]))
    sizes = {k: getattr(a, k) for k in SIZES if k != "rounds"}
    return {"benchmark": "bench_llama_train" if a.train_only else "bench_llama", "quick": a.quick, "dtype": a.dtype,
            "bf16_train": a.bf16_train, "train_options": options, "threads": a.threads, "rounds": a.rounds,
            "n_params": n_params, "sizes": sizes, "attn": "sdpa (both)", "train_flops": flops, "gemm": gemm,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "lmzoo": lmzoo.__version__},
            "cpu": cpu_name(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(), "busy_limit": a.busy_limit,
            "max_others_cpu_share": max_others(runs), "rows": rows, "checks": checks, "runs": runs}


def max_others(runs: dict) -> float | None:
    shares = [side["others_cpu_share"] for res in runs.values() for side in res.values()]
    shares = [x for x in shares if x is not None]
    return max(shares) if shares else None


def busy_warning(r: dict) -> str | None:
    if r["max_others_cpu_share"] is not None and r["max_others_cpu_share"] > r["busy_limit"]:
        return (f"WARNING: other processes used up to {100 * r['max_others_cpu_share']:.0f}% of the CPU time "
                "while timing, even after retries: these timings are unreliable; rerun on a quiet machine.")
    return None


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The vector extensions that decide the GEMM kernels (AVX-512 BF16 / AMX: native bf16 dot products)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return [f for f in wanted if f in line.split()]


def _fmt(x, unit) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.1f}" if unit == "MiB" or x >= 100 else f"{x:,.2f}"


def table(r: dict) -> str:
    lines = ["| measurement | unit | better | lmzoo | transformers | lmzoo / transformers |",
             "|---|---|---|---:|---:|---:|"]
    for w in r["rows"]:
        ratio = "n/a" if w["ratio"] is None else f"{w['ratio']:.2f}×"
        lines.append(f"| {w['name']} | {w['unit']} | {w['better']} | {_fmt(w['lmzoo'], w['unit'])} | "
                     f"{_fmt(w['transformers'], w['unit'])} | {ratio} |")
    return "\n".join(lines)


def check_lines(r: dict) -> list[str]:
    out = []
    for label, c in r["checks"].items():
        if "agree" in c:
            shape = "×".join(map(str, c["shape"]))
            verdict = "agree" if c["agree"] else (f"DIFFER at {c['mismatched_tokens']} tokens "
                                                 f"(first at row, position {c['first_mismatch']})")
            out.append(f"{label}: generated ids ({shape}) {verdict}")
        else:
            for name, v in (c.items() if "first_loss" not in c else [("lmzoo", c)]):
                out.append(f"{label}: first loss {name} {v['first_loss'][0]:.6f} vs transformers "
                           f"{v['first_loss'][1]:.6f}; max |Δloss| over all steps {v['max_abs_loss_diff']:.2e}")
    return out


def gemm_line(r: dict) -> str:
    g, f = r["gemm"], r["train_flops"]
    M, K, N = g["shape_mkn"]
    layouts = ", ".join(f"{k} {v:,.1f}" for k, v in g["per_layout_gflops"].items())
    return (f"GEMM rate ({r['dtype']}; each training process measures it right after its timed steps; "
            f"median of {len(g['linear_gflops_per_round'])} processes): "
            f"**{g['linear_gflops']:,.1f} GFLOP/s** for a linear layer's three training GEMMs at "
            f"M×K×N = {M}×{K}×{N} ({layouts}); square {g['square_n']}² matmul {g['square_gflops']:,.1f} GFLOP/s. "
            f"Step FLOPs = 6 · {f['n_gemm_params'] / 1e6:.2f}M GEMM weights · {f['tokens']} tokens + attention "
            f"{f['attention_flops'] / 1e9:.3g} G = {f['flops'] / 1e9:.3g} GFLOP (bench_llama.train_flops).\n")


def _share(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def variant_table(r: dict) -> str:
    """--train-only: every contender's step, against the GEMM rate and transformers' step; the last
    column: the share of the CPUs other programs used while the step / the GEMMs were timed."""
    res = r["runs"][next(k for k in r["runs"] if k.startswith("train"))]
    hf, check = res["transformers"], r["checks"][next(k for k in r["checks"] if k.startswith("train"))]
    lines = ["| step | tokens/s | GFLOP/s | % of GEMM rate | tokens/s vs transformers | peak RSS MiB | "
             "peak RSS vs transformers | RSS added MiB | max abs Δloss vs transformers | others' CPU share |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, x in res.items():
        diff = "—" if name == "transformers" else f"{check[name]['max_abs_loss_diff']:.1e}"
        lines.append(f"| {name} | {x['tokens_per_s']:,.1f} | {x['gflops']:,.1f} | {x['pct_of_gemm_rate']:.1f}% | "
                     f"{x['tokens_per_s'] / hf['tokens_per_s']:.2f}× | {x['peak_rss_mib']:,.1f} | "
                     f"{x['peak_rss_mib'] / hf['peak_rss_mib']:.2f}× | {_fmt(x['delta_rss_mib'], 'MiB')} | {diff} | "
                     f"{_share(x['others_cpu_share'])} step, {_share(x['gemm']['others_cpu_share'])} GEMM |")
    return "\n".join(lines)


def markdown(r: dict) -> str:
    s = r["sizes"]
    title = "training step" if r["benchmark"] == "bench_llama_train" else ""
    bf16 = f" (training: {r['bf16_train']}" + (", float32 weights)" if r["bf16_train"] == "autocast" else ")")
    head = (f"# {r['benchmark']}{' (quick)' if r['quick'] else ''}: lmzoo vs transformers"
            f"{' ' + title if title else ''}\n\n"
            f"LLaMA, {r['n_params'] / 1e6:.1f}M parameters: vocab {s['vocab']}, d_model {s['d_model']}, "
            f"{s['n_layers']} layers, {s['n_heads']} heads / {s['n_kv_heads']} KV heads, d_ff {s['d_ff']}. "
            f"dtype {r['dtype']}{bf16 if r['dtype'] == 'bf16' else ''}, {r['threads']} threads, attention {r['attn']}. "
            f"CPU: {r['cpu']} ({', '.join(r['cpu_flags']) or 'flags unknown'}).\n"
            + ("" if title else f"Decode: prompt {s['prompt_len']} + {s['new_tokens']} new tokens, greedy. ")
            + f"Train: forward + backward + AdamW step on {s['train_batch']}×{s['train_seq']} tokens; lmzoo step "
            f"options {r['train_options']}, transformers: torch.optim.AdamW's default. "
            f"Median of {r['rounds']}×{s['repeats']} timed calls ({r['rounds']} processes per side, "
            f"alternating which goes first, each after {s['warmup']} warmup).\n"
            f"torch {r['versions']['torch']}, transformers {r['versions']['transformers']}, "
            f"lmzoo {r['versions']['lmzoo']}, Python {r['versions']['python']}.\n")
    if r["max_others_cpu_share"] is not None:
        head += (f"Other processes used at most {100 * r['max_others_cpu_share']:.1f}% of the {r['cpu_count']} CPUs' "
                 "time during any timed section.\n")
    head += "\n"
    if busy_warning(r):
        head += f"**{busy_warning(r)}**\n\n"
    head += gemm_line(r) + "\n"
    checks = "\n".join(f"- {line}" for line in check_lines(r))
    body = variant_table(r) if r["benchmark"] == "bench_llama_train" else table(r)
    return head + body + "\n\nChecks:\n\n" + checks + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: well under a minute (what the test runs)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in each worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--tries", type=int, default=3,
                   help="runs of a worker while other processes compete for the CPU (the quietest is kept)")
    p.add_argument("--busy-limit", type=float, default=0.1,
                   help="share of all CPU time that other processes may use while timing before a retry")
    p.add_argument("--optimizer-impl", choices=["auto", "fused", "foreach", "loop"], default="loop",
                   help="lmzoo's AdamW (TrainConfig.optimizer_impl; loop = torch's CPU default, as transformers')")
    p.add_argument("--compile", action="store_true", help="lmzoo: torch.compile the model (TrainConfig.compile)")
    p.add_argument("--chunked-ce", type=int, default=0, metavar="TOKENS",
                   help="lmzoo: the head and loss TOKENS at a time (loss_chunk; 0: the plain head and loss)")
    p.add_argument("--bf16-train", choices=["autocast", "weights"], default="autocast",
                   help="--dtype bf16 training: autocast over float32 weights (the trainers' bf16) or bf16 weights")
    p.add_argument("--train-only", action="store_true",
                   help="only the training step, lmzoo once per variant (AdamW impls, compile, chunked CE): "
                        "writes bench_llama_train*.md/.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return parse_sizes(p, SIZES, argv)


def parse_sizes(p: argparse.ArgumentParser, sizes: dict, argv=None) -> argparse.Namespace:
    """Add one --flag per ``sizes`` entry (name -> (default, --quick value, help)), parse, and fill the
    ones not given from --quick or the default; each must be >= 1 (``warmup`` >= 0)."""
    for name, (default, quick, help_) in sizes.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"{help_} (default {default}, --quick {quick})")
    a = p.parse_args(argv)
    for name, (default, quick, _) in sizes.items():
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else default)
        if getattr(a, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'warmup' else '>= 1'}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        Path(spec["result"]).write_text(json.dumps(worker(spec)))
        return 0
    print(f"bench_llama: dtype {a.dtype}, {a.threads} threads{', quick' if a.quick else ''}", file=sys.stderr)
    r = run(a)
    name = (("bench_llama_train" if a.train_only else "bench_llama") + ("_bf16" if a.dtype == "bf16" else "")
            + ("_quick" if a.quick else ""))
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / f"{name}.json").write_text(json.dumps(r, indent=2) + "\n")
    (a.out_dir / f"{name}.md").write_text(markdown(r))
    print(gemm_line(r) + (variant_table(r) if a.train_only else table(r)))
    for line in check_lines(r):
        print(line)
    if busy_warning(r):
        print(busy_warning(r))
    print(f"wrote {a.out_dir / name}.md and .json")
    # In float32 the two libraries must pick the same greedy tokens; in bf16 rounding may differ.
    bad = [k for k, c in r["checks"].items() if "agree" in c and not c["agree"]]
    return 1 if bad and a.dtype == "fp32" else 0


if __name__ == "__main__":
    sys.exit(main())
