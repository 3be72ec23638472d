"""Evaluate a model directory: perplexity on text, lmzoo's built-in tasks, lm-evaluation-harness tasks.

  lmzoo eval --model runs/sft/final                              # built-in text + every built-in task
  lmzoo eval --model DIR --data wiki.txt notes.jsonl --context 512 --stride 256
  lmzoo eval --model DIR --tasks add choice_from_chinese --limit 50
  lmzoo eval --model base/ --adapter runs/sft-lora/adapter --tasks generative
  lmzoo eval --compare runs/pre/final runs/sft/final runs/dpo/final --out runs/eval   # side by side
  lmzoo eval --model DIR --harness lmzoo_add lmzoo_zh_numbers     # through lm-eval (pip install 'lmzoo[eval]')

Text is scored with a sliding window (--context tokens every --stride tokens, each token predicted
once): loss, perplexity and bits per byte. Built-in tasks: add, sub, mul, to_chinese, from_chinese,
sort (greedy answers, exact match) and choice_<task> (4 options, acc and acc_norm by log-likelihood);
groups all, generative, choice. With --out: results.json, report.md and eval.png there. See docs/eval.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmzoo.cli.common import add_revision_argument, takes_model
from lmzoo.errors import ConfigError

HELP = "perplexity, built-in tasks and lm-eval tasks of one model or several side by side"


def add_arguments(p) -> None:
    p.add_argument("--model", metavar="DIR", help="a model directory with its tokenizer (a run's final/, a "
                   "quantized checkpoint, any Hugging Face decoder lmzoo loads) or a Hub id (org/name)")
    add_revision_argument(p)
    p.add_argument("--compare", nargs="+", metavar="DIR", help="several model directories (or Hub ids), evaluated "
                   "alike and shown side by side (after --model, when both are given)")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter to put on --model (a directory or a Hub id)")
    for dest, kind in (("model", "model"), ("compare", "model"), ("adapter", "adapter")):
        takes_model(p, dest, kind=kind)
    p.add_argument("--data", nargs="+", metavar="FILE", help="text to score (.txt, .jsonl, .json, .parquet, a "
                   "datasets folder; one document per file, record or row); 'built-in': fresh built-in text")
    p.add_argument("--field", help="the JSON key / column of the text (default: text)")
    p.add_argument("--split", help="text files: file | blank | line (what a document is); datasets folders: the split")
    p.add_argument("--tasks", nargs="+", metavar="NAME", help="built-in tasks or groups (all, generative, choice)")
    p.add_argument("--harness", nargs="+", metavar="TASK", help="lm-evaluation-harness tasks (lmzoo's shipped "
                   "lmzoo_* tasks, or any under --include-path)")
    p.add_argument("--include-path", metavar="DIR", help="a folder of harness task YAML files")
    p.add_argument("--out", metavar="DIR", help="write results.json, report.md and eval.png here")
    p.add_argument("--limit", type=int, help="at most this many documents per text and items per task "
                   "(default: every document, 100 items)")
    p.add_argument("--context", type=int, help="tokens per perplexity window (default: the model's maximum)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: --context)")
    p.add_argument("--batch-size", type=int, default=16)
    from lmzoo.data.tasks import LEVELS

    p.add_argument("--level", choices=list(LEVELS), default="easy", help="built-in task difficulty (easy: the "
                   "tiny models' level, as lmzoo's tiny configs train; medium: two-digit operands)")
    p.add_argument("--seed", type=int, help="the built-in tasks' draw (default: lmzoo.eval.suite.EVAL_SEED)")
    p.add_argument("--template", help="chat template for the tasks (default: the model's own, else plain "
                   "'Question: ... Answer:' prompts; 'plain': those even where the model has one)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print results as JSON instead of the table")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from lmzoo.eval.model import EvalModel
    from lmzoo.eval.report import BUILTIN_TEXT, builtin_text, evaluate, table, write
    from lmzoo.eval.suite import EVAL_SEED, task_names

    dirs = ([args.model] if args.model else []) + (args.compare or [])
    if not dirs:
        raise ConfigError("lmzoo eval: give --model DIR (or --compare DIR DIR ...)")
    if args.adapter and len(dirs) > 1:
        raise ConfigError("--adapter goes with one --model, not with --compare")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    nothing_asked = not (args.data or args.tasks or args.harness)
    tasks = task_names(args.tasks or (["all"] if nothing_asked else []))  # an unknown name fails before loading
    texts = _texts(args) if args.data else ({BUILTIN_TEXT: builtin_text()} if nothing_asked else {})
    harness_args = {"include_path": args.include_path} if args.include_path else {}
    results = []
    for d in dirs:
        lm = EvalModel.from_dir(d, adapter=args.adapter, template=args.template, dtype=args.dtype,
                                batch_size=args.batch_size)
        results.append(evaluate(lm, texts=texts, tasks=tasks, harness=args.harness, harness_args=harness_args,
                                limit=args.limit, context=args.context, stride=args.stride, level=args.level,
                                seed=args.seed if args.seed is not None else EVAL_SEED,
                                max_new_tokens=args.max_new_tokens, path=str(d), adapter=args.adapter,
                                show_progress=not args.no_progress))
        del lm
    _unique_names(results)
    settings = {"limit": args.limit, "context": args.context, "stride": args.stride, "level": args.level,
                "seed": args.seed if args.seed is not None else EVAL_SEED, "template": args.template,
                "dtype": args.dtype, "data": args.data}
    if args.json:
        print(json.dumps({"models": results, "settings": settings}, indent=1, ensure_ascii=False))
    else:
        print(table(results))
    if args.out:
        path = write(args.out, results, settings)
        print(f"lmzoo eval: {path}, report.md and eval.png in {args.out}", file=sys.stderr)
    return 0


def _texts(args) -> dict[str, list[str]]:
    from lmzoo.data.readers import read_documents

    from lmzoo.eval.report import BUILTIN_TEXT, builtin_text

    out = {}
    for f in args.data:
        if f == BUILTIN_TEXT and not Path(f).exists():  # the name of the built-in text, unless a file has it
            out[BUILTIN_TEXT] = builtin_text()
        else:
            out[str(f)] = list(read_documents(f, field=args.field, split=args.split))
    return out


def _unique_names(results: list[dict]) -> None:
    """Two models with the same label (two runs' final/ named alike) get their position added."""
    seen: dict[str, int] = {}
    for r in results:
        seen[r["model"]] = seen.get(r["model"], 0) + 1
    for i, r in enumerate(results):
        if seen[r["model"]] > 1:
            r["model"] = f"{r['model']}#{i + 1}"
