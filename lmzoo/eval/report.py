"""One model's evaluation (text perplexity, built-in tasks, harness tasks) as a results dict, and
several side by side: a terminal table, ``results.json``, ``report.md`` and ``eval.png``.

results (one model)::

    {"model": name, "path": dir, "adapter": dir | None,
     "text":    {label: {"loss", "perplexity", "bits_per_byte", "tokens", ...}},
     "tasks":   {name: {"exact_match" | "acc", "acc_norm", "chance", "n", "examples"}},
     "harness": {task: {metric: value}}}

``results.json`` holds ``{"models": [results, ...], "settings": {...}}`` (one entry per ``--compare``
model, in order).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from lmzoo.data.bilingual import bilingual_documents
from lmzoo.eval.suite import EVAL_SEED, run_tasks
from lmzoo.train.atomic import write_text

BUILTIN_TEXT = "built-in"
# the metrics each section puts in the table, in order (the others stay in results.json)
TEXT_METRICS = ("perplexity", "bits_per_byte")
TASK_METRICS = ("exact_match", "acc", "acc_norm")


def builtin_text(n: int = 50, seed: int = EVAL_SEED) -> list[str]:
    """Fresh documents from the built-in bilingual generator (``lmzoo.data.bilingual``): the same kind of
    text the built-in corpus holds, drawn with a seed its pretraining never uses."""
    return bilingual_documents(n, seed=seed)


def evaluate(lm, *, texts: dict[str, list[str]] | None = None, tasks: list[str] | None = None,
             harness: list[str] | None = None, harness_args: dict | None = None, limit: int | None = None,
             context: int | None = None, stride: int | None = None, level: str = "easy", seed: int = EVAL_SEED,
             max_new_tokens: int = 24, path: str | None = None, adapter: str | None = None,
             show_progress: bool = True) -> dict:
    """Everything asked of one ``EvalModel``; ``limit`` caps the documents of each text and the items of
    each task (default: all documents, 100 items)."""
    from lmzoo.eval.perplexity import text_perplexity

    out = {"model": lm.name, "path": path, "adapter": adapter, "text": {}, "tasks": {}, "harness": {}}
    for label, docs in (texts or {}).items():
        docs = docs[:limit] if limit else docs
        with _bar(f"{lm.name}: {label}", show_progress) as progress:
            out["text"][label] = text_perplexity(lm.model, lm.tok, docs, context=context, stride=stride,
                                                 batch_size=lm.batch_size, progress=progress)
    if tasks:
        def said(name):
            if show_progress:
                print(f"lmzoo eval: {lm.name}: {name}", file=sys.stderr, flush=True)

        results = run_tasks(lm, tasks, limit=limit, seed=seed, level=level, max_new_tokens=max_new_tokens,
                            progress=said)
        out["tasks"] = {k: r.to_dict() for k, r in results.items()}
    if harness:
        from lmzoo.eval.harness import run_harness

        raw = run_harness(path, harness, limit=limit, batch_size=lm.batch_size, adapter=adapter,
                          apply_chat_template=not lm.plain and not lm.seq2seq, **(harness_args or {}))
        out["harness"] = harness_metrics(raw)
    return out


def harness_metrics(raw: dict) -> dict[str, dict[str, float]]:
    """The harness's ``results`` section as {task: {metric: value}}: the "metric,filter" keys lose a
    "none" filter, standard errors and aliases are dropped."""
    out = {}
    for task, metrics in (raw.get("results") or {}).items():
        kept = {}
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if "stderr" in metric or metric == "sample_len" or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            kept[metric if flt in ("", "none") else f"{metric} ({flt})"] = float(value)
        out[task] = kept
    return out


class _bar:
    """A tqdm bar driven by ``progress(done, total)`` callbacks (nothing when ``show`` is False)."""

    def __init__(self, desc: str, show: bool):
        self.desc, self.show, self.bar = desc, show, None

    def __enter__(self):
        if not self.show:
            return None

        def progress(done, total):
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=self.desc, unit=" windows", leave=False, file=sys.stderr,
                                dynamic_ncols=True)
            self.bar.n = done
            self.bar.refresh()

        return progress

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


# -- tables ------------------------------------------------------------------------------------
def rows(results: list[dict]) -> list[tuple[str, list[float | None]]]:
    """(row label, one value per model) for every metric the table shows, in a stable order."""
    labels: list[tuple[str, str, str]] = []
    for section, metrics in (("text", TEXT_METRICS), ("tasks", TASK_METRICS), ("harness", None)):
        for r in results:
            for name, vals in r.get(section, {}).items():
                for m in (metrics or vals.keys()):
                    key = (section, name, m)
                    if m in vals and key not in labels:
                        labels.append(key)
    out = []
    for section, name, m in labels:
        prefix = "harness " if section == "harness" else ""
        out.append((f"{prefix}{name} {m}", [r.get(section, {}).get(name, {}).get(m) for r in results]))
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.4g}" if abs(v) >= 10 else f"{v:.3f}"


def table(results: list[dict]) -> str:
    """A plain-text table: one row per metric, one column per model."""
    body = [(label, [_fmt(v) for v in vals]) for label, vals in rows(results)]
    head = ["metric"] + [r["model"] for r in results]
    widths = [max(len(head[0]), *(len(b[0]) for b in body))] if body else [len(head[0])]
    widths += [max(len(head[i + 1]), *(len(b[1][i]) for b in body)) if body else len(head[i + 1])
               for i in range(len(results))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for label, vals in body:
        lines.append("  ".join([label.ljust(widths[0])] + [v.rjust(w) for v, w in zip(vals, widths[1:])]))
    return "\n".join(lines)


def markdown_table(results: list[dict]) -> str:
    head = "| metric | " + " | ".join(r["model"] for r in results) + " |"
    sep = "|---|" + "---:|" * len(results)
    body = [f"| {label} | " + " | ".join(_fmt(v) for v in vals) + " |" for label, vals in rows(results)]
    return "\n".join([head, sep, *body])


# -- the run folder ------------------------------------------------------------------------------
def write(out_dir: str | Path, results: list[dict], settings: dict) -> Path:
    """``results.json``, ``eval.png`` and ``report.md`` in ``out_dir`` (each written whole, then renamed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "results.json", json.dumps({"models": results, "settings": settings}, indent=1,
                                                  ensure_ascii=False))
    plotted = plot(results, out_dir / "eval.png")
    lines = ["# lmzoo eval", "", "Models: " + ", ".join(f"`{r['model']}` ({r['path']})" for r in results), "",
             markdown_table(results), ""]
    if plotted:
        lines += ["![metrics per model](eval.png)", ""]
    lines += _examples(results)
    lines += ["", "Settings: " + ", ".join(f"{k} = {v}" for k, v in settings.items() if v is not None), ""]
    write_text(out_dir / "report.md", "\n".join(lines))
    return out_dir / "results.json"


