"""``lmzoo dpo``: the policy trained directly on preference pairs with DPO or a variant (``--loss``),
against a frozen reference whose log-probs are computed once over the data before the first step (so
no second model is kept: with LoRA the base is the reference, with ``--ref DIR`` another model is);
KTO (unpaired) is ``lmzoo.stages.kto``. The shared parts are ``lmzoo.stages.preference``'s
(docs/preference.md).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from lmzoo.stages import StageResult
from lmzoo.stages.preference import (_batches, _encode, _made, _name, _over_pairs, _pad_id,
                                     _prepare, _records, policy_sampler, preference_pairs)
from lmzoo.errors import ConfigError
from lmzoo.stages.preference import _extra, _to, reference_model
from lmzoo.stages.sft import attach_lora
from lmzoo.train import Trainer


def run_dpo(cfg: dict, model_dir, out_dir, *, ref_dir=None, lora: bool = False, qlora: bool = False,
            resume: bool = False, resume_or_start: bool = False, source: str = "config") -> StageResult:
    from lmzoo.objectives.preference import dpo_loss, dpo_metrics, orpo_loss, preference_loss, simpo_loss
    from lmzoo.stages.sft import accuracy_hook, save_outputs
    from lmzoo.tokenizers.chat import stop_ids

    cfg, tcfg, out_dir, env, model, tok, fam, data, template = _prepare(cfg, model_dir, out_dir, resume,
                                                                       resume_or_start, source)
    lsec, esec, lora_sec = cfg.get("loss") or {}, cfg.get("eval") or {}, cfg.get("lora") or {}
    name = lsec.get("name", "sigmoid")
    kind = preference_loss(name)
    if not kind.paired:
        raise ConfigError(f"--loss {name} learns from unpaired examples: lmzoo.stages.kto.run_kto trains it "
                          "(lmzoo dpo --loss kto)")
    beta = float(lsec.get("beta", 2.0 if name == "simpo" else 0.1))
    sft_weight = float(lsec.get("sft_weight") or 0.0)
    if sft_weight < 0:
        raise ConfigError(f"{source}: loss.sft_weight must be 0 (off) or positive, got {sft_weight}")
    stops = stop_ids(tok, template)
    pad = _pad_id(tok, stops)
    reference = model if kind.reference else None
    if kind.reference and ref_dir is not None:  # checked before any sampling or log-prob is computed
        reference = reference_model(ref_dir, tok, model)
    train_pairs, val_pairs, eval_tasks, made = preference_pairs(data, tcfg.seed,
                                                                policy_sampler(model, tok, template, cfg, stops, env))
    train_ex, val_ex = _encode(tok, train_pairs, template, data, "train"), _encode(tok, val_pairs, template, data,
                                                                                   "held-out")
    average = kind.length_normalised
    ref = None
    if reference is not None:  # log π_ref of every response, once, before the policy moves
        from lmzoo.objectives.logprobs import response_logps

        logps = lambda m, both: response_logps(m, both["input_ids"], both["labels"], both["attention_mask"], average)  # noqa: E731
        ref = {split: _over_pairs(reference, ex, pad, logps) for split, ex in (("train", train_ex), ("val", val_ex))}
        del reference
    if env.is_main:
        print(f"lmzoo dpo: {fam.name} from {model_dir}; loss {name} (beta {beta}); reference "
              f"{'none' if ref is None else (ref_dir or 'the starting model')}; template {_name(template)}; train "
              f"pairs: {train_ex.summary()}; held out: {val_ex.summary()}{_made(made)}", file=sys.stderr)
    torch.manual_seed(tcfg.seed)
    lora = lora or qlora or bool(lora_sec.get("enabled"))
    if lora:
        attach_lora(model, lora_sec, qlora or bool(lora_sec.get("qlora")))

    def losses(model, b):
        from lmzoo.data.preference import concatenated
        from lmzoo.objectives.logprobs import sequence_logps, token_logps
        from lmzoo.objectives.preference import sft_nll

        both = concatenated(b)
        logits = model(both["input_ids"], attention_mask=both["attention_mask"]).logits
        pc, pr = sequence_logps(logits, both["labels"], average=average).chunk(2)
        rc, rr = (b["ref_chosen"], b["ref_rejected"]) if ref is not None else (None, None)
        if name == "simpo":
            per_pair = simpo_loss(pc, pr, beta=beta, gamma=float(lsec.get("gamma", 1.0)))
        elif name == "orpo":
            nll = -sequence_logps(logits[: len(pc)], both["labels"][: len(pc)], average=True).mean()
            per_pair = orpo_loss(pc, pr, nll, beta=beta)
        else:
            per_pair = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=name,
                                label_smoothing=float(lsec.get("label_smoothing", 0.0)))
        loss = per_pair.mean()
        if sft_weight:  # RPO: + α · the chosen answers' NLL, which keeps their likelihood from sinking
            n = len(pc)
            loss = loss + sft_weight * sft_nll(*token_logps(logits[:n], both["labels"][:n]))
        return loss, dpo_metrics(pc, pr, rc, rr, beta=beta)

    def step_fn(model, b):
        loss, metrics = losses(model, b)
        return loss, {"n_tokens": int(b["chosen_input_ids"].shape[0]), **metrics}

    def held_out(model) -> dict:  # every rank scores every pair: the same forwards (FSDP), the same numbers
        totals, n = {}, 0
        whole = replace(env, rank=0, world_size=1)
        for b in _batches(val_ex, 16, whole, tcfg, pad, shuffle=False, **_extra(ref, "val")):
            _, m = losses(model, _to(b, model))
            k = int(b["chosen_input_ids"].shape[0])
            for key, v in m.items():
                totals[key] = totals.get(key, 0.0) + float(v) * k
            n += k
        return {key: v / n for key, v in totals.items()}

    hooks = [held_out]
    if eval_tasks and esec.get("accuracy", True):
        context = getattr(model.config, "max_positions", None)
        hooks.append(accuracy_hook(tok, eval_tasks, template, esec, stops, context))
    tcfg.extra = {**tcfg.extra, "stage": "dpo", "family": fam.name, "model": str(model_dir), "loss": name,
                  "beta": beta, "reference": str(ref_dir or model_dir) if ref is not None else None, "lora": lora}
    trainer = Trainer(model, _batches(train_ex, data.get("batch_size", 16), env, tcfg, pad, **_extra(ref, "train")),
                      step_fn, tcfg, out_dir, env=env, eval_hooks=hooks)
    result = trainer.fit(resume=resume or resume_or_start, start_if_missing=resume_or_start)
    final, adapter = save_outputs(trainer, model_dir, tok, template, out_dir, lora, env)
    if env.is_main:
        plot_dpo(out_dir / "metrics.jsonl", out_dir / "dpo.png")
    return StageResult(result, final, adapter, result.initial_eval, result.eval, train_ex.summary())



def plot_dpo(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _records(metrics)
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and "loss" in r]
    ev = [r for r in rows if r.get("split") == "eval"]
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
    if train:
        ax[0].plot(*zip(*train))
    ax[0].set_title("preference loss"), ax[0].set_xlabel("step")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        pts = [(r["step"], r[key]) for r in ev if key in r]
        if pts:
            ax[1].plot(*zip(*pts), "o-", label=key)
    ax[1].legend(), ax[1].set_title("held-out implicit rewards"), ax[1].set_xlabel("step")
    for key in ("rewards/accuracies", "accuracy"):
        pts = [(r["step"], r[key]) for r in ev if key in r]
        if pts:
            ax[2].plot(*zip(*pts), "o-", label={"accuracy": "greedy answers right"}.get(key, key))
    if ax[2].get_legend_handles_labels()[0]:  # unpaired data on files: nothing drawn here
        ax[2].legend()
    ax[2].set_ylim(0, 1), ax[2].set_title("held-out"), ax[2].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
