"""Train a reward model: a decoder (an SFT model, usually) plus a scalar head, on preference pairs with
the Bradley–Terry loss -log σ(r_chosen − r_rejected).

  lmzoo reward --model runs/sft/final --out runs/rm                        # built-in pairs
  lmzoo reward --model DIR --data ../shared/data/preference/dpo_zh_demo.json --out runs/rm-zh
  lmzoo reward --model DIR --out runs/rm --resume

Pairs are read as TRL's {prompt, chosen, rejected}, Anthropic HH transcripts or LLaMA-Factory's
{conversations, chosen, rejected}. final/ is transformers' <Arch>ForSequenceClassification layout
(num_labels 1), which AutoModelForSequenceClassification loads; lmzoo.score(final_dir, texts) scores
with it. metrics.jsonl and reward.png hold the loss, the held-out pairwise accuracy and margin and a
reward histogram. See docs/preference.md.
"""

from __future__ import annotations

from pathlib import Path

from lmzoo.cli.common import add_revision_argument, add_run_flags, run_stage, takes_model

HELP = "train a reward model (Bradley–Terry) on preference pairs or the built-in ones"
OVERRIDES = {"steps": "train.steps", "seed": "train.seed", "save_every": "train.save_every", "lr": "train.lr",
             "precision": "train.precision", "device": "train.device", "parallel": "train.parallel",
             "batch_size": "data.batch_size",
             "max_len": "data.max_len", "template": "data.template", "format": "data.format"}


def add_common(p, default_config: str) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="the starting model (an SFT run's final/, or any "
                   "causal decoder directory with its tokenizer, or its Hub id)")
    add_revision_argument(p)
    takes_model(p, "model")
    p.add_argument("--data", nargs="+", metavar="FILE", help="preference files (.json, .jsonl, .parquet, a datasets "
                   "folder); default: built-in pairs (a task's right answer chosen over a wrong one)")
    p.add_argument("--config", default=default_config, help=f"run config (default: {default_config}, shipped)")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--template", help="chat template (default: the model's own, else its vocabulary's or family's)")
    p.add_argument("--format", choices=["sharegpt", "trl", "alpaca", "hh"], help="the records' format (default: detected)")
    for flag, kind in (("--steps", int), ("--seed", int), ("--lr", float), ("--batch-size", int),
                       ("--max-len", int), ("--save-every", int)):
        p.add_argument(flag, type=kind)
    add_run_flags(p)


def add_arguments(p) -> None:
    add_common(p, "reward/tiny")


def run(args) -> int:
    from lmzoo.cli.sft import stage_config
    from lmzoo.stages import preference, reward

    cfg, path = stage_config(args, preference.check_config, OVERRIDES)
    return run_stage("reward", lambda: reward.run_reward(cfg, args.model, Path(args.out), resume=args.resume,
                                                         resume_or_start=args.resume_or_start, source=str(path)),
                     ("accuracy", "margin"))
