"""Pretrain any family from a YAML run config, with command-line overrides.

  lmzoo pretrain --config configs/llama/tiny.yaml
  lmzoo pretrain --config configs/gpt2/tiny.yaml --data corpus.txt more.jsonl --steps 500 --out runs/g
  lmzoo pretrain --config configs/llama/tiny.yaml --out runs/l --resume       # after a crash or Ctrl-C
  lmzoo pretrain --config configs/llama/tiny.yaml --init-from runs/l/final --data more.txt --out runs/l2
  torchrun --nproc_per_node 2 -m lmzoo pretrain --config configs/llama/tiny.yaml --parallel fsdp

The run folder holds metrics.jsonl, checkpoints/, loss.png and, at the end, final/ (lmzoo.load
reads it). Ctrl-C finishes the step, writes a checkpoint and prints the --resume command (exit
status 130). See docs/training.md for the config reference.
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from pathlib import Path

HELP = "pretrain a model from a YAML config (tokenizer, data, objective, the training loop)"


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="a run config file, or a shipped one by name from any folder: "
                   "configs/llama/tiny.yaml, llama/tiny (lmzoo.configs)")
    p.add_argument("--data", nargs="+", metavar="FILE", help="training files (.txt, .jsonl, .json, .parquet, a "
                   "datasets folder); default: the config's, else the built-in corpus")
    p.add_argument("--field", help="the text field of JSONL/Parquet records")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--seed", type=int, help="seeds the weights, the data order and the objective's randomness")
    p.add_argument("--out", help="the run folder (default: runs/<family>-<config name>)")
    p.add_argument("--save-every", type=int, help="a checkpoint every N steps (always one at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out "
                   "(an error when there is none)")
    p.add_argument("--resume-or-start", action="store_true", help="like --resume, but start from scratch when --out "
                   "holds no checkpoint (for jobs that may be restarted)")
    p.add_argument("--init-from", metavar="DIR", help="continue pretraining this model (a directory lmzoo.save "
                   "wrote, e.g. a run's final/): its architecture and tokenizer replace the config's model section "
                   "and tokenizer training (sets model.init_from)")
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp"], help="under torchrun: DDP or FSDP2")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="bf16 autocast (CPU/GPU); fp16 with loss scaling (for GPUs; runs on the CPU)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--batch-size", type=int, help="global rows per micro-batch")
    p.add_argument("--seq-len", type=int, help="tokens per row")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any other config value, e.g. --set train.warmup_steps=20 --set model.n_layers=2 "
                        "(the value is read as YAML)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


OVERRIDES = {"steps": "train.steps", "seed": "train.seed", "save_every": "train.save_every",
             "parallel": "train.parallel", "precision": "train.precision", "device": "train.device", "lr": "train.lr",
             "batch_size": "data.batch_size", "seq_len": "data.seq_len", "field": "data.field"}


def run(args) -> int:
    from lmzoo.stages import pretrain

    config = resolve_config(args.config)
    if not Path(args.config).exists():
        print(f"lmzoo pretrain: {args.config} is not here; using the shipped {config}", file=sys.stderr)
    cfg = pretrain.load_config(config)
    if args.init_from:  # the checkpoint is the architecture: the file's model fields and tokenizer training go
        cfg["model"] = {"init_from": args.init_from}
        cfg["tokenizer"] = {k: v for k, v in (cfg.get("tokenizer") or {}).items() if k == "path"}
    if args.data:
        pretrain.set_path(cfg, "data.files", list(args.data))
    pretrain.apply_overrides(cfg, args, OVERRIDES)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg['model'].get('family', 'model')}-{Path(args.config).stem}"
    from lmzoo.train import TrainingInterrupted

    try:
        with warnings.catch_warnings():  # a warning is one line too ("skipping checkpoint ..."), no source line
            warnings.showwarning = lambda message, *_a, **_k: print(f"lmzoo pretrain: warning: {message}",
                                                                     file=sys.stderr)
            res = pretrain.run(cfg, out, resume=args.resume, resume_or_start=args.resume_or_start,
                               source=str(config))
    except TrainingInterrupted as e:
        if _is_main():
            where = f"checkpoint {e.checkpoint}" if e.checkpoint else "no checkpoint written"
            print(f"lmzoo pretrain: interrupted at step {e.step}; {where}; continue with: "
                  f"{resume_command(args, out)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the first step (tokenizer, data), or a second Ctrl-C: nothing new saved
        if _is_main():
            from lmzoo.train.checkpoint import list_checkpoints

            kept = list_checkpoints(out / "checkpoints")
            where = (f"the newest checkpoint, {kept[0][1]}, is intact; continue with: {resume_command(args, out)}"
                     if kept else "nothing was saved")
            print(f"lmzoo pretrain: interrupted; {where}", file=sys.stderr)
        return 130
    if res.final_dir is not None:
        ev = res.train.eval
        tail = f", eval loss {ev['loss']:.4f} (ppl {ev['ppl']:.2f})" if ev else ""
        print(f"trained {res.train.step} steps{tail}; final model in {res.final_dir}", file=sys.stderr)
        print(res.final_dir)
    return 0


def resolve_config(given: str) -> Path:
    """The file ``--config`` names: the path itself when it exists, else the shipped config it spells
    (``configs/<family>/<name>.yaml``, ``<family>/<name>[.yaml]``, read with ``lmzoo.configs.path``),
    so the README's commands work from any folder on an installed lmzoo."""
    from lmzoo import configs
    from lmzoo.errors import ConfigError

    path = Path(given)
    if path.exists():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    if len(parts) == 2 and path.suffix in ("", ".yaml"):
        family, name = parts[0], Path(parts[1]).stem
        if family in configs.shipped() and name in configs.shipped()[family]:
            return configs.path(family, name)
    names = sorted(f"{f}/{n}" for f, ns in configs.shipped().items() for n in ns)
    raise ConfigError(f"{given}: cannot read the run config (no such file, nor a shipped config); "
                      f"shipped, by name: {', '.join(names)}")


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def resume_command(args, out: Path) -> str:
    """The command line that continues this run: the same options, with --resume."""
    flags = [("--config", args.config), ("--data", args.data), ("--init-from", args.init_from)]
    flags += [("--" + attr.replace("_", "-"), getattr(args, attr)) for attr in OVERRIDES]
    words = ["lmzoo", "pretrain"]
    for flag, value in flags:
        if value is not None:
            words += [flag, *(value if isinstance(value, list) else [str(value)])]
    for item in args.set:
        words += ["--set", item]
    words += ["--out", str(out)] + (["--no-progress"] if args.no_progress else []) + ["--resume"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the same launch: torchrun's own options are not ours to repeat
        words = ["torchrun", "...", "-m", *words]
    return shlex.join(words)
