"""PPO with a reward model (the InstructGPT recipe): the policy samples replies to prompts, a reward scores
them, a per-token KL penalty holds it near the starting model, and PPO's clipped surrogate with a critic
and GAE improves it.

  lmzoo ppo --model runs/sft/final --reward runs/rm/final --out runs/ppo        # built-in task prompts
  lmzoo ppo --model DIR --reward runs/rm/final --data prompts.jsonl --lora --out runs/ppo-lora
  lmzoo ppo --model DIR --reward task:sort --set ppo.critic=policy --out runs/ppo-verifiable
  lmzoo ppo --model DIR --reward mypkg.rewards:brevity --set kl.controller=adaptive --out runs/ppo
  lmzoo ppo --model DIR --reward runs/rm/final --out runs/ppo --resume

--reward: a reward-model directory (``lmzoo reward``'s final/, scored on the decoded text through its own
tokenizer and chat template), task:NAME (1 for a right answer to a built-in task), or module:function.
The critic starts from the reward model (InstructGPT's choice; --set ppo.critic=policy for a fresh head
on a copy of the policy). Prompts: JSONL {"prompt": ...} records (--data), or the built-in tasks. The log
has reward/mean, kl, kl_coef, entropy, clip_fraction, value_loss, explained_variance per step, the
held-out greedy replies' reward, KL to the reference and accuracy at each evaluation; samples.jsonl holds
greedy replies; ppo.png plots them. See docs/rl.md.
"""

from __future__ import annotations

from pathlib import Path

from lmzoo.cli.common import add_revision_argument, add_run_flags, run_stage, takes_model

HELP = "PPO against a reward model (or task:/module: rewards) with a KL penalty to the starting model"
OVERRIDES = {"steps": "train.steps", "seed": "train.seed", "save_every": "train.save_every", "lr": "train.lr",
             "precision": "train.precision", "device": "train.device", "parallel": "train.parallel",
             "batch_size": "data.batch_size",
             "template": "data.template", "max_new_tokens": "rollout.max_new_tokens", "kl_coef": "kl.coef"}


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="the starting policy (an SFT run's final/, or any "
                   "causal decoder directory with its tokenizer, or its Hub id); also the reference")
    add_revision_argument(p)
    p.add_argument("--reward", required=True, metavar="SPEC", help="a reward-model directory or Hub id, task:NAME "
                   "or module:function")
    takes_model(p, "model")
    takes_model(p, "reward", strict=False)  # task:NAME and module:function are no Hub ids
    p.add_argument("--data", nargs="+", metavar="FILE", help="prompt files (JSONL {\"prompt\": ...}); default: the "
                   "built-in task prompts")
    p.add_argument("--config", default="ppo/tiny", help="run config (default: ppo/tiny, shipped)")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--template", help="the policy's chat template (default: the model's own)")
    p.add_argument("--lora", action="store_true", help="LoRA adapters on the policy (and the critic); the frozen "
                   "base is the reference")
    p.add_argument("--qlora", action="store_true", help="LoRA on an NF4 base")
    for flag, kind in (("--steps", int), ("--seed", int), ("--lr", float), ("--batch-size", int),
                       ("--max-new-tokens", int), ("--kl-coef", float), ("--save-every", int)):
        p.add_argument(flag, type=kind)
    add_run_flags(p)


def run(args) -> int:
    from lmzoo.cli.sft import stage_config
    from lmzoo.stages import ppo

    cfg, path = stage_config(args, ppo.check_config, OVERRIDES)
    return run_stage("ppo", lambda: ppo.run_ppo(cfg, args.model, Path(args.out), reward=args.reward, lora=args.lora,
                                                  qlora=args.qlora, resume=args.resume,
                                                  resume_or_start=args.resume_or_start, source=str(path)),
                     ("reward/mean", "kl", "accuracy"))
