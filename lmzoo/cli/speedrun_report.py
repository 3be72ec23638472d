"""The speedrun's report: report.md (the report card, stages, samples, how to use the result) and
speedrun.png, read from the run's state.json and each stage's metrics.jsonl:

  report card   held-out exact match per task, for every stage's model (grouped bars)
  pretraining   train and validation loss against the step, the unigram baseline dashed
  SFT           train loss on the answers, held-out accuracy at each evaluation
  DPO           training loss, held-out pairs' reward margin, held-out accuracy
  time          seconds per stage (training and evaluation)
  size / speed  the weights' bytes and greedy decode tokens/s of each model

Without matplotlib the report is written without the figure.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from lmzoo.cli.speedrun_stages import PROMPTS


def _metrics(path: Path) -> list[dict]:
    from lmzoo.train.metrics import read_metrics

    return read_metrics(path) if path.is_file() else []


def _series(rows: list[dict], split: str, key: str) -> tuple[list, list]:
    got = [(r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), (int, float))
           and not math.isnan(r[key])]
    return ([x for x, _ in got], [y for _, y in got]) if got else ([], [])


def plot(out: Path, state: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; report without speedrun.png (pip install matplotlib)",
              file=sys.stderr)
        return None
    evals, stages = ordered(state)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), dpi=100)
    (card, pre, sft), (dpo, times, size) = axes

    labels = list(evals)
    kinds = sorted({k for e in evals.values() for k in e["exact_match"]})
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        ys = [evals[label]["exact_match"].get(k, 0.0) for k in kinds] + [evals[label]["mean_exact_match"]]
        card.bar([j + i * width for j in range(len(kinds) + 1)], ys, width, label=label)
    card.set_xticks([j + 0.4 - width / 2 for j in range(len(kinds) + 1)], kinds + ["mean"], rotation=30)
    card.set_ylim(0, 1), card.set_ylabel("exact match (held-out)"), card.legend(fontsize=8)
    card.set_title("report card: held-out tasks per stage")

    rows = _metrics(out / "pretrain" / "metrics.jsonl")
    pre.plot(*_series(rows, "train", "loss"), label="train")
    pre.plot(*_series(rows, "eval", "loss"), "o-", label="validation")
    if "pretrain" in stages and "unigram_nats" in stages["pretrain"]:
        pre.axhline(stages["pretrain"]["unigram_nats"], ls="--", color="gray", label="unigram baseline")
    pre.set_xlabel("step"), pre.set_ylabel("nats/token"), pre.legend(fontsize=8), pre.set_title("pretraining loss")

    rows = _metrics(out / "sft" / "metrics.jsonl")
    sft.plot(*_series(rows, "train", "loss"), label="train loss (answers)")
    sft.plot(*_series(rows, "eval", "loss"), "o-", label="held-out loss")
    sft.set_xlabel("step"), sft.set_ylabel("nats/token"), sft.set_title("SFT")
    acc = sft.twinx()
    acc.plot(*_series(rows, "eval", "accuracy"), "s-", color="tab:green", label="held-out exact match")
    acc.set_ylim(0, 1), acc.set_ylabel("exact match")
    sft.legend(loc="upper left", fontsize=8), acc.legend(loc="upper right", fontsize=8)

    rows = _metrics(out / "dpo" / "metrics.jsonl")
    dpo.plot(*_series(rows, "train", "loss"), alpha=0.7, label="train loss (DPO + SFT term)")
    dpo.plot(*_series(rows, "eval", "rewards/margins"), "o-", label="held-out pairs' reward margin")
    dpo.set_xlabel("step"), dpo.set_title("DPO on the SFT model's mistakes")
    acc = dpo.twinx()
    acc.plot(*_series(rows, "eval", "accuracy"), "s-", color="tab:green", label="held-out exact match")
    acc.set_ylim(0, 1), acc.set_ylabel("exact match")
    dpo.legend(loc="upper left", fontsize=8), acc.legend(loc="upper right", fontsize=8)

    names = [x for x in stages if stages[x].get("done")]
    train_s = [stages[x]["seconds"] for x in names]
    eval_s = [sum(e["seconds"] for lab, e in evals.items() if _made_by(lab) == x) for x in names]
    times.barh(names, train_s, label="stage")
    times.barh(names, eval_s, left=train_s, label="its evaluation")
    times.invert_yaxis(), times.set_xlabel("seconds"), times.legend(fontsize=8)
    times.set_title(f"time: {state.get('seconds', sum(train_s) + sum(eval_s)):.0f} s in all")

    mb = [evals[x]["bytes"] / 1e6 for x in labels]
    size.bar(labels, mb, color="tab:purple")
    size.set_ylabel("MB of weights"), size.set_title("size (bars) and decode speed (dots)")
    speed = size.twinx()
    speed.plot([x for x in labels if "decode_tok_s" in evals[x]],
               [evals[x]["decode_tok_s"] for x in labels if "decode_tok_s" in evals[x]], "o", color="tab:orange")
    speed.set_ylabel("greedy tokens/s (batch 1)")
    fig.tight_layout()
    path = out / "speedrun.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def ordered(state: dict) -> tuple[dict, dict]:
    """(evaluations, stages) in the lifecycle's order (state.json keeps its keys sorted)."""
    from lmzoo.cli.speedrun import ROWS, STAGES

    evals, stages = state["evals"], state["stages"]
    return ({lab: evals[lab] for lab, _, _ in ROWS if lab in evals},
            {x: stages[x] for x in STAGES if x in stages})


