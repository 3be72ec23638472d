"""Supervised finetuning of any causal decoder: full, LoRA or QLoRA, on your conversations or on
lmzoo's built-in bilingual instruction data.

  lmzoo sft --model runs/llama/final --out runs/sft                       # built-in data, configs/sft/tiny.yaml
  lmzoo sft --model DIR --data alpaca_zh.json chats.jsonl --lora --out runs/sft-lora
  lmzoo sft --model DIR --data data.parquet --qlora --template chatml --steps 1000 --out runs/q
  lmzoo sft --model DIR --out runs/sft --resume                              # after a crash or Ctrl-C

Records are read as Alpaca, ShareGPT, OpenAI messages or prompt/completion pairs (detected per
file). Only the assistant's tokens are trained unless --train-on-prompt. The run folder holds
metrics.jsonl (train and held-out loss on the response tokens, exact-match accuracy on held-out
built-in tasks), loss.png, sft.png, checkpoints/, final/ (a full model directory with its tokenizer
and chat template; with LoRA the merged weights) and, with LoRA, adapter/ in PEFT's layout. Chat with
the result: lmzoo chat --model runs/sft/final. See docs/sft.md.
"""

from __future__ import annotations

import shlex
import sys
import warnings
from pathlib import Path

import yaml

from lmzoo.cli.common import add_revision_argument, takes_model

HELP = "supervised finetuning (full, --lora, --qlora) on conversations or the built-in instruction data"
DEFAULT_CONFIG = "sft/tiny"
OVERRIDES = {"steps": "train.steps", "seed": "train.seed", "save_every": "train.save_every", "lr": "train.lr",
             "precision": "train.precision", "device": "train.device", "batch_size": "data.batch_size",
             "seq_len": "data.seq_len", "template": "data.template", "format": "data.format"}


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="the decoder to finetune: a Hugging Face model "
                   "directory, a run's final/ (it must carry its tokenizer) or a Hub id")
    add_revision_argument(p)
    takes_model(p, "model")
    p.add_argument("--data", nargs="+", metavar="FILE", help="conversation files (.json, .jsonl, .parquet, a "
                   "datasets folder); default: the built-in instruction data")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"an SFT run config (default: {DEFAULT_CONFIG}, the "
                   "shipped configs/sft/tiny.yaml)")
    p.add_argument("--out", help="the run folder (default: runs/sft-<model folder name>)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters on a frozen base (writes adapter/)")
    p.add_argument("--qlora", action="store_true", help="LoRA on a base quantized to NF4 (double quantization)")
    p.add_argument("--template", help="chat template: a built-in (llama2, llama3, chatml, chatglm2, chatglm3) or "
                   "Jinja source (default: the model's own, else its vocabulary's or family's)")
    p.add_argument("--format", choices=["alpaca", "sharegpt", "openai", "prompt_completion"],
                   help="the records' format (default: detected)")
    p.add_argument("--train-on-prompt", action="store_true", help="train every token, not only the answers")
    p.add_argument("--no-packing", action="store_true", help="one conversation per row, padded (default: packed)")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--resume-or-start", action="store_true", help="like --resume, but start when there is none")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any other config value, e.g. --set lora.r=32 --set eval.n=200 (read as YAML)")
    p.add_argument("--no-progress", action="store_true")


def stage_config(args, check, overrides: dict, flags: dict | None = None) -> tuple[dict, Path]:
    """A stage's run config: the file ``--config`` names (or a shipped one by name), then ``--data``, the
    true boolean ``flags`` (attribute -> dotted key), the ``overrides`` and ``--set``; checked before and
    after, so every argument is checked before the model loads."""
    from lmzoo.cli.pretrain import resolve_config
    from lmzoo.errors import ConfigError
    from lmzoo.stages import pretrain

    path = resolve_config(args.config)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    check(cfg, str(path))
    if args.data:
        pretrain.set_path(cfg, "data.files", list(args.data))
    for attr, (dotted, value) in (flags or {}).items():
        if getattr(args, attr):
            pretrain.set_path(cfg, dotted, value)
    pretrain.apply_overrides(cfg, args, overrides)
    check(cfg, str(path))
    return cfg, path


def build_config(args) -> tuple[dict, Path]:
    from lmzoo.stages import sft

    return stage_config(args, sft.check_config, OVERRIDES, {"train_on_prompt": ("data.train_on_prompt", True),
                                                            "no_packing": ("data.packing", False)})


def run(args) -> int:
    from lmzoo.stages import sft
    from lmzoo.train import TrainingInterrupted

    cfg, path = build_config(args)  # every argument is checked before the model loads
    from lmzoo.interop.hub import repo_id_of

    name = (repo_id_of(args.model) or str(Path(args.model).resolve())).rsplit("/", 1)[-1]  # a snapshot: its id's
    out = Path(args.out) if args.out else Path("runs") / f"sft-{name}"
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_a, **_k: print(f"lmzoo sft: warning: {message}", file=sys.stderr)
            res = sft.run(cfg, args.model, out, lora=args.lora, qlora=args.qlora, resume=args.resume,
                          resume_or_start=args.resume_or_start, source=str(path))
    except TrainingInterrupted as e:
        where = f"checkpoint {e.checkpoint}" if e.checkpoint else "no checkpoint written"
        print(f"lmzoo sft: interrupted at step {e.step}; {where}; continue with: {resume_command(args, out)}",
              file=sys.stderr)
        return 130
    ev = res.train.eval or {}
    parts = [f"trained {res.train.step} steps"]
    if "loss" in ev:
        parts.append(f"held-out response loss {ev['loss']:.4f}")
    if res.accuracy_after is not None:
        before = f"{res.accuracy_before:.1%} -> " if res.accuracy_before is not None else ""
        parts.append(f"accuracy {before}{res.accuracy_after:.1%}")
    print("; ".join(parts) + f"; final model in {res.final_dir}"
          + (f", adapter in {res.adapter_dir}" if res.adapter_dir else ""), file=sys.stderr)
    print(res.final_dir)
    return 0


def resume_command(args, out: Path) -> str:
    words = ["lmzoo", "sft", "--model", args.model, "--config", args.config]
    if args.data:
        words += ["--data", *args.data]
    for attr in OVERRIDES:
        if getattr(args, attr) is not None:
            words += ["--" + attr.replace("_", "-"), str(getattr(args, attr))]
    for flag in ("lora", "qlora", "train_on_prompt", "no_packing", "no_progress"):
        if getattr(args, flag):
            words.append("--" + flag.replace("_", "-"))
    for item in args.set:
        words += ["--set", item]
    return shlex.join(words + ["--out", str(out), "--resume"])
