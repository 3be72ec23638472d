"""Speculative decoding vs plain greedy decoding on the same target, in one run: acceptance rate,
tokens per target forward and the wall-clock speed-up (``lmzoo.generate.speculative``).

Greedy speculative output is plain greedy output token for token (checked on every row), so a row's
speed-up is all gain. Drafters:
  draft 4x smaller   an independent random llama of a quarter of the target's parameters, same vocabulary;
  early exit 1/4     the target's own embedding, first quarter of its layers, final norm and head (a
                     "layer-skip" self-draft: 4x fewer layers, no extra weights);
  prompt lookup n=3  n-grams copied from the sequence itself (no model).
Prompts: "repeated" is a 16-token phrase said 6 times; "random" is 96 random tokens.

Honest caveat: on random weights an independent draft almost never agrees with the target (acceptance
~1/V by chance), and a random target does not continue a repeated phrase either; what prompt lookup
catches there are the loops the random target falls into by itself. ``--trained`` adds a target and a
4x-smaller draft trained on tinyshakespeare (``benchmarks/tiny_shakespeare.py``; a few minutes on 2 cores),
where the drafts are meaningful: a real measurement on text, for small models.

    python benchmarks/bench_speculative.py              # random ~10M-param llama target, a minute or two
    python benchmarks/bench_speculative.py --trained    # + the trained byte-level pair
    python benchmarks/bench_speculative.py --quick      # tiny sizes, seconds

Output: benchmarks/results/bench_speculative{_quick}.{json,md} (``--out-dir`` puts them elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import lmzoo  # noqa: E402
from lmzoo.generate.speculative import speculative_generate  # noqa: E402
from lmzoo.models.llama.config import LlamaConfig  # noqa: E402

# name: (default, quick)
SIZES = {
    "vocab": (8192, 512), "d_model": (256, 64), "n_layers": (8, 4), "d_ff": (688, 128),
    "draft_d_model": (128, 32), "draft_n_layers": (2, 1), "draft_d_ff": (344, 64),
    "new_tokens": (128, 24), "k": (4, 4), "repeats": (5, 1),
    "train_steps": (300, 40),
}
TRAINED = {  # (target, draft) sizes of the tinyshakespeare pair: byte vocabulary, so the draft is ~1/4 of the target
    "full": (dict(d_model=128, n_layers=4, n_heads=4, d_ff=384), dict(d_model=64, n_layers=4, n_heads=4, d_ff=192)),
    "quick": (dict(d_model=64, n_layers=2, n_heads=4, d_ff=128), dict(d_model=32, n_layers=1, n_heads=4, d_ff=64)),
}


def llama(vocab: int, d_model: int, n_layers: int, d_ff: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return lmzoo.build(LlamaConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                                   d_ff=d_ff, max_positions=1024)).eval()


def early_exit(target: torch.nn.Module, n_layers: int) -> torch.nn.Module:
    """The target's first ``n_layers`` layers under its own embedding, final norm and head."""
    draft = lmzoo.build(target.config.replace(n_layers=n_layers)).eval()
    want = draft.state_dict()
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if k in want}, strict=True)
    return draft


def params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def timed_pair(plain, spec, repeats: int):
    """Median wall time of each, alternating plain and speculative calls so that load from other
    processes on a shared machine falls on both alike."""
    plain(), spec()  # warm-up (allocator, kernels)
    times, outs = ([], []), [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((plain, spec)):
            t0 = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1]), outs


def measure(target, prompts: dict, drafters: dict, new_tokens: int, k: int, repeats: int, group: str) -> list[dict]:
    rows = []
    for pname, ids in prompts.items():
        for dname, kw in drafters.items():
            plain_s, spec_s, (ref, (out, stats)) = timed_pair(
                lambda: lmzoo.generate(target, ids, max_new_tokens=new_tokens),
                lambda: speculative_generate(target, ids, k=k, max_new_tokens=new_tokens, **kw), repeats)
            rows.append({"group": group, "prompt": pname, "drafter": dname, "identical": bool(torch.equal(out, ref)),
                         "plain_s": plain_s, "spec_s": spec_s, "speedup": plain_s / spec_s, **stats.as_dict()})
            r = rows[-1]
            print(f"{group:8s} {pname:9s} {dname:18s} accept {r['acceptance_rate']:.3f}  tok/fwd "
                  f"{r['tokens_per_forward']:.2f}  speed-up {r['speedup']:.2f}x  identical {r['identical']}",
                  file=sys.stderr)
    return rows