def _made_by(label: str) -> str:
    from lmzoo.cli.speedrun import ROWS

    return next(made_by for lab, made_by, _ in ROWS if lab == label)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def card_table(state: dict) -> list[str]:
    """The report card: one row per stage's model, held-out exact match per task and the rest."""
    evals, stages = ordered(state)
    kinds = sorted({k for e in evals.values() for k in e["exact_match"]})
    source = stages.get("quantize", {}).get("source")  # the float model the quantized rows come from
    float_bytes = evals[source]["bytes"] if source in evals else None
    head = ["model", "stage time", "**exact match**", *kinds, "perplexity", "size", "decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, e in evals.items():
        stage = stages.get(_made_by(label), {})
        size = f"{e['bytes'] / 1e6:.2f} MB"
        if float_bytes and label in ("int8", "gguf q8_0"):
            size += f" ({e['bytes'] / float_bytes:.0%})"
        cells = [label, f"{stage.get('seconds', 0):.0f} s" if label != "gguf q8_0" else "",
                 f"**{e['mean_exact_match']:.3f}**", *[f"{e['exact_match'].get(k, math.nan):.2f}" for k in kinds],
                 f"{e['perplexity']:.2f}", size, f"{e['decode_tok_s']:.0f}" if "decode_tok_s" in e else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def changes(state: dict) -> list[tuple[str, str, dict]]:
    """(model, the model it came from, ``paired_change`` on the same held-out tasks) for each stage's model
    against the one before it (the quantized ones against the model that was quantized)."""
    from lmzoo.eval.suite import paired_change

    evals, stages = ordered(state)
    source = stages.get("quantize", {}).get("source")
    before = {"sft": "pretrain", "dpo": "sft", "int8": source, "gguf q8_0": source}
    bits = lambda e: [c == "1" for k in sorted(e["right"]) for c in e["right"][k]]  # noqa: E731
    return [(label, before[label], paired_change(bits(evals[before[label]]), bits(e)))
            for label, e in evals.items() if before.get(label) in evals and "right" in e
            and "right" in evals[before[label]]]


def change_table(state: dict) -> list[str]:
    rows = changes(state)
    if not rows:
        return []
    lines = ["", "Each model against the one it was made from, on the same tasks: the tasks it got right that "
             "the other missed and the reverse, and the exact sign test's p-value (McNemar) of the change.", "",
             "| model | from | exact match change | newly right | newly wrong | p |", "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {src} | {c['change'] * 100:+.1f} points | {c['gained']} | {c['lost']} | "
              f"{c['p']:.2g} |" for label, src, c in rows]
    return lines


def write_report(out: Path, state: dict, s: dict) -> Path:
    from lmzoo.cli.speedrun import ROWS

    fig = plot(out, state)
    (evals, stages), plan = ordered(state), state.get("plan", {})
    n_tasks = next(iter(evals.values()))["n_tasks"] if evals else {}
    t = s["tasks"]
    lines = ["# lmzoo speedrun", "",
             f"Setting **{state['setting']}**, seed {state['seed']}, {state['precision']}, "
             f"{plan.get('threads', '?')} CPU thread(s); {state.get('seconds', 0):.0f} s in all. "
             f"Step counts: {plan.get('how', '')}"
             + "".join(f"; {x} refit to {r['steps']} steps at the {r['sec_per_step']:.2f} s {r['from']} measured"
                       for x, r in plan.get("refit", {}).items()) + ".", "",
             "## Report card", "",
             f"Greedy answers to held-out built-in tasks (level {t['level']}; never among SFT's conversations "
             f"or DPO's tasks; {', '.join(f'{k} {n}' for k, n in n_tasks.items())}), scored by value; "
             "perplexity of fresh built-in text (documents no stage trained on); size: the weights' files "
             "(% of the float model); decode: greedy tokens/s of one sequence with lmzoo on this machine.", ""]
    lines += card_table(state) + change_table(state)
    if fig is not None:
        lines += ["", f"![report card, curves, time, size]({fig.name})"]
    lines += ["", "## Stages", ""]
    p = stages.get("pretrain", {})
    if p.get("done"):
        m = p["model"]
        lines.append(f"- **pretrain** ({p['seconds']:.0f} s): sp-bpe tokenizer of {p['vocab']:,} tokens trained on "
                     f"the built-in corpus ({p['corpus']['characters']:,} characters, {p['corpus']['cjk_share']:.0%} "
                     f"Chinese; {p['bytes_per_token']:.2f} bytes/token); a {p['params'] / 1e6:.2f}M LLaMA (d_model "
                     f"{m['d_model']}, {m['n_layers']} layers, {m['n_heads']}/{m['n_kv_heads']} query/KV heads, "
                     f"SwiGLU {m['d_ff']}) for {p['steps']} steps: validation perplexity {p['val_ppl']:.1f} against "
                     f"the unigram baseline's {p['unigram_ppl']:.1f}.")
    x = stages.get("sft", {})
    if x.get("done"):
        lines.append(f"- **sft** ({x['seconds']:.0f} s): {x['steps']} steps of full finetuning on the built-in "
                     f"instruction data ({x['data']}); answers only in the loss, packed rows.")
    x = stages.get("dpo", {})
    if x.get("done"):
        d, c = s["dpo"], x["pairs"]
        lines.append(f"- **dpo** ({x['seconds']:.0f} s): the SFT model answered {c['prompts']} fresh tasks "
                     f"(greedy; {c['right']:.0%} right); each of its {c['pairs']} mistakes is a pair, the right "
                     f"answer chosen over its reply"
                     + (f", and {c['replay']} of the tasks it got right are kept with a rule-made near miss as the "
                        f"rejected answer (replay)" if c.get("replay") else "")
                     + f" (`data/dpo_pairs.jsonl`); {x['steps']} steps of "
                     f"{d['batch_size']} pairs, DPO (beta {d['beta']:g}) + {d['sft_weight']:g} x the chosen answers' "
                     f"NLL (RPO), lr {d['lr']:g}.")
    x = stages.get("quantize", {})
    if x.get("done"):
        lines.append(f"- **quantize** ({x['seconds']:.0f} s): RTN int8, symmetric, one scale per 32 weights, of "
                     f"{x['source']}'s model (decoder linears; `quantized/`), and the GGUF file with the same codes "
                     f"in Q8_0 ({x['kept_codes'][0]} of {x['kept_codes'][1]} matrices kept their codes; embeddings "
                     "and head in Q8_0 too): its row is scored on the file's weights.")
    if evals:
        lines += ["", "## Samples (greedy)", "", "| prompt | " + " | ".join(evals) + " |",
                  "|" + "---|" * (len(evals) + 1)]
        lines += [f"| {_cell(q)} | " + " | ".join(_cell(e["samples"].get(q, "")) for e in evals.values()) + " |"
                  for q in PROMPTS]
    final = next((rel for lab, _, rel in reversed(ROWS[:3]) if stages.get(lab, {}).get("done")), None)
    lines += ["", "## Use it", "", "```bash"]
    if final:
        lines += [f"lmzoo chat --model {out / final}", f"lmzoo serve --model {out / final} --port 8000   "
                  "# OpenAI-compatible: /v1/chat/completions",
                  f"lmzoo eval --model {out / final} --tasks generative --level {t['level']}"]
    if (out / "model-q8_0.gguf").is_file():
        lines += [f"llama-cli -m {out / 'model-q8_0.gguf'} -p 'What is 12 + 7?' -n 16   # llama.cpp",
                  f"python -c \"from llama_cpp import Llama; print(Llama('{out / 'model-q8_0.gguf'}')"
                  ".create_chat_completion([{'role': 'user', 'content': 'What is 12 + 7?'}]))\""]
    lines += ["```", "", "## Files", "",
              "`state.json` (every number above), `tokenizer/`, `pretrain/`, `sft/`, `dpo/` (each a training run "
              "folder: `metrics.jsonl`, plots, `checkpoints/`, `final/`), `quantized/`, `model-q8_0.gguf`.", ""]
    from lmzoo.train.atomic import write_text

    return write_text(out / "report.md", "\n".join(lines))
