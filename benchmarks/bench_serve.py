"""Serving under load: lmzoo's continuous-batching engine vs one request at a time vs transformers' own
continuous batching, on one random LLaMA, greedy, with closed-loop concurrent clients.

The workload is ``--requests`` requests (prompt lengths uniform in [min_prompt, max_prompt], random token
ids; max new tokens uniform in [min_new, max_new]; all from ``--seed``), the same ones at every level.
"C concurrent clients" is a closed loop: C clients each submit their next request the moment their
previous one finished, until every request is done. Three systems run it, in fresh processes (one per
system and level; ``--quick``: one per system) with ``--threads`` torch/OpenMP threads; the first
transformers process saves the random ``LlamaForCausalLM`` (bench_llama's), which every process loads:

  lmzoo          ``lmzoo.generate.continuous.Engine`` driven in-process: ``add_request`` /``step()``; a token
                 is stamped when the ``step`` that produced it returns.
  sequential     the same requests one after another, each alone at batch 1 through ``lmzoo.generate``'s
                 decode loop (``lmzoo.generate.stream``, which ``lmzoo.generate`` is a list of), stamped as
                 each token is yielded (in the first lmzoo process). It does not depend on C: it is
                 run once, and its latency at C
                 adds the wait in the queue that C clients form in front of a one-at-a-time server
                 (request i is sent when request i-C finishes and starts when request i-1 finishes).
  transformers   ``model.continuous_batching_context_manager(...)`` (what ``model.generate_batch`` runs) and
                 the manager's ``add_request(ids, max_new_tokens=..., record_timestamps=True)`` /
                 ``get_result``: ``generate_batch`` itself takes one ``max_new_tokens`` for all its inputs
                 and submits them all at once, so it can neither serve ragged lengths nor a closed loop;
                 its manager does both. A token's stamp is transformers' own (``record_timestamps``).

Both engines get the same knobs: blocks of ``--block-size`` tokens, the same number of blocks (enough
for max_batch sequences of the longest request: no preemption), at most 64 sequences and
``--max-batched-tokens`` tokens per step, prefix caching on (the prompts are random: nothing is shared).
transformers: ``attn_implementation="sdpa"``, ``ContinuousBatchingConfig(page_size, num_blocks,
max_batch_tokens, max_requests_per_batch=64, max_blocks_per_request=0, use_cuda_graph=False,
use_async_batching=False, auto_switch_to_flash=False)``, ``GenerationConfig(do_sample=False)``, warmup False.
Every process first serves ``--warmup`` requests of other random prompts, untimed, on a fresh engine.
A process during whose timed runs other programs took more than ``--busy-limit`` of all CPUs' time is
rerun, up to ``--tries`` times, and the quietest run is kept (bench_llama's guard).

Reported per C: throughput (generated tokens / wall time of the whole workload), time to first token
(submit -> first token, p50/p99 over requests), inter-token latency (gaps between a request's tokens,
p50/p99 over all gaps); the ratio lmzoo / reference of each. Memory (lmzoo): at the step where the
engine's KV blocks in use peak, their bytes against the bytes the running sequences' tokens need exactly
(tokens held x bytes per token: the paging waste), and against a static batch of the same sequences
(batch x (longest prompt + largest max new tokens), what a preallocated static cache would hold).
Agreement: every request's tokens, from every system and level, against the sequential run's.

    python benchmarks/bench_serve.py                 # defaults; ~4-8 minutes on 2 cores
    python benchmarks/bench_serve.py --quick         # tiny sizes (tests/benchmarks runs this)
    python benchmarks/bench_serve.py --concurrency 1,16 --requests 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_llama import _cpu_snapshot, _others_share, cpu_name, parse_sizes  # noqa: E402

SYSTEMS = ("lmzoo", "transformers", "sequential")
MAX_BATCH = 64  # sequences per step, both engines
SIZES = {  # name: (default, --quick, help)
    "vocab": (4096, 512, "vocabulary size"),
    "d_model": (256, 64, "hidden size"),
    "n_layers": (4, 2, "decoder layers"),
    "n_heads": (4, 4, "query heads"),
    "n_kv_heads": (2, 2, "key/value heads"),
    "d_ff": (688, 128, "SwiGLU inner size"),
    "max_positions": (512, 128, "context length"),
    "requests": (128, 12, "requests per concurrency level (the same ones at every level)"),
    "min_prompt": (8, 4, "shortest prompt"),
    "max_prompt": (64, 24, "longest prompt"),
    "min_new": (16, 4, "fewest new tokens a request asks for"),
    "max_new": (64, 16, "most new tokens a request asks for"),
    "block_size": (16, 8, "tokens per KV block (page_size for transformers)"),
    "max_batched_tokens": (512, 512, "tokens per step, both engines"),
    "warmup": (4, 2, "untimed requests per engine before timing"),
}


# --------------------------------------------------------------------------------------------
# the workload and its summaries
# --------------------------------------------------------------------------------------------


def workload(a, seed: int, n: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(a.vocab) for _ in range(rng.randint(a.min_prompt, a.max_prompt))],
             rng.randint(a.min_new, a.max_new)) for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q  # linear interpolation between order statistics (numpy's default)
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def summarize(recs: list[dict], wall: float) -> dict:
    """recs: per request {"submit": t, "times": [t per token], "tokens": [...]}."""
    ttft = [r["times"][0] - r["submit"] for r in recs]
    itl = [b - a for r in recs for a, b in zip(r["times"], r["times"][1:])]
    n = sum(len(r["tokens"]) for r in recs)
    return {"wall_s": wall, "generated_tokens": n, "tokens_per_s": n / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
            "itl_p50_ms": 1e3 * pct(itl, 0.5) if itl else None, "itl_p99_ms": 1e3 * pct(itl, 0.99) if itl else None}


def queued(recs: list[dict], c: int) -> list[dict]:
    """The sequential run seen by C closed-loop clients: request i is sent when i-C finishes, and the
    one-at-a-time server starts it when i-1 finishes; its own times shift by the wait."""
    out, finish = [], []
    for i, r in enumerate(recs):
        sent = finish[i - c] if i >= c else 0.0
        start = finish[i - 1] if i else 0.0
        shift = start - r["submit"]  # its own run began at r["submit"]; in the queue it begins at start
        out.append({"submit": sent, "times": [t + shift for t in r["times"]], "tokens": r["tokens"]})
        finish.append(r["end"] + shift)
    return out


# --------------------------------------------------------------------------------------------
# workers: one system, some concurrency levels, in its own process
# --------------------------------------------------------------------------------------------


def run_engine(model, work, c: int, spec: dict, memory: bool = True):
    from lmzoo.generate.continuous import Engine
    from lmzoo.generate.requests import SamplingParams

    eng = Engine(model, block_size=spec["block_size"], num_blocks=spec["num_blocks"], max_batch=MAX_BATCH,
                 max_batched_tokens=spec["max_batched_tokens"], prefix_caching=True)
    per_token = eng.pool.bytes_per_block // eng.pool.block_size
    recs, index, peak = [None] * len(work), {}, {"kv_bytes_used": -1}

    def submit(i):
        t = time.perf_counter()
        rid = eng.add_request(work[i][0], SamplingParams(max_tokens=work[i][1], temperature=0, ignore_eos=True))
        index[rid] = i
        recs[i] = {"submit": t, "times": [], "tokens": []}

    sent = min(c, len(work))
    t0 = time.perf_counter()
    for i in range(sent):
        submit(i)
    while eng.has_unfinished():
        outs = eng.step()
        now = time.perf_counter()
        if memory and eng.pool.used * eng.pool.bytes_per_block > peak["kv_bytes_used"]:
            held = sum(s.computed for s in eng.running)
            static = len(eng.running) * (max((len(s.prompt) for s in eng.running), default=0)
                                         + max((s.params.max_tokens for s in eng.running), default=0))
            peak = {"kv_bytes_used": eng.pool.used * eng.pool.bytes_per_block, "blocks_used": eng.pool.used,
                    "running": len(eng.running), "tokens_held": held, "exact_bytes": held * per_token,
                    "static_tokens": static, "static_bytes": static * per_token, "bytes_per_token": per_token}
        for o in outs:
            r = recs[index[o.request_id]]
            r["times"] += [now] * len(o.new_token_ids)
            r["tokens"] += o.new_token_ids
            if o.finished and sent < len(work):
                submit(sent)
                sent += 1
    wall = time.perf_counter() - t0
    return recs, wall, dict(peak, preemptions=eng.counters["preemptions"], blocks_total=eng.pool.num_blocks)


def run_sequential(model, work):
    import torch

    from lmzoo.generate import stream

    recs = []
    t0 = time.perf_counter()
    for prompt, new in work:
        t = time.perf_counter()
        r = {"submit": t, "times": [], "tokens": []}
        for nxt in stream(model, torch.tensor([prompt]), max_new_tokens=new, pad_token_id=0):
            r["tokens"].append(int(nxt[0]))
            r["times"].append(time.perf_counter())
        r["end"] = r["times"][-1]
        recs.append(r)
    return recs, time.perf_counter() - t0


def run_transformers(model, work, c: int, spec: dict):
    from transformers import ContinuousBatchingConfig, GenerationConfig

    gen = GenerationConfig(max_new_tokens=max(n for _, n in work), do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(page_size=spec["block_size"], num_blocks=spec["num_blocks"],
                                  max_batch_tokens=spec["max_batched_tokens"], max_requests_per_batch=MAX_BATCH,
                                  max_blocks_per_request=0, use_cuda_graph=False, use_async_batching=False,
                                  auto_switch_to_flash=False)
    recs = [None] * len(work)
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                   block=True, timeout=60, warmup=False) as mgr:
        def submit(i):
            recs[i] = {"submit": time.perf_counter()}
            mgr.add_request(work[i][0], request_id=f"r{i}", max_new_tokens=work[i][1], record_timestamps=True,
                            eos_token_id=-1)

        while mgr.batch_processor is None and mgr.is_running():  # its cache is built in its thread: not timed
            time.sleep(0.001)
        sent, done = min(c, len(work)), 0
        t0 = time.perf_counter()
        for i in range(sent):
            submit(i)
        while done < len(work):
            res = mgr.get_result(timeout=30)
            if res is None:
                raise RuntimeError("transformers' continuous batching returned nothing for 30 s")
            if not res.is_finished():
                continue
            if res.error is not None:
                raise RuntimeError(f"transformers request {res.request_id} failed: {res.error}")
            i = int(res.request_id[1:])
            recs[i].update(times=list(res.timestamps), tokens=list(res.generated_tokens))
            done += 1
            if sent < len(work):
                submit(sent)
                sent += 1
        wall = time.perf_counter() - t0
    return recs, wall


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    if spec["system"] == "transformers":
        import transformers

        versions["transformers"] = transformers.__version__
        if not Path(spec["model_dir"], "config.json").exists():  # the first transformers worker builds it
            from bench_llama import make_checkpoint

            spec["n_params"] = make_checkpoint(argparse.Namespace(**spec["sizes"], seed=spec["seed"]),
                                               Path(spec["model_dir"]), max_positions=spec["sizes"]["max_positions"])
        model = transformers.LlamaForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()
    else:
        import lmzoo

        versions["lmzoo"] = lmzoo.__version__
        model = lmzoo.load(spec["model_dir"], dtype=torch.float32)
    work = [tuple(w) for w in spec["work"]]
    warm = [tuple(w) for w in spec["warm"]]
    out = {"system": spec["system"], "levels": {}, "versions": versions,
           "n_params": sum(p.numel() for p in model.parameters())}
    for c in spec["levels"]:  # a client count, or "sequential" (the lmzoo worker runs the baseline too)
        system = "sequential" if c == "sequential" else spec["system"]
        if system == "sequential":
            run_sequential(model, warm)
        elif system == "lmzoo":
            run_engine(model, warm, len(warm), spec, memory=False)
        else:
            run_transformers(model, warm, len(warm), spec)
        before, mem = _cpu_snapshot(), None
        with torch.inference_mode():
            if system == "sequential":
                recs, wall = run_sequential(model, work)
            elif system == "lmzoo":
                recs, wall, mem = run_engine(model, work, c, spec)
            else:
                recs, wall = run_transformers(model, work, c, spec)
        out["levels"][str(c)] = {"others_cpu_share": _others_share(before, _cpu_snapshot()), "memory": mem,
                                 "wall_s": wall, "records": recs}
    return out


def run_worker(spec: dict, scratch: Path) -> dict:
    path = scratch / f"{spec['system']}-{'-'.join(map(str, spec['levels']))}.json"
    spec_path = path.with_suffix(".spec.json")  # the workload is too long for a command line
    spec_path.write_text(json.dumps(dict(spec, result=str(path))))
    path_var = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path_var, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['system']} C={spec['levels']} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(path.read_text())


def run_quiet(spec: dict, scratch: Path, tries: int, limit: float) -> dict:
    """Run the worker; while other processes took more than ``limit`` of all CPUs' time, try again (up to
    ``tries`` runs) and keep the quietest."""
    attempts = []
    for _ in range(tries):
        out = run_worker(spec, scratch)
        share = max((lv["others_cpu_share"] or 0.0) for lv in out["levels"].values())
        attempts.append((share, out))
        if share <= limit:
            break
    share, out = min(attempts, key=lambda x: x[0])
    out["others_cpu_share_per_try"] = [x for x, _ in attempts]
    return out


# --------------------------------------------------------------------------------------------
# parent: build the checkpoint, run the workers, compare and report
# --------------------------------------------------------------------------------------------


def agreement(ref: list[dict], got: list[dict]) -> dict:
    """Token-for-token comparison of every request with the sequential run's."""
    bad = [(i, next((t for t, (u, v) in enumerate(zip(r["tokens"], g["tokens"])) if u != v),
                    min(len(r["tokens"]), len(g["tokens"]))))
           for i, (r, g) in enumerate(zip(ref, got)) if r["tokens"] != g["tokens"]]
    return {"agree": not bad, "requests": len(ref), "mismatched_requests": len(bad),
            "first_mismatch": list(bad[0]) if bad else None}


