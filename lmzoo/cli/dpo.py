"""Direct preference optimisation and its variants: train the policy on preference pairs against a
frozen reference, no reward model and no sampling.

  lmzoo dpo --model runs/sft/final --out runs/dpo                          # built-in pairs, sigmoid (DPO)
  lmzoo dpo --model DIR --data pairs.jsonl --loss ipo --beta 0.1 --lora --out runs/ipo
  lmzoo dpo --model DIR --data pairs.json --loss simpo --beta 2 --set loss.gamma=1 --out runs/simpo
  lmzoo dpo --model DIR --ref runs/sft/final --out runs/dpo                # another reference model
  lmzoo dpo --model DIR --loss kto --data unpaired.jsonl --out runs/kto     # {prompt, completion, label}

--loss: sigmoid (DPO), hinge (SLiC), ipo, robust (rDPO; label_smoothing), simpo and orpo (no
reference), and kto on unpaired examples (TRL's {prompt, completion, label: bool} records, or pairs
split into a desirable and an undesirable example; loss.desirable_weight and loss.undesirable_weight
are λ_D, λ_U; lmzoo.stages.kto). The reference's log-probs are computed once over the data before
the first step. The log lists TRL's statistics (rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected; KTO's kl, its reference point), on held-out data at
every evaluation, and on the built-in data (or --held-out's tasks with --data) the exact-match accuracy
of greedy answers. See
docs/preference.md.
"""

from __future__ import annotations

from pathlib import Path

from lmzoo.cli.reward import OVERRIDES as REWARD_OVERRIDES
from lmzoo.cli.common import run_stage, takes_model
from lmzoo.cli.reward import add_common

HELP = ("DPO and its variants (IPO, hinge, robust, SimPO, ORPO; KTO on unpaired data) on preference data or the "
        "built-in pairs")
OVERRIDES = {**REWARD_OVERRIDES, "loss": "loss.name", "beta": "loss.beta", "held_out": "data.held_out"}


def add_arguments(p) -> None:
    add_common(p, "dpo/tiny")
    p.add_argument("--loss", choices=["sigmoid", "hinge", "ipo", "robust", "simpo", "orpo", "kto"],
                   help="the preference loss (default: the config's, sigmoid)")
    p.add_argument("--beta", type=float, help="β (default: the config's; SimPO's own default is 2)")
    p.add_argument("--ref", metavar="DIR", help="the reference model, a directory or a Hub id (default: the "
                   "starting model)")
    takes_model(p, "ref")
    p.add_argument("--held-out", metavar="FILE", help="verifiable tasks (JSONL {prompt, kind, answer}) never trained "
                   "on, whose greedy exact-match accuracy is measured as --data trains (built-in pairs hold out "
                   "their own)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters; the frozen base is the reference")
    p.add_argument("--qlora", action="store_true", help="LoRA on an NF4 base")


def run(args) -> int:
    from lmzoo.cli.sft import stage_config
    from lmzoo.objectives.preference import preference_loss
    from lmzoo.stages import dpo, kto

    cfg, path = stage_config(args, kto.check_config, OVERRIDES)  # the pairwise checks plus KTO's weights
    paired = preference_loss((cfg.get("loss") or {}).get("name", "sigmoid")).paired
    stage = dpo.run_dpo if paired else kto.run_kto
    return run_stage("dpo", lambda: stage(cfg, args.model, Path(args.out), ref_dir=args.ref, lora=args.lora,
                                          qlora=args.qlora, resume=args.resume,
                                          resume_or_start=args.resume_or_start, source=str(path)),
                     ("rewards/accuracies", "rewards/margins", "accuracy") if paired else
                     ("rewards/margins", "kl", "accuracy"))
