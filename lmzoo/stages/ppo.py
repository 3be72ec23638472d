"""``lmzoo ppo``: the InstructGPT recipe (Ouyang et al. 2022, §3.5; Ziegler et al. 2019) on the shared loop:
a policy sampled on prompts, scored by a reward (a reward model, usually), held near a frozen reference
by a per-token KL penalty, and improved by PPO's clipped surrogate with a learned critic and GAE.

    per rollout (``make``): y ~ π_old(·|x);  r(x, y) at the last token;  r_t −= β·KL_t;  V(s_t) from the
                            critic;  Â = whiten(GAE(γ, λ));  R_t = Â_t + V_t (before whitening)
    per step (``step_fn``): L = PPO-clip(π_θ/π_old, Â)
                            + vf_coef · ½ max((V − R)², (clip(V, V_old ± c) − R)²)

Each loop step is one optimizer step on one minibatch of the current rollout; a rollout serves
``ppo.epochs × ppo.minibatches`` steps (``lmzoo.rl.buffer.RolloutBatches``), then the policy samples a new
one. Equations and code pointers: docs/rl.md. A run config (``configs/ppo/tiny.yaml``) has the sections

  data:    files (JSONL prompt records, ``lmzoo.stages.rl``; empty: built-in task prompts), template,
           batch_size (prompts per rollout, all ranks), val_fraction (files), builtin
  rollout: n (samples per prompt), max_new_tokens, temperature (> 0), top_k, top_p
  ppo:     epochs, minibatches, clip_eps, clip_range_value, vf_coef, gamma, lam, whiten_advantages,
           critic (reward | policy; default: reward with a reward model, else policy; ``lmzoo.rl.value``)
  kl:      kind (k1 | k2 | k3), coef (β, the start with adaptive), controller (fixed | adaptive), target, horizon
  reward:  batch_size, template (the reward model's), format_reward, missing_eos_penalty, length_target,
           length_penalty
  lora:    as in SFT (the critic gets adapters too; its head trains in full)
  eval:    n (held-out prompts), max_new_tokens, batch_size, samples (greedy replies to samples.jsonl)
  train:   every TrainConfig field

**The reference** is a frozen copy of the starting model (with LoRA the frozen base, through
``disable_adapters``); ``lmzoo.stages.rl.reference_logps``. **The KL coefficient** of the adaptive
controller moves once per rollout; its value is part of the data position the loop checkpoints
(``PPOBatches.state_dict``), so ``--resume`` continues with the β the uninterrupted run had.
**Dropout is off** in the policy and the critic (``PolicyAndCritic``), so the ratio starts at exactly 1.
**Parallelism**: DDP (each rank samples its share of the prompts; the KL the controller reads is the
mean over ranks, so every rank keeps the same β). Under FSDP2 the policy and critic are called through
the sharded root (``lmzoo.rl.value.Part``) and the ranks decode in step.

The run folder: metrics.jsonl, checkpoints/ (policy and critic), samples.jsonl, loss.png, ppo.png, final/
(the policy only, with its tokenizer and chat template) and, with LoRA, adapter/.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lmzoo.errors import ConfigError
from lmzoo.rl.buffer import RolloutBatches
from lmzoo.stages import StageResult
from lmzoo.train import TrainConfig, Trainer

SECTIONS = {"data": {"files", "template", "batch_size", "val_fraction", "builtin"},
            "rollout": {"n", "max_new_tokens", "temperature", "top_k", "top_p"},
            "ppo": {"epochs", "minibatches", "clip_eps", "clip_range_value", "vf_coef", "gamma", "lam",
                    "whiten_advantages", "critic"},
            "kl": {"kind", "coef", "controller", "target", "horizon"},
            "reward": {"batch_size", "template", "format_reward", "missing_eos_penalty", "length_target",
                       "length_penalty"},
            "lora": {"enabled", "qlora", "r", "alpha", "dropout", "targets", "rslora"},
            "eval": {"n", "max_new_tokens", "batch_size", "samples"},
            "train": None}
INTEGERS = {"data": ("batch_size",), "rollout": ("n", "max_new_tokens", "top_k"),
            "ppo": ("epochs", "minibatches"), "kl": ("horizon",), "reward": ("batch_size",),
            "eval": ("max_new_tokens", "batch_size")}



def _number(source: str, key: str, v, low=None, high=None, *, open_low: bool = False) -> None:
    """``v`` (when given) a number in [low, high] ((low, high] with ``open_low``), else one ConfigError."""
    if v is None:
        return
    ok = not isinstance(v, bool) and isinstance(v, (int, float))
    ok = ok and (low is None or (v > low if open_low else v >= low)) and (high is None or v <= high)
    if not ok:
        lo, hi = low if low is not None else "-inf", high if high is not None else "inf"
        where = f"{'(' if open_low else '['}{lo}, {hi}]"
        raise ConfigError(f"{source}: {key} must be a number in {where}, got {v!r}")


def check_config(cfg: dict, source: str = "config") -> None:
    from lmzoo.objectives.rl import KL_CONTROLLERS, KL_ESTIMATORS
    from lmzoo.stages.pretrain import check_sections
    from lmzoo.stages.rl import check_builtin

    check_sections(cfg, SECTIONS, source, "a PPO", INTEGERS)
    check_builtin(cfg.get("data") or {}, source)
    ro, ppo, kl = cfg.get("rollout") or {}, cfg.get("ppo") or {}, cfg.get("kl") or {}
    for key, v, low, high, open_low in (
            ("rollout.temperature", ro.get("temperature"), 0, None, True),
            ("rollout.top_p", ro.get("top_p"), 0, 1, True),
            ("ppo.clip_eps", ppo.get("clip_eps"), 0, None, True),
            ("ppo.clip_range_value", ppo.get("clip_range_value"), 0, None, True),
            ("ppo.vf_coef", ppo.get("vf_coef"), 0, None, False), ("ppo.gamma", ppo.get("gamma"), 0, 1, False),
            ("ppo.lam", ppo.get("lam"), 0, 1, False), ("kl.coef", kl.get("coef"), 0, None, False),
            ("kl.target", kl.get("target"), 0, None, True),
            ("data.val_fraction", (cfg.get("data") or {}).get("val_fraction"), 0, 0.99, True)):
        _number(source, key, v, low, high, open_low=open_low)
    for key, v, allowed in (("kl.kind", kl.get("kind"), KL_ESTIMATORS), ("kl.controller", kl.get("controller"),
                                                                         KL_CONTROLLERS),
                            ("ppo.critic", ppo.get("critic"), ("reward", "policy"))):
        if v is not None and v not in allowed:
            raise ConfigError(f"{source}: {key} must be one of {sorted(allowed)}, got {v!r}")
    if not isinstance(ppo.get("whiten_advantages", True), bool):
        raise ConfigError(f"{source}: ppo.whiten_advantages must be true or false, got {ppo['whiten_advantages']!r}")


class PPOBatches(RolloutBatches):
    """``RolloutBatches`` whose saved position also holds the KL coefficient: the one that made the
    current buffer when saved mid-buffer (it is made again on resume, and moves β once more), else the
    one the next rollout uses."""

    def __init__(self, prompts, make, controller, **kw):
        super().__init__(prompts, make, **kw)
        self.controller, self._coef_before = controller, controller.value

    def _refill(self) -> None:
        self._coef_before = self.controller.value
        super()._refill()

    def state_dict(self) -> dict:
        state = super().state_dict()
        return {**state, "kl_coef": self._coef_before if state["used"] else self.controller.value}

    def load_state_dict(self, state: dict) -> None:
        self.controller.value = float(state["kl_coef"])
        super().load_state_dict(state)


def _prompts(data: dict, seed: int, spec, source: str):
    """(training Prompts, held-out Prompts, summary); a file's prompts lose ``val_fraction`` to held-out."""
    from lmzoo.data.sft import split_conversations
    from lmzoo.stages.rl import Prompt, needs_tasks, rl_prompts

    got = rl_prompts(data, seed)
    train, held = got.train, [Prompt(t.prompt, t) for t in got.held_out]
    if data.get("files"):
        train, held = split_conversations(train, float(data.get("val_fraction", 0.05)), seed)
    if needs_tasks(spec) and any(p.task is None for p in train + held):
        raise ConfigError(f"{source}: a task: reward needs verifiable prompts (built-in data, or records with "
                          "'kind' and 'answer')")
    return train, held, got.summary