def run(a) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        return _run(a, scratch)
    finally:
        shutil.rmtree(scratch)


def _run(a, scratch: Path) -> dict:
    work, warm = workload(a, a.seed, a.requests), workload(a, a.seed + 1, a.warmup)
    longest = a.max_prompt + a.max_new
    if longest > a.max_positions:
        raise SystemExit(f"--max-prompt + --max-new ({longest}) exceeds --max-positions ({a.max_positions})")
    num_blocks = MAX_BATCH * (-(-longest // a.block_size) + 1)  # every sequence at its longest: no preemption
    common = dict(model_dir=str(scratch / "hf"), threads=a.threads, work=work, warm=warm, block_size=a.block_size,
                  num_blocks=num_blocks, max_batched_tokens=a.max_batched_tokens, seed=a.seed,
                  sizes={k: getattr(a, k) for k in SIZES})
    groups = [a.concurrency] if a.quick else [[c] for c in a.concurrency]  # --quick: start-up would dominate
    results, versions, n_params, tries = {s: {} for s in SYSTEMS}, {}, None, {}
    for g, levels in enumerate(groups):  # the first transformers worker saves the random checkpoint
        for system in ("transformers", "lmzoo") if g % 2 == 0 else ("lmzoo", "transformers"):
            todo = (["sequential"] if system == "lmzoo" and g == 0 else []) + levels
            print(f"  {system:<12} {todo} ...", end="", flush=True, file=sys.stderr)
            t0 = time.perf_counter()
            out = run_quiet(dict(common, system=system, levels=todo), scratch, a.tries, a.busy_limit)
            got, n_params = out["levels"], out["n_params"]
            for c in got:
                tries[f"{system} {c}"] = out["others_cpu_share_per_try"]
            versions.update(out["versions"])
            if "sequential" in got:
                results["sequential"] = got["sequential"]
            results[system].update({int(c): r for c, r in got.items() if c != "sequential"})
            print(" " + ", ".join(f"{summarize(r['records'], r['wall_s'])['tokens_per_s']:.1f}"
                                  for r in got.values()) + f" tokens/s ({time.perf_counter() - t0:.0f} s, "
                  f"{len(out['others_cpu_share_per_try'])} tries)", file=sys.stderr)
    seq = results["sequential"]
    rows, checks, memory, summaries, others = [], {}, {}, {}, [seq["others_cpu_share"]]
    for c in a.concurrency:
        s = {"lmzoo": summarize(results["lmzoo"][c]["records"], results["lmzoo"][c]["wall_s"]),
             "transformers": summarize(results["transformers"][c]["records"], results["transformers"][c]["wall_s"]),
              "sequential": summarize(queued(seq["records"], c), seq["wall_s"])}
        summaries[c] = s
        for k in ("lmzoo", "transformers"):
            s[k]["others_cpu_share"] = results[k][c]["others_cpu_share"]
        s["sequential"]["others_cpu_share"] = seq["others_cpu_share"]
        for name, key, unit, better in (("throughput", "tokens_per_s", "tokens/s", "higher"),
                                        ("TTFT p50", "ttft_p50_ms", "ms", "lower"),
                                        ("TTFT p99", "ttft_p99_ms", "ms", "lower"),
                                        ("ITL p50", "itl_p50_ms", "ms", "lower"),
                                        ("ITL p99", "itl_p99_ms", "ms", "lower")):
            v = {k: s[k][key] for k in SYSTEMS}
            rows.append({"concurrency": c, "name": name, "unit": unit, "better": better, **v,
                         "vs_transformers": v["lmzoo"] / v["transformers"] if v["transformers"] else None,
                         "vs_sequential": v["lmzoo"] / v["sequential"] if v["sequential"] else None})
        for system in ("lmzoo", "transformers"):
            checks[f"{system} C={c}"] = agreement(seq["records"], results[system][c]["records"])
            others.append(results[system][c]["others_cpu_share"])
        m = results["lmzoo"][c]["memory"]
        memory[c] = dict(m, waste_ratio=m["kv_bytes_used"] / m["exact_bytes"],
                         static_ratio=m["static_bytes"] / m["exact_bytes"])
    others = [x for x in others if x is not None]
    return {"benchmark": "bench_serve", "quick": a.quick, "dtype": "float32", "threads": a.threads, "tries": a.tries,
            "busy_limit": a.busy_limit,
            "n_params": n_params, "sizes": {k: getattr(a, k) for k in SIZES}, "concurrency": a.concurrency,
            "num_blocks": num_blocks, "max_batch": MAX_BATCH,
            "prompt_tokens": sum(len(p) for p, _ in work), "requested_new_tokens": sum(n for _, n in work),
            "versions": versions,
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "max_others_cpu_share": max(others) if others else None,
            "others_cpu_share_per_try": tries, "rows": rows, "memory": memory, "checks": checks, "summaries": summaries,
            "records": {"sequential": slim(seq["records"]),
                        **{f"{s} C={c}": slim(results[s][c]["records"]) for s in ("lmzoo", "transformers")
                           for c in a.concurrency}}}


def slim(recs: list[dict]) -> list[dict]:
    """What the JSON keeps of each request: its tokens, its time to first token (sequential: alone), and
    how many tokens were stamped (one stamp per token)."""
    return [{"tokens": r["tokens"], "ttft_ms": 1e3 * (r["times"][0] - r["submit"]), "stamps": len(r["times"])}
            for r in recs]


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if x >= 1000 else f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def _ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}×"


def table(r: dict) -> str:
    lines = ["| C | measurement | unit | better | lmzoo | transformers | sequential | lmzoo / transformers | "
             "lmzoo / sequential |", "|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for w in r["rows"]:
        lines.append(f"| {w['concurrency']} | {w['name']} | {w['unit']} | {w['better']} | {_fmt(w['lmzoo'])} | "
                     f"{_fmt(w['transformers'])} | {_fmt(w['sequential'])} | {_ratio(w['vs_transformers'])} | "
                     f"{_ratio(w['vs_sequential'])} |")
    return "\n".join(lines)


def memory_table(r: dict) -> str:
    lines = ["| C | running at peak | tokens held | KV blocks in use | KV bytes in use | exact need | "
             "paging waste (in use / exact) | static batch | static / exact |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, m in r["memory"].items():
        kib = lambda b: f"{b / 1024:,.0f} KiB"  # noqa: E731
        lines.append(f"| {c} | {m['running']} | {m['tokens_held']} | {m['blocks_used']} / {m['blocks_total']} | "
                     f"{kib(m['kv_bytes_used'])} | {kib(m['exact_bytes'])} | {m['waste_ratio']:.3f}× | "
                     f"{kib(m['static_bytes'])} | {m['static_ratio']:.2f}× |")
    return "\n".join(lines)


def check_lines(r: dict) -> list[str]:
    out = []
    for label, c in r["checks"].items():
        verdict = (f"all {c['requests']} requests agree token for token" if c["agree"] else
                   f"DIFFER in {c['mismatched_requests']} of {c['requests']} requests (first: request, position "
                   f"{c['first_mismatch']})")
        out.append(f"{label} vs sequential: {verdict}")
    return out


def busy_warning(r: dict) -> str | None:
    if r["max_others_cpu_share"] is not None and r["max_others_cpu_share"] > r["busy_limit"]:
        return (f"WARNING: other processes used up to {100 * r['max_others_cpu_share']:.0f}% of the CPU time "
                f"while timing, even after up to {r['tries']} tries: these timings are unreliable; rerun on a "
                "quiet machine.")
    return None


def markdown(r: dict) -> str:
    s = r["sizes"]
    head = (f"# bench_serve{' (quick)' if r['quick'] else ''}: continuous batching under closed-loop load\n\n"
            f"Random LLaMA, {r['n_params'] / 1e6:.1f}M parameters: vocab {s['vocab']}, d_model {s['d_model']}, "
            f"{s['n_layers']} layers, {s['n_heads']} heads / {s['n_kv_heads']} KV heads, d_ff {s['d_ff']}, context "
            f"{s['max_positions']}; float32, {r['threads']} thread(s) per process. CPU: {r['cpu']}.\n"
            f"{s['requests']} requests per level: prompts {s['min_prompt']}-{s['max_prompt']} tokens "
            f"({r['prompt_tokens']} in all), {s['min_new']}-{s['max_new']} new tokens each "
            f"({r['requested_new_tokens']} in all), greedy, no EOS. Closed loop: C clients, each sends its next "
            f"request when its previous one finished. Both engines: blocks of {s['block_size']} tokens, "
            f"{r['num_blocks']} blocks, at most {r['max_batch']} sequences and {s['max_batched_tokens']} tokens "
            "per step, prefix caching on. sequential = each request alone through lmzoo.generate's decode loop "
            "(its latency at C includes the queue C clients form).\n"
            f"torch {r['versions']['torch']}, transformers {r['versions']['transformers']}, "
            f"lmzoo {r['versions']['lmzoo']}, Python {r['versions']['python']}.\n")
    if r["max_others_cpu_share"] is not None:
        head += (f"Other processes used at most {100 * r['max_others_cpu_share']:.1f}% of the {r['cpu_count']} "
                 f"CPUs' time during any kept timed run (a process during which they took more than "
                 f"{100 * r['busy_limit']:.0f}% is rerun, up to {r['tries']} runs, and the quietest kept).\n")
    head += "\n"
    if busy_warning(r):
        head += f"**{busy_warning(r)}**\n\n"
    return (head + table(r) + "\n\nKV memory of the lmzoo engine at its peak step (blocks in use vs the running "
            "sequences' tokens × bytes per token; static = batch × (longest prompt + largest max new tokens)):\n\n"
            + memory_table(r) + "\n\nAgreement (greedy):\n\n" + "\n".join(f"- {x}" for x in check_lines(r)) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, C in 1,4 (what the test runs)")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated client counts (default 1,4,16,64; --quick 1,4)")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads in each worker (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tries", type=int, default=3, help="runs of a worker while other processes compete for its "
                   "CPUs (the quietest is kept)")
    p.add_argument("--busy-limit", type=float, default=0.1,
                   help="share of all CPUs' time other processes may take while timing before a rerun (even a "
                   "program on the other core slows a one-thread worker: shared cache and memory bandwidth)")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = parse_sizes(p, SIZES, argv)
    if a.concurrency is None:
        a.concurrency = [1, 4] if a.quick else [1, 4, 16, 64]
    if any(c < 1 for c in a.concurrency):
        p.error("--concurrency values must be >= 1")
    if a.min_prompt > a.max_prompt or a.min_new > a.max_new:
        p.error("--min-prompt/--min-new must not exceed --max-prompt/--max-new")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        spec = json.loads(Path(a.worker).read_text())
        Path(spec["result"]).write_text(json.dumps(worker(spec)))
        return 0
    print(f"bench_serve: C={a.concurrency}, {a.requests} requests, {a.threads} thread(s)"
          f"{', quick' if a.quick else ''}", file=sys.stderr)
    r = run(a)
    name = "bench_serve" + ("_quick" if a.quick else "")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
    (a.out_dir / f"{name}.md").write_text(markdown(r))
    print(table(r) + "\n\n" + memory_table(r))
    for line in check_lines(r):
        print(line)
    if busy_warning(r):
        print(busy_warning(r))
    print(f"wrote {a.out_dir / name}.md and .json")
    return 0 if all(c["agree"] for c in r["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