def random_rows(a, size) -> tuple[list[dict], dict]:
    target = llama(size["vocab"], size["d_model"], size["n_layers"], size["d_ff"], seed=0)
    small = llama(size["vocab"], size["draft_d_model"], size["draft_n_layers"], size["draft_d_ff"], seed=1)
    exit_draft = early_exit(target, max(1, size["n_layers"] // 4))
    g = torch.Generator().manual_seed(0)
    phrase = torch.randint(0, size["vocab"], (1, 16), generator=g)
    prompts = {"repeated": phrase.repeat(1, 6), "random": torch.randint(0, size["vocab"], (1, 96), generator=g)}
    drafters = {f"draft {params(target) / params(small):.1f}x smaller": dict(draft=small),
                f"early exit {exit_draft.config.n_layers}/{size['n_layers']}": dict(draft=exit_draft),
                "prompt lookup n=3": dict(prompt_lookup=3)}
    info = {"target_params": params(target), "draft_params": params(small), "early_exit_params": params(exit_draft)}
    return measure(target, prompts, drafters, size["new_tokens"], size["k"], size["repeats"], "random"), info


def trained_rows(a, size, kind: str) -> tuple[list[dict], dict]:
    import tiny_shakespeare as ts  # benchmarks/ is on sys.path when this runs as a script

    if ts.corpus_path() is None:
        raise SystemExit(ts.missing_corpus())
    models = []
    for role, hp in zip(("target", "draft"), TRAINED[kind]):
        d = Path(a.cache) / kind / role
        want = {**hp, "steps": size["train_steps"], "seq_len": 128}
        info_file = d / "train_info.json"
        if not info_file.exists() or {k: json.loads(info_file.read_text()).get(k) for k in want} != want:
            print(f"training the {role} {want} ...", file=sys.stderr)
            ts.train(d, **want, log_every=100)
        models.append(lmzoo.load(d).eval())
    target, small = models
    _, held = ts.load_ids()
    prompts = {"held-out text": held[1000:1128][None]}
    drafters = {f"trained draft {params(target) / params(small):.1f}x smaller": dict(draft=small),
                f"early exit {max(1, target.config.n_layers // 4)}/{target.config.n_layers}":
                    dict(draft=early_exit(target, max(1, target.config.n_layers // 4))),
                "prompt lookup n=3": dict(prompt_lookup=3)}
    info = {"trained_target_params": params(target), "trained_draft_params": params(small),
            "trained_steps": size["train_steps"]}
    return measure(target, prompts, drafters, size["new_tokens"], size["k"], size["repeats"], "trained"), info


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Speculative decoding vs plain greedy (same target, same run)", "",
             f"CPU: {meta['cpu']}, torch {meta['torch']}, threads {meta['threads']}, k = {meta['k']}, "
             f"{meta['new_tokens']} new tokens, float32. Random target: {meta['target_params'] / 1e6:.1f}M params, "
             f"independent draft {meta['draft_params'] / 1e6:.2f}M, early exit {meta['early_exit_params'] / 1e6:.2f}M."]
    if "trained_target_params" in meta:
        lines.append(f"Trained (tinyshakespeare bytes, {meta['trained_steps']} steps each): target "
                     f"{meta['trained_target_params'] / 1e6:.2f}M, draft {meta['trained_draft_params'] / 1e6:.2f}M.")
    lines += ["", "| weights | prompt | drafter | acceptance | tokens / target forward | target forwards | "
              "speed-up vs greedy | same output |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['group']} | {r['prompt']} | {r['drafter']} | {r['acceptance_rate']:.3f} | "
                     f"{r['tokens_per_forward']:.2f} | {r['target_forwards']} | {r['speedup']:.2f}x | "
                     f"{'yes' if r['identical'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (what a smoke test runs)")
    p.add_argument("--trained", action="store_true", help="also the trained tinyshakespeare pair")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--cache", default="/tmp/lmzoo_bench_speculative", help="where trained models are kept")
    p.add_argument("--threads", type=int, default=0)
    for name, (default, quick) in SIZES.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"default {default}, quick {quick}")
    a = p.parse_args(argv)
    kind = "quick" if a.quick else "full"
    size = {n: getattr(a, n) if getattr(a, n) is not None else v[a.quick] for n, v in SIZES.items()}
    if a.threads:
        torch.set_num_threads(a.threads)
    rows, meta = random_rows(a, size)
    if a.trained:
        more, info = trained_rows(a, size, kind)
        rows += more
        meta.update(info)
    meta.update(cpu=platform.processor() or platform.machine(), torch=torch.__version__,
                threads=torch.get_num_threads(), k=size["k"], new_tokens=size["new_tokens"], sizes=size)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_speculative" + ("_quick" if a.quick else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"{stem}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
