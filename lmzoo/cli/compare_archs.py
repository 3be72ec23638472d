"""The architecture lab: same-size models of several families, the same data, the same token budget.

  lmzoo compare-archs --families llama bloom gpt2 chatglm2 deepseek_v2 --params 10M --tokens 2M
  lmzoo compare-archs --tiny --families llama gpt2 --out /tmp/lab     # seconds: the tests' setting

Each family starts from its configs/<family>/tiny.yaml model (shipped in the package: lmzoo.configs)
and keeps its depth, head counts and shape ratios; only the width changes: d_model is searched in steps
of 8·n_heads, and every width-like field of the family's record (Family.width_fields: d_ff; DeepSeek-V2's
d_expert, kv_lora_rank, q_lora_rank and MLA head dims) scales with it, until the parameter count
(counted on the meta device, embeddings included, all experts counted) is the closest to --params. All
families share one tokenizer, one token file and one seeded batch order, and train --tokens tokens with
the same optimizer and schedule, each in its own process so that its peak memory is its own. Measured:
validation loss (nats/token, the same tokens for all), training tokens/s, peak memory (RSS growth on the
CPU, allocated bytes on a GPU) and KV-cache bytes per token (bf16, from the model's attention modules).
Writes compare.md, compare.json, compare.png and one run folder per family under --out.
"""

from __future__ import annotations

import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from lmzoo.errors import LmzooError

HELP = "train same-size models of several families on the same data; compare loss, speed, memory, KV cache"
SETTINGS = {
    "default": dict(params="10M", tokens="250K", vocab_size=2048, seq_len=128, batch_size=16, lr=2e-3, scale=1.0),
    "tiny": dict(params="60K", tokens="12K", vocab_size=400, seq_len=32, batch_size=8, lr=3e-3, scale=0.03,
                 threads=1),  # tiny ops: a second thread only waits
}


def parse_count(text: str | int) -> int:
    """'10M' -> 10,000,000; '500K', '1.5M', '2G' and plain integers."""
    s = str(text).strip().upper().replace("_", "").replace(",", "")
    mult = {"K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "B": 10 ** 9}.get(s[-1:], 1)
    try:
        return int(float(s[:-1] if mult > 1 else s) * mult)
    except ValueError:
        raise LmzooError(f"not a count: {text!r} (e.g. 10M, 500K, 2000000)") from None


def add_arguments(p) -> None:
    p.add_argument("--families", nargs="+", default=["llama", "bloom", "gpt2", "chatglm2", "deepseek_v2"])
    p.add_argument("--params", help="target parameters per model, e.g. 10M (default 10M; tiny 60K)")
    p.add_argument("--tokens", help="training tokens per model, e.g. 2M (default 250K; tiny 12K)")
    p.add_argument("--layers", type=int, help="layers for every family (default: each base config's)")
    p.add_argument("--data", nargs="+", metavar="FILE", help="training files (default: the built-in corpus)")
    p.add_argument("--field", help="the text field of JSONL/Parquet records")
    p.add_argument("--out", help="output folder (default: runs/compare-archs-<date-time>)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long setting (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads per run (default: torch's choice)")
    p.add_argument("--cache-dir", help="token-file cache (default: ~/.cache/lmzoo/tokens)")
    p.add_argument("--no-progress", action="store_true")


# -- same-size configs ---------------------------------------------------------------------------


def base_config(family: str, tokenizer, layers: int | None):
    """The model of the family's shipped tiny config (``lmzoo.configs.path(family)``), on the shared
    tokenizer's vocabulary; a family without one is an error naming the file looked for."""
    import yaml

    from lmzoo import configs
    from lmzoo.models.registry import get_family
    from lmzoo.stages.pretrain import model_config

    fam = get_family(family)
    if fam.shape != "causal decoder":
        raise LmzooError(f"compare-archs compares causal decoders on one next-token loss; '{family}' is "
                         f"{'an' if fam.shape[0] in 'aeiou' else 'a'} {fam.shape}")
    path = configs.path(family, "tiny")
    section = {k: v for k, v in (yaml.safe_load(path.read_text())["model"]).items()
               if not k.endswith("_token_id") and k != "init_std"}
    section["vocab_size"] = tokenizer.vocab_size
    _, cfg = model_config(section, tokenizer)
    changes = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=None)
    if layers:
        changes["n_layers"] = layers
    return cfg.replace(**changes)


