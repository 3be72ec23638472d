"""GRPO with verifiable rewards (DeepSeekMath): sample a group of responses per prompt, score them,
and push each response's log-probability up by how much better than its group it scored.

  lmzoo grpo --model runs/sft/final --out runs/grpo                        # built-in tasks, task:all
  lmzoo grpo --model DIR --reward task:add --set 'data.builtin={kinds: [add], level: easy}' --out runs/add
  lmzoo grpo --model DIR --data prompts.jsonl --reward mypkg.rewards:brevity --out runs/grpo
  lmzoo grpo --model DIR --reward runs/rm/final --lora --out runs/grpo-rm  # a reward model
  lmzoo grpo --model DIR --out runs/grpo --resume

--reward: task:NAME (1 when lmzoo.data.tasks.check accepts the reply; NAME a kind or all),
module:function (called as function(prompts, responses, **ctx) -> one float per response), or a reward
model directory (lmzoo reward's final/). --data: JSONL of {"prompt": text or messages} records, with
"kind" and "answer" for task: rewards; other fields reach the reward as ctx["records"]. The log has
reward/mean, reward/std, kl (to the reference, when beta > 0), entropy, clip_fraction,
response_length and, on the built-in tasks (or --held-out's with --data), the held-out exact-match accuracy
of greedy answers (before the first step and at every evaluation); samples.jsonl holds greedy replies at each
evaluation; grpo.png plots reward, KL and accuracy. One process, or torchrun with --parallel ddp or
fsdp (FSDP2: the ranks decode in step). See docs/rl.md.
"""

from __future__ import annotations

from pathlib import Path

from lmzoo.cli.common import add_revision_argument, add_run_flags, run_stage, takes_model

HELP = "GRPO (group relative policy optimisation) with verifiable rewards, reward functions or a reward model"
OVERRIDES = {"steps": "train.steps", "seed": "train.seed", "save_every": "train.save_every", "lr": "train.lr",
             "precision": "train.precision", "device": "train.device", "batch_size": "data.batch_size",
             "template": "data.template", "group_size": "rollout.group_size",
             "max_new_tokens": "rollout.max_new_tokens", "temperature": "rollout.temperature",
             "beta": "loss.beta", "reward": "reward.spec", "parallel": "train.parallel", "held_out": "data.held_out"}


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="the starting policy (an SFT run's final/, or any "
                   "causal decoder directory with its tokenizer, or its Hub id)")
    add_revision_argument(p)
    p.add_argument("--reward", metavar="SPEC", help="task:NAME | module:function | a reward-model directory or Hub "
                   "id (default: the config's, task:all)")
    takes_model(p, "model")
    takes_model(p, "reward", strict=False)  # task:NAME and module:function are no Hub ids
    p.add_argument("--data", nargs="+", metavar="FILE", help="prompt files (JSONL {prompt, [kind, answer]}); "
                   "default: the built-in tasks")
    p.add_argument("--held-out", metavar="FILE", help="verifiable tasks (JSONL {prompt, kind, answer}) never trained "
                   "on, whose exact-match accuracy is measured as --data trains (the built-in tasks hold out their own)")
    p.add_argument("--config", default="grpo/tiny", help="run config (default: grpo/tiny, shipped)")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--template", help="chat template (default: the model's own)")
    for flag, kind in (("--steps", int), ("--seed", int), ("--lr", float), ("--batch-size", int),
                       ("--group-size", int), ("--max-new-tokens", int), ("--temperature", float),
                       ("--beta", float), ("--save-every", int)):
        p.add_argument(flag, type=kind)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters; the frozen base is the reference")
    p.add_argument("--qlora", action="store_true", help="LoRA on an NF4 base")
    add_run_flags(p)


def run(args) -> int:
    from lmzoo.cli.sft import stage_config
    from lmzoo.stages import grpo

    cfg, path = stage_config(args, grpo.check_config, OVERRIDES)
    return run_stage("grpo", lambda: grpo.run_grpo(cfg, args.model, Path(args.out), lora=args.lora, qlora=args.qlora,
                                                     resume=args.resume, resume_or_start=args.resume_or_start,
                                                     source=str(path)),
                     ("accuracy", "samples/reward"))