@dataclass
class PPORun:
    """A PPO run wired and not started: what ``run_ppo`` fits and saves (and tests take apart)."""
    trainer: Trainer
    batches: PPOBatches
    step_fn: object
    summary: str
    tok: object
    template: str
    lora: bool
    env: object


def build(cfg: dict, model_dir, out_dir, *, reward, lora: bool = False, qlora: bool = False,
          resume: bool = False, resume_or_start: bool = False, source: str = "config") -> PPORun:
    """The trainer, its batches and step wired as ``run_ppo`` trains them, before any step."""
    from lmzoo.objectives.rl import kl_controller
    from lmzoo.rl.ppo import heldout_hook, make_buffer, ppo_step
    from lmzoo.rl.rewards import load_reward
    from lmzoo.rl.value import Part, PolicyAndCritic, build_critic
    from lmzoo.stages.pretrain import check_resume
    from lmzoo.stages.rl import encode_prompts, prompt_batches, reference_logps, samples_hook
    from lmzoo.stages.sft import attach_lora, load_model, pick_template
    from lmzoo.tokenizers.chat import stop_ids
    from lmzoo.train.distributed import setup

    cfg = copy.deepcopy(cfg)
    check_config(cfg, source)
    data, ro, pcfg, kcfg = (cfg.get(k) or {} for k in ("data", "rollout", "ppo", "kl"))
    rcfg, lsec, esec = (cfg.get(k) or {} for k in ("reward", "lora", "eval"))
    tcfg = TrainConfig.from_dict(cfg.get("train"), f"{source}: train")
    out_dir = Path(out_dir)
    check_resume(out_dir, resume, resume_or_start)
    env = setup(tcfg.parallel, tcfg.device)
    batch = int(data.get("batch_size", 16))
    if batch % env.world_size:
        raise ConfigError(f"{source}: data.batch_size {batch} (prompts per rollout) is not divisible by "
                          f"{env.world_size} ranks")
    policy, tok, fam = load_model(model_dir)
    template = pick_template(tok, data.get("template"), fam)
    stops = stop_ids(tok, template)
    pad = tok.pad_id if tok.pad_id is not None else (stops[0] if stops else 0)
    context = getattr(policy.config, "max_positions", None)
    reward_dir = reward if isinstance(reward, (str, Path)) and Path(reward).is_dir() else None
    score_fn = load_reward(reward, tokenizer=tok, template=rcfg.get("template"), device=env.device,
                           batch_size=int(rcfg.get("batch_size", 16)),
                           format_reward=float(rcfg.get("format_reward", 0)),
                           missing_eos_penalty=float(rcfg.get("missing_eos_penalty", 0)),
                           length_target=rcfg.get("length_target"),
                           length_penalty=float(rcfg.get("length_penalty", 0)))
    critic_kind = pcfg.get("critic") or ("reward" if reward_dir is not None else "policy")
    critic = build_critic(critic_kind, policy, tok, reward_dir)
    train_p, held_p, summary = _prompts(data, tcfg.seed, reward, source)
    max_new = int(ro.get("max_new_tokens", 32))
    eval_new = int(esec.get("max_new_tokens", max_new))
    train_ids = encode_prompts(tok, train_p, template, context, max_new)
    held_p = held_p[:int(esec.get("n", 100))]
    held_ids = encode_prompts(tok, held_p, template, context, eval_new)
    lora = lora or qlora or bool(lsec.get("enabled"))
    controller = kl_controller(kcfg.get("controller", "fixed"), float(kcfg.get("coef", 0.05)),
                               **({"target": float(kcfg.get("target", 6.0)), "horizon": int(kcfg.get("horizon", 10000))}
                                  if kcfg.get("controller") == "adaptive" else {}))
    temperature = float(ro.get("temperature", 1.0))
    adaptive = kcfg.get("controller") == "adaptive"
    ref = reference_logps(policy, beta=1.0 if adaptive else controller.value, lora=lora, temperature=temperature)
    torch.manual_seed(tcfg.seed)  # the adapters' initial values
    note = "full finetuning"
    if lora:
        note = attach_lora(policy, lsec, qlora or bool(lsec.get("qlora")))
        attach_lora(critic.decoder, lsec, qlora or bool(lsec.get("qlora")))  # its head still trains in full
    model = PolicyAndCritic(policy, critic)
    opts = dict(n=int(ro.get("n", 1)), max_new_tokens=max_new, temperature=temperature, top_k=ro.get("top_k"),
                top_p=ro.get("top_p"), stops=stops, pad=pad, context=context, kl_kind=kcfg.get("kind", "k1"),
                gamma=float(pcfg.get("gamma", 1.0)), lam=float(pcfg.get("lam", 0.95)),
                whiten=bool(pcfg.get("whiten_advantages", True)))
    make = make_buffer(model, tok, train_p, train_ids, score_fn, ref, controller, env, tcfg.precision, opts)
    prompts = prompt_batches(len(train_ids), batch // env.world_size, env, tcfg.seed)
    batches = PPOBatches(prompts, make, controller, epochs=int(pcfg.get("epochs", 4)),
                         minibatches=int(pcfg.get("minibatches", 1)), seed=tcfg.seed)
    step_fn = ppo_step(temperature, float(pcfg.get("clip_eps", 0.2)), pcfg.get("clip_range_value", 0.2),
                       float(pcfg.get("vf_coef", 0.1)))
    hooks, trainer_box = [], []
    if held_p:
        hooks.append(heldout_hook(tok, held_p, held_ids, score_fn, ref, lora, env,
                                  dict(opts, max_new_tokens=eval_new, batch_size=int(esec.get("batch_size", 32)))))
        if int(esec.get("samples", 8)):
            samples = samples_hook(tok, held_p, held_ids, stops, score_fn, out_dir, lambda: trainer_box[0].step,
                                   eval_new, env, n=int(esec.get("samples", 8)))
            hooks.append(lambda m: samples(Part(m, "policy")))  # through the root (FSDP2)
    tcfg.extra = {**tcfg.extra, "stage": "ppo", "family": fam.name, "model": str(model_dir), "reward": str(reward),
                  "critic": critic_kind, "lora": lora, "kl": kcfg}
    if env.is_main:
        print(f"lmzoo ppo: {fam.name} from {model_dir}; {note}; reward {score_fn.name}; critic from the "
              f"{'reward model' if critic_kind == 'reward' else 'policy'}; KL {opts['kl_kind']} β {controller.value} "
              f"({kcfg.get('controller', 'fixed')}); reference {'the frozen base' if lora else 'a frozen copy'}; "
              f"{summary}; {batches.steps_per_rollout} optimizer steps per rollout of {batch} prompts × "
              f"{opts['n']}", file=sys.stderr)
    trainer = Trainer(model, batches, step_fn, tcfg, out_dir, env=env, eval_hooks=hooks)
    trainer_box.append(trainer)
    return PPORun(trainer, batches, step_fn, summary, tok, template, lora, env)


class _PolicyOnly:
    """What ``save_outputs`` needs of a trainer, giving the policy without its critic."""

    def __init__(self, trainer):
        self.trainer = trainer

    def trained_model(self):
        m = self.trainer.trained_model()
        return None if m is None else m.policy


def run_ppo(cfg: dict, model_dir, out_dir, *, reward, lora: bool = False, qlora: bool = False, resume: bool = False,
            resume_or_start: bool = False, source: str = "config") -> StageResult:
    """PPO from the policy in ``model_dir`` against ``reward`` (a reward-model directory, ``task:NAME``,
    ``module:function``, a callable or a list of them; ``lmzoo.rl.rewards``), into ``out_dir``."""
    from lmzoo.stages.sft import save_outputs

    run = build(cfg, model_dir, out_dir, reward=reward, lora=lora, qlora=qlora, resume=resume,
                resume_or_start=resume_or_start, source=source)
    result = run.trainer.fit(resume=resume or resume_or_start, start_if_missing=resume_or_start)
    final, adapter = save_outputs(_PolicyOnly(run.trainer), model_dir, run.tok, run.template, Path(out_dir), run.lora,
                                  run.env)
    if run.env.is_main and run.trainer.cfg.plot:
        plot_ppo(Path(out_dir) / "metrics.jsonl", Path(out_dir) / "ppo.png")
    return StageResult(result, final, adapter, result.initial_eval, result.eval, run.summary)


def plot_ppo(metrics: Path, png: Path) -> None:
    """Rollout reward, KL and β, the critic's fit, and the held-out reward and KL, against the step."""
    from lmzoo.stages.rl import figure

    plt, fig, ax, train, ev = figure(metrics, 4, 18)

    def line(axis, recs, key, label, style="-"):
        pts = [(r["step"], r[key]) for r in recs if key in r]
        if pts:
            axis.plot(*zip(*pts), style, label=label)

    line(ax[0], train, "reward/mean", "rollouts")
    line(ax[0], ev, "reward/mean", "held-out greedy", "o-")
    ax[0].set_title("reward"), ax[0].legend()
    line(ax[1], train, "kl", "rollouts (sequence, the penalty's estimator)")
    line(ax[1], ev, "kl", "held-out greedy (exact, per sequence)", "o-")
    twin = ax[1].twinx()
    line(twin, train, "kl_coef", "β", "--")
    twin.set_ylabel("β (dashed)")
    ax[1].set_title("KL(π_θ ‖ π_ref)"), ax[1].legend(fontsize=7)
    line(ax[2], train, "value_loss", "value loss")
    line(ax[2], train, "explained_variance", "explained variance")
    ax[2].set_title("critic"), ax[2].legend()
    line(ax[3], train, "clip_fraction", "clip fraction")
    line(ax[3], train, "approx_kl", "approx KL(π_old ‖ π_θ)")
    line(ax[3], ev, "accuracy", "held-out exact match", "o-")
    ax[3].set_title("updates"), ax[3].legend(fontsize=7)
    for a in ax:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