def at_width(cfg, d_model: int, seq_len: int):
    """``cfg`` with d_model = ``d_model`` and every width-like field of its family (``Family.width_fields``)
    scaled by the same ratio."""
    from lmzoo.models.registry import family_of

    r = d_model / cfg.d_model
    changes = {"d_model": d_model, "head_dim": None, "max_positions": max(cfg.max_positions, seq_len)}
    for f in family_of(cfg).width_fields:
        v = getattr(cfg, f, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            changes[f] = max(8, int(round(v * r / 8)) * 8)
    return cfg.replace(**changes)


def count_params(cfg) -> int:
    import lmzoo

    return sum(p.numel() for p in lmzoo.build(cfg, device="meta").parameters())


def solve_width(cfg, target: int, seq_len: int):
    """(config, params): the width (a multiple of 8·n_heads) whose parameter count is closest to ``target``."""
    unit = 8 * cfg.n_heads
    lo, hi = 1, 2
    while count_params(at_width(cfg, hi * unit, seq_len)) < target and hi < 4096:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the count grows with the width: bisect for the last multiple below the target
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count_params(at_width(cfg, mid * unit, seq_len)) < target else (lo, mid)
    best = min((at_width(cfg, k * unit, seq_len) for k in (lo, hi)), key=lambda c: abs(count_params(c) - target))
    return best, count_params(best)


# -- one training run, in its own process --------------------------------------------------------


def _peak_rss() -> int | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    except (ImportError, OSError):
        return None


def train_one(job: dict) -> dict:
    import torch

    import lmzoo
    from lmzoo.data import Batches, PackedRows, TokenFile, split_tokens
    from lmzoo.objectives import make_step_fn
    from lmzoo.train import TrainConfig, Trainer
    from lmzoo.train.init import init_weights

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    tf = TokenFile.open(job["token_file"])
    train_span, val_span = split_tokens(tf, 0.05, job["seq_len"])
    train = Batches(PackedRows(tf, job["seq_len"], train_span), job["batch_size"], seed=job["seed"])
    val_rows = PackedRows(tf, job["seq_len"], val_span)

    def eval_batches():
        return Batches(val_rows, min(job["batch_size"], len(val_rows)), shuffle=False, epochs=1, drop_last=False)

    cuda = torch.cuda.is_available()
    base_rss = _peak_rss()
    torch.manual_seed(job["seed"])
    model = init_weights(lmzoo.build(job["config"]), 0.02)
    steps = job["steps"]
    tcfg = TrainConfig(steps=steps, lr=job["lr"], min_lr=job["lr"] / 10, warmup_steps=max(1, steps // 10),
                       weight_decay=0.1, clip_grad=1.0, seed=job["seed"], log_every=max(1, steps // 20),
                       eval_every=max(1, steps // 4), progress=job["progress"], plot=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    result = Trainer(model, train, make_step_fn("causal_lm", config=job["config"]), tcfg, job["out"],
                     eval_batches=eval_batches).fit()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if cuda else (_peak_rss() or 0) - (base_rss or 0)
    return {"family": job["family"], "val_loss": result.eval["loss"], "val_ppl": result.eval["ppl"],
            "train_loss": result.loss, "tokens": steps * job["batch_size"] * job["seq_len"], "seconds": seconds,
            "tokens_per_s": steps * job["batch_size"] * job["seq_len"] / seconds, "peak_memory_bytes": peak,
            "memory_kind": "cuda allocated" if cuda else "RSS growth", "kv_bytes_per_token": model.kv_bytes_per_token(2)}


# -- the command ---------------------------------------------------------------------------------


def check_arguments(args, s: dict) -> tuple[int, int, Path]:
    """Every argument, before any work: (target parameters, token budget, output folder). Each family
    goes through ``base_config`` on a stand-in for the tokenizer (only its size is read), so an unknown
    family, one that is not a causal decoder or one without a tiny config is refused before any training."""
    from types import SimpleNamespace

    target, budget = parse_count(args.params or s["params"]), parse_count(args.tokens or s["tokens"])
    for flag, value in (("--params", target), ("--tokens", budget), ("--layers", args.layers),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise LmzooError(f"{flag} must be at least 1, got {value}")
    repeated = sorted({f for f in args.families if args.families.count(f) > 1})
    if repeated:
        raise LmzooError(f"--families: {repeated} given more than once (each family gets one run folder)")
    stand_in = SimpleNamespace(vocab_size=s["vocab_size"], bos_id=None, eos_id=None, name="(the shared tokenizer)",
                               token_to_id=lambda token: None)
    for family in args.families:
        base_config(family, stand_in, args.layers)
    for f in args.data or ():
        if not Path(f).exists():
            raise LmzooError(f"--data: {f}: no such file or folder")
    out = Path(args.out or f"runs/compare-archs-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmzooError(f"{out} is not empty: choose another --out")
    return target, budget, out


def run(args) -> int:
    import torch

    import lmzoo
    from lmzoo.data import builtin_corpus, tokenize_files, tokenize_texts

    s = SETTINGS["tiny" if args.tiny else "default"]
    target, budget, out = check_arguments(args, s)
    out.mkdir(parents=True, exist_ok=True)
    texts = builtin_corpus(scale=s["scale"], seed=args.seed) if not args.data else None
    tok_texts = texts if texts is not None else _sample(args.data, args.field)
    tok = lmzoo.train_tokenizer("sp-bpe", texts=tok_texts, vocab_size=s["vocab_size"])
    tok.save(out / "tokenizer")
    kw = dict(cache_dir=args.cache_dir, progress=not args.no_progress)
    tf = tokenize_texts(texts, tok, **kw) if texts is not None else tokenize_files(args.data, tok, field=args.field, **kw)
    per_step = s["batch_size"] * s["seq_len"]
    steps = max(1, math.ceil(budget / per_step))
    print(f"{len(args.families)} families, ~{target:,} parameters each, {steps} steps x {per_step} tokens = "
          f"{steps * per_step:,} tokens each; data: {tf.n_tokens:,} tokens ({tf.path})", flush=True)
    sized = {}  # every family's width, before the first one trains
    for family in args.families:
        cfg, n = sized[family] = solve_width(base_config(family, tok, args.layers), target, s["seq_len"])
        print(f"- {family}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads -> {n:,} parameters",
              flush=True)
    rows = []
    for family, (cfg, n) in sized.items():
        job = dict(family=family, config=cfg, token_file=str(tf.path), seq_len=s["seq_len"], batch_size=s["batch_size"],
                   steps=steps, lr=s["lr"], seed=args.seed, threads=args.threads or s.get("threads") or torch.get_num_threads(),
                   out=str(out / family), progress=not args.no_progress)
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            row = pool.submit(train_one, job).result()
        rows.append({**row, "params": n, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                     "n_kv_heads": cfg.n_kv_heads})
    write_outputs(out, rows, target, steps * per_step, baselines(tf, tok.vocab_size, s["seq_len"]))
    return 0


def baselines(tf, vocab_size: int, seq_len: int) -> dict:
    """What the validation loss means: the uniform model (ln V, an untrained model's loss) and the
    unigram model of the training tokens (token frequencies alone), on the same validation tokens."""
    from lmzoo.data import split_tokens
    from lmzoo.data.baselines import unigram_cross_entropy

    train_span, val_span = split_tokens(tf, 0.05, seq_len)  # the split train_one uses
    return {"vocab_size": vocab_size, "uniform_loss": math.log(vocab_size),
            "unigram_loss": unigram_cross_entropy(tf.tokens[slice(*train_span)], tf.tokens[slice(*val_span)],
                                                  vocab_size)}


def _sample(files, field, max_chars: int = 2_000_000) -> list[str]:
    from lmzoo.data import read_documents

    out, n = [], 0
    for f in files:
        for d in read_documents(f, field=field):
            out.append(d)
            n += len(d)
            if n >= max_chars:
                return out
    return out


def table(rows: list[dict]) -> str:
    head = ("| family | params | d_model x layers | heads q/kv | val loss | val ppl | tokens/s | peak memory | "
            "KV bytes/token (bf16) |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['family']} | {r['params'] / 1e6:.2f}M | {r['d_model']} x {r['n_layers']} | "
             f"{r['n_heads']}/{r['n_kv_heads']} | {r['val_loss']:.3f} | {r['val_ppl']:.1f} | {r['tokens_per_s']:,.0f} | "
             f"{r['peak_memory_bytes'] / 2 ** 20:.0f} MiB | {r['kv_bytes_per_token']:,} |" for r in rows]
    return "\n".join([head, *lines])


def write_outputs(out: Path, rows: list[dict], target: int, tokens: int, base: dict | None = None) -> None:
    text = table(rows)
    print("\n" + text + "\n", flush=True)
    kind = rows[0]["memory_kind"] if rows else ""
    (out / "compare.json").write_text(json.dumps({"target_params": target, "tokens": tokens, **(base or {}),
                                                  "rows": rows}, indent=1))
    md = [f"# compare-archs: ~{target:,} parameters, {tokens:,} training tokens each", "", text, "",
          f"Peak memory: {kind} during training. Validation loss: nats per token on the same held-out tokens "
          "(one shared tokenizer)" + (f"; baselines on them: uniform ln {base['vocab_size']} = "
                                      f"{base['uniform_loss']:.3f}, unigram {base['unigram_loss']:.3f}." if base else
                                      "."), ""]
    if _plot(out, rows):
        md += ["![comparison](compare.png)", ""]
    (out / "compare.md").write_text("\n".join(md))
    print(f"wrote {out / 'compare.md'}, compare.json" + (", compare.png" if (out / "compare.png").exists() else ""))


def _plot(out: Path, rows: list[dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no compare.png", file=sys.stderr)
        return False
    from lmzoo.train.metrics import read_metrics

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), dpi=100)
    names = [r["family"] for r in rows]
    for r in rows:
        ev = [m for m in read_metrics(out / r["family"] / "metrics.jsonl") if m.get("split") == "eval"]
        axes[0].plot([m["step"] for m in ev], [m["loss"] for m in ev], "o-", label=r["family"], markersize=3)
    axes[0].set(title="validation loss", xlabel="step", ylabel="nats/token")
    axes[0].legend(fontsize=8)
    for ax, key, title, scale in ((axes[1], "tokens_per_s", "training tokens/s", 1),
                                  (axes[2], "peak_memory_bytes", "peak memory (MiB)", 2 ** 20),
                                  (axes[3], "kv_bytes_per_token", "KV cache bytes/token (bf16)", 1)):
        ax.bar(names, [r[key] / scale for r in rows])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "compare.png")
    plt.close(fig)
    return True