def _examples(results: list[dict]) -> list[str]:
    """The first replies of each model to each generative task, side by side."""
    names = [n for r in results for n, v in r.get("tasks", {}).items() if "exact_match" in v]
    lines = []
    for name in dict.fromkeys(names):
        first = next(r for r in results if name in r.get("tasks", {}))
        lines += [f"## {name}: replies", "", "| prompt | answer | " + " | ".join(r["model"] for r in results) + " |",
                  "|---|---|" + "---|" * len(results)]
        for i, ex in enumerate(first["tasks"][name]["examples"]):
            cells = []
            for r in results:
                exs = r.get("tasks", {}).get(name, {}).get("examples", [])
                cells.append(_cell(exs[i]["reply"]) + (" ✓" if exs[i]["right"] else "") if i < len(exs) else "-")
            lines.append(f"| {_cell(ex['prompt'])} | {_cell(ex['answer'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _cell(text: str) -> str:
    return (text.replace("|", "\\|").replace("\n", " ")[:60]) or "(empty)"


def plot(results: list[dict], path: Path) -> bool:
    """Task scores (exact match / acc) per model as grouped bars, and perplexity per model beside them."""
    tasks = [(label, vals) for label, vals in rows(results)
             if label.endswith((" exact_match", " acc")) and not label.startswith("harness ")]
    ppl = [(label, vals) for label, vals in rows(results) if label.endswith(" perplexity")]
    if not tasks and not ppl:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (tasks, ppl) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 + 5 * (len(panels) - 1), 3.6), squeeze=False)
    width = 0.8 / len(results)
    for ax, panel in zip(axes[0], panels):
        for j, r in enumerate(results):
            xs = [i + j * width for i in range(len(panel))]
            ys = [vals[j] if vals[j] is not None else 0.0 for _, vals in panel]
            ax.bar(xs, ys, width, label=r["model"])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(panel))])
        ax.set_xticklabels([label.rsplit(" ", 1)[0] for label, _ in panel], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("exact match / acc" if panel is tasks else "perplexity (log scale)")
        if panel is tasks:
            ax.set_ylim(0, 1)
        else:  # perplexities of different stages span orders of magnitude
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True

