"""``lmzoo grpo``: group relative policy optimisation with verifiable rewards (DeepSeekMath, Shao et al. 2024).

    each prompt --rollout, G samples--> G responses --reward--> r_1..r_G --group-normalise--> Â_i
    --> GRPO's clipped surrogate per token − β·KL_k3(π_θ ‖ π_ref)      (DeepSeekMath eq. 3; docs/rl.md)

No value model: the advantage of a response is its reward against its group's (``grpo_advantages``).
The rollouts are the loop's batches (``lmzoo.rl.buffer.RolloutBatches``): every ``epochs × minibatches``
optimizer steps a fresh rollout of ``data.batch_size`` responses (``data.batch_size / group_size``
prompts) is sampled with the current policy, scored, and its advantages, recorded log-probs and the
reference's log-probs kept; each step then takes one minibatch of it. The importance ratio's old
policy is the rollout's own (its recorded log-probs; with one step per rollout the update is on-policy
and the ratio is exactly 1, TRL's choice). Prompts, reference, parallelism and the plot are
``lmzoo.stages.rl``'s.

A run config (``configs/grpo/tiny.yaml``) has the sections
  data:    files (JSONL prompts; empty: built-in tasks), held_out (a JSONL of verifiable tasks whose accuracy
           is measured as it trains, with files), template, batch_size (responses per rollout, all ranks),
           builtin: {n, n_eval, lang, level, kinds, seed, translation_fraction}
  rollout: group_size (G), max_new_tokens, temperature, top_p, top_k, epochs (μ), minibatches
  reward:  spec (task:NAME | module:function | reward-model dir | a list), format_reward,
           missing_eos_penalty, length_target, length_penalty
  loss:    beta, eps_low, eps_high, loss_type (grpo | bnpo | dr_grpo | dapo), scale (group | batch |
           none), kl_ratio_correction
  lora, eval (accuracy, n, max_new_tokens, batch_size, samples), train: as in SFT
The run folder is SFT's contract plus grpo.png (reward, KL, accuracy) and samples.jsonl.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lmzoo.errors import ConfigError
from lmzoo.stages import rl
from lmzoo.stages import StageResult
from lmzoo.train import TrainConfig, Trainer

SECTIONS = {"data": {"files", "held_out", "template", "batch_size", "builtin"},
            "rollout": {"group_size", "max_new_tokens", "temperature", "top_p", "top_k", "epochs", "minibatches"},
            "reward": {"spec", "format_reward", "missing_eos_penalty", "length_target", "length_penalty"},
            "loss": {"beta", "eps_low", "eps_high", "loss_type", "scale", "kl_ratio_correction"},
            "lora": {"enabled", "qlora", "r", "alpha", "dropout", "targets", "rslora"},
            "eval": {"accuracy", "n", "max_new_tokens", "batch_size", "samples"},
            "train": None}
INTEGERS = {"data": ("batch_size",), "rollout": ("group_size", "max_new_tokens", "epochs", "minibatches"),
            "eval": ("n", "max_new_tokens", "batch_size")}



def check_config(cfg: dict, source: str = "config") -> None:
    from lmzoo.objectives.rl import GRPO_AGGREGATIONS, _REWARD_SCALES
    from lmzoo.stages.pretrain import check_sections

    check_sections(cfg, SECTIONS, source, "a GRPO", INTEGERS)
    rl.check_builtin(cfg.get("data") or {}, source)
    if (cfg.get("data") or {}).get("held_out") and not cfg["data"].get("files"):
        raise ConfigError(f"{source}: data.held_out is for prompts from files (--data); the built-in tasks hold "
                          "out their own")
    ro, loss = cfg.get("rollout") or {}, cfg.get("loss") or {}
    if ro.get("group_size", 8) < 2:
        raise ConfigError(f"{source}: rollout.group_size must be at least 2 (GRPO compares a prompt's responses), "
                          f"got {ro['group_size']}")
    t = ro.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
        raise ConfigError(f"{source}: rollout.temperature must be > 0 (GRPO samples), got {t!r}")
    if loss.get("loss_type", "grpo") not in GRPO_AGGREGATIONS:
        raise ConfigError(f"{source}: loss.loss_type must be one of {sorted(GRPO_AGGREGATIONS)}, got "
                          f"{loss['loss_type']!r}")
    if loss.get("scale", "group") not in _REWARD_SCALES:
        raise ConfigError(f"{source}: loss.scale must be one of {sorted(_REWARD_SCALES)}, got {loss['scale']!r}")
    beta = loss.get("beta", 0.04)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
        raise ConfigError(f"{source}: loss.beta must be a number >= 0 (0: no reference), got {beta!r}")
    batch, g = (cfg.get("data") or {}).get("batch_size", 32), ro.get("group_size", 8)
    if batch % g:
        raise ConfigError(f"{source}: data.batch_size {batch} (responses per rollout) is not a multiple of "
                          f"rollout.group_size {g}: each prompt's group of {g} must be whole")


def run_grpo(cfg: dict, model_dir, out_dir, *, reward=None, lora: bool = False, qlora: bool = False,
             resume: bool = False, resume_or_start: bool = False, source: str = "config") -> StageResult:
    """GRPO from the model in ``model_dir`` into ``out_dir``; ``reward`` (a spec or a callable) overrides
    the config's ``reward.spec``."""
    from lmzoo.objectives.rl import grpo_advantages, grpo_loss, masked_mean
    from lmzoo.rl.buffer import RolloutBatches
    from lmzoo.rl.rewards import load_reward
    from lmzoo.rl.rollout import rollout, sequence_token_logps
    from lmzoo.stages.pretrain import check_resume
    from lmzoo.stages.sft import accuracy_hook, attach_lora, load_model, pick_template, save_outputs
    from lmzoo.tokenizers.chat import stop_ids
    from lmzoo.train.distributed import all_reduce, setup

    cfg = copy.deepcopy(cfg)
    check_config(cfg, source)
    data, ro, rsec, lsec = (cfg.get(k) or {} for k in ("data", "rollout", "reward", "loss"))
    esec, lora_sec = cfg.get("eval") or {}, cfg.get("lora") or {}
    tcfg = TrainConfig.from_dict(cfg.get("train"), f"{source}: train")
    out_dir = Path(out_dir)
    check_resume(out_dir, resume, resume_or_start)
    env = setup(tcfg.parallel, tcfg.device)
    G, batch = int(ro.get("group_size", 8)), int(data.get("batch_size", 32))
    if batch % (G * env.world_size):
        raise ConfigError(f"data.batch_size {batch} is not a multiple of group_size {G} × {env.world_size} ranks: "
                          "each rank samples whole groups")
    max_new, tau = int(ro.get("max_new_tokens", 16)), float(ro.get("temperature", 1.0))
    beta, loss_type = float(lsec.get("beta", 0.04)), lsec.get("loss_type", "grpo")
    spec = reward if reward is not None else rsec.get("spec", "task:all")

    model, tok, fam = load_model(model_dir)
    template = pick_template(tok, data.get("template"), fam)
    stops = stop_ids(tok, template)
    pad = tok.pad_id if tok.pad_id is not None else (stops[0] if stops else 0)
    context = getattr(model.config, "max_positions", None)
    prompts = rl.rl_prompts(data, tcfg.seed)
    if rl.needs_tasks(spec) and any(p.task is None for p in prompts.train):
        raise ConfigError(f"reward {spec}: a task: reward needs each prompt's task; give the --data records "
                          "'kind' and 'answer' fields, or use a module:function reward")
    ids = rl.encode_prompts(tok, prompts.train, template, context, max_new)
    per_rank = batch // G // env.world_size
    if len(ids) < per_rank * env.world_size:
        raise ConfigError(f"{len(ids)} prompts are fewer than one rollout's {batch // G} (data.batch_size {batch} / "
                          f"group_size {G})")
    reward_fn = load_reward(spec, tokenizer=tok, format_reward=float(rsec.get("format_reward", 0.0)),
                            missing_eos_penalty=float(rsec.get("missing_eos_penalty", 0.0)),
                            length_target=rsec.get("length_target"),
                            length_penalty=float(rsec.get("length_penalty", 0.0)))
    torch.manual_seed(tcfg.seed)  # the adapters' initial values
    lora = lora or qlora or bool(lora_sec.get("enabled"))
    note = attach_lora(model, lora_sec, qlora or bool(lora_sec.get("qlora"))) if lora else "full finetuning"
    ref = rl.reference_logps(model, beta=beta, lora=lora, temperature=tau)
    epochs, minibatches = int(ro.get("epochs", 1)), int(ro.get("minibatches", 1))
    on_policy = epochs * minibatches == 1  # every step samples afresh: old = current, ρ = 1 exactly
    policy = model  # the unwrapped module: rollouts never go through DDP (FSDP2 shards this module in place)

    def make(prompt_batch: dict, gen: torch.Generator) -> dict:
        idx = prompt_batch["index"].tolist()
        device = next(policy.parameters()).device
        r = rollout(policy, [ids[i] for i in idx], n=G, max_new_tokens=max_new, temperature=tau,
                    top_p=ro.get("top_p"), top_k=ro.get("top_k"), eos_token_id=stops or None, pad_token_id=pad,
                    generator=rl.device_generator(gen, device))
        rows = [prompts.train[i] for i in idx for _ in range(G)]  # row k answers prompt idx[k // G]
        texts = [tok.decode(x, skip_special_tokens=True) for x in r.response_ids()]
        rewards = rl.score(reward_fn, rows, texts, r)  # (N,)
        mask = r.response_mask.bool()
        out = {"input_ids": r.input_ids, "attention_mask": r.attention_mask, "response_mask": r.response_mask,
               "old_logps": r.logps, "advantages": grpo_advantages(rewards, G, lsec.get("scale", "group")).to(device),
               "prompt_len": torch.tensor(r.prompt_len), "reward/mean": rewards.mean(), "reward/std": rewards.std(),
               "response_length": r.response_lengths.float().mean(),
               # the sampled tokens' mean −log p: a Monte-Carlo estimate of the per-token entropy at τ
               "entropy": -masked_mean(r.logps, mask)}
        if ref is not None:
            with torch.no_grad():
                out["ref_logps"] = ref(r.input_ids, r.attention_mask, r.response_mask)
        return out

    def step_fn(model, b):
        P = int(b["prompt_len"])
        logp = sequence_token_logps(model, b["input_ids"], b["attention_mask"], b["response_mask"], tau)
        mask = rl.response_part(b["response_mask"], P)
        part = lambda k: rl.response_part(b[k], P) if k in b else None  # noqa: E731
        extra = {}
        if loss_type == "dapo":  # the token mean over every rank's micro-batch (DAPO eq. 8's global mean)
            extra = dict(num_items_in_batch=all_reduce(mask.sum().float()), num_processes=env.world_size)
        loss, stats = grpo_loss(rl.response_part(logp, P), None if on_policy else part("old_logps"), part("ref_logps"),
                                b["advantages"], mask, beta=beta, eps_low=float(lsec.get("eps_low", 0.2)),
                                eps_high=lsec.get("eps_high"), loss_type=loss_type, max_completion_length=max_new,
                                kl_ratio_correction=bool(lsec.get("kl_ratio_correction", False)), **extra)
        metrics = {"n_tokens": int(mask.sum()), "clip_fraction": stats["clip_ratio/region_mean"],
                   **{k: b[k] for k in ("reward/mean", "reward/std", "response_length", "entropy")}}
        if "kl" in stats:
            metrics["kl"] = stats["kl"]
        return loss, metrics

    hooks = []
    if prompts.held_out and esec.get("accuracy", True):
        hooks.append(accuracy_hook(tok, prompts.held_out, template, esec, stops, context))
    trainer = None
    if esec.get("samples", 8):
        hooks.append(rl.samples_hook(tok, prompts.train, ids, stops, reward_fn, out_dir, lambda: trainer.step,
                                     max_new, env, n=int(esec.get("samples", 8))))
    rl.say(env, "grpo", f"{fam.name} from {model_dir}; {note}; G={G}, {batch} responses per rollout, μ={epochs}, "
           f"{minibatches} minibatch(es); reward {spec}; reference "
           f"{'none (beta 0)' if ref is None else 'the LoRA base' if lora else 'the starting model'}; "
           f"prompts: {prompts.summary}")
    tcfg.extra = {**tcfg.extra, "stage": "grpo", "family": fam.name, "model": str(model_dir), "reward": str(spec),
                  "beta": beta, "group_size": G, "loss_type": loss_type, "lora": lora}
    batches = RolloutBatches(rl.prompt_batches(len(ids), per_rank, env, tcfg.seed), make, epochs=epochs,
                             minibatches=minibatches, seed=tcfg.seed)
    trainer = Trainer(model, batches, step_fn, tcfg, out_dir, env=env, eval_hooks=hooks)
    result = trainer.fit(resume=resume or resume_or_start, start_if_missing=resume_or_start)
    final, adapter = save_outputs(trainer, model_dir, tok, template, out_dir, lora, env)
    if env.is_main:
        rl.plot_rl(out_dir / "metrics.jsonl", out_dir / "grpo.png")
    return StageResult(result, final, adapter, result.initial_eval, result.eval, prompts.summary)
