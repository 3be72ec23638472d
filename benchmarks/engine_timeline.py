"""Continuous batching, drawn: requests arriving while others decode, each step's kind, the paged
cache's blocks in use against what the requests hold, and a preemption when the pool runs out.

    python benchmarks/engine_timeline.py --out docs/figures/engine_timeline.png

A random tiny LLaMA (the timeline does not depend on what the weights say: every request runs to its
max_tokens), 24 requests of ragged prompt and output lengths, one arriving every other step, a pool
deliberately too small for all of them at once. Writes the figure and a JSON of the per-step record.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

import lmzoo
from lmzoo.generate.continuous import Engine
from lmzoo.generate.requests import SamplingParams
from lmzoo.models.llama.config import LlamaConfig


def record(n_requests: int = 24, seed: int = 0, num_blocks: int = 40, block_size: int = 8) -> dict:
    torch.manual_seed(seed)
    model = lmzoo.build(LlamaConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                                    max_positions=256)).eval()
    r = random.Random(seed)
    reqs = [([r.randrange(512) for _ in range(r.randint(8, 48))], r.randint(8, 40)) for _ in range(n_requests)]
    eng = Engine(model, block_size=block_size, num_blocks=num_blocks, max_batch=8, max_batched_tokens=64)
    steps, spans, step, pending = [], {}, 0, list(range(n_requests))
    rid_of = {}
    while pending or eng.has_unfinished():
        if pending and step % 2 == 0:
            i = pending.pop(0)
            rid_of[eng.add_request(reqs[i][0], SamplingParams(max_tokens=reqs[i][1], temperature=0,
                                                              ignore_eos=True))] = i
        before = dict(eng.counters)
        outs = eng.step()
        kind = "prefill" if eng.counters["prefill_steps"] > before["prefill_steps"] else "decode"
        s = eng.stats()
        steps.append({"step": step, "kind": kind, "batch": len(outs), "blocks_used": s["blocks_used"],
                      "tokens_held": s["tokens_held"], "preempted": s["preemptions"] > before["preemptions"]})
        for o in outs:
            spans.setdefault(rid_of[o.request_id], []).append(step)
        step += 1
    return {"steps": steps, "spans": {str(k): v for k, v in spans.items()}, "block_size": block_size,
            "num_blocks": num_blocks}


def plot(rec: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for k, steps in sorted(rec["spans"].items(), key=lambda kv: int(kv[0])):
        top.scatter(steps, [int(k)] * len(steps), s=6, marker="s", color="tab:blue")
    prefills = [s["step"] for s in rec["steps"] if s["kind"] == "prefill"]
    for x in prefills:
        top.axvline(x, color="tab:orange", alpha=0.15, lw=1)
    top.set_ylabel("request")
    top.set_title("each request's steps (blue); prefill steps shaded orange")
    xs = [s["step"] for s in rec["steps"]]
    bs = rec["block_size"]
    bottom.plot(xs, [s["blocks_used"] * bs for s in rec["steps"]], label="token slots in used blocks")
    bottom.plot(xs, [s["tokens_held"] for s in rec["steps"]], label="tokens the requests hold")
    bottom.axhline(rec["num_blocks"] * bs, color="gray", ls="--", lw=1, label="pool size")
    for s in rec["steps"]:
        if s["preempted"]:
            bottom.axvline(s["step"], color="tab:red", lw=1)
    bottom.set_xlabel("engine step")
    bottom.set_ylabel("KV slots")
    bottom.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/engine_timeline.png")
    a = p.parse_args()
    torch.set_num_threads(1)
    rec = record()
    out = Path(a.out)
    plot(rec, out)
    out.with_suffix(".json").write_text(json.dumps(rec))
    n = len(rec["steps"])
    pre = sum(s["kind"] == "prefill" for s in rec["steps"])
    waste = [1 - s["tokens_held"] / (s["blocks_used"] * rec["block_size"]) for s in rec["steps"] if s["blocks_used"]]
    print(f"{n} steps ({pre} prefill), preemptions {sum(s['preempted'] for s in rec['steps'])}, "
          f"mean paging waste {sum(waste) / len(waste):.1%}; wrote {out}")


if __name__ == "__main__":
    main()
