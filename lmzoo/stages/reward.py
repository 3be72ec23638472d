"""``lmzoo reward``: a reward model (the decoder plus a scalar head, transformers'
``<Arch>ForSequenceClassification`` layout) trained on preference pairs with the Bradley–Terry loss
``-log σ(r_chosen − r_rejected)``; held-out pairwise accuracy, margin and a reward histogram
(docs/preference.md). The shared parts (data, config, batches) are ``lmzoo.stages.preference``'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import lmzoo
from lmzoo.errors import ConfigError
from lmzoo.stages import StageResult
from lmzoo.stages.preference import (_batches, _encode, _made, _name, _over_pairs, _pad_id,
                                     _prepare, _records, policy_sampler, preference_pairs)
from lmzoo.train import Trainer


def run_reward(cfg: dict, model_dir, out_dir, *, resume: bool = False, resume_or_start: bool = False,
               source: str = "config") -> StageResult:
    from lmzoo.objectives.preference import reward_loss, reward_metrics
    from lmzoo.tokenizers.chat import resolve_template, stop_ids

    if (cfg.get("data") or {}).get("held_out"):  # a reward model scores pairs; it gives no answers to check
        raise ConfigError(f"{source}: data.held_out (tasks whose greedy answers are checked) is for lmzoo dpo, not "
                          "for a reward model")
    cfg, tcfg, out_dir, env, model, tok, fam, data, template = _prepare(cfg, model_dir, out_dir, resume,
                                                                       resume_or_start, source)
    pad = _pad_id(tok, stop_ids(tok, template), for_reward=True)
    torch.manual_seed(tcfg.seed)  # the score head's initial values
    rm = lmzoo.reward_model(model, pad_token_id=pad)
    sample = policy_sampler(model, tok, template, cfg, stop_ids(tok, template), env)
    train_pairs, val_pairs, _, made = preference_pairs(data, tcfg.seed, sample)
    train_ex, val_ex = _encode(tok, train_pairs, template, data, "train"), _encode(tok, val_pairs, template, data,
                                                                                   "held-out")
    batch = data.get("batch_size", 16)
    center = (cfg.get("loss") or {}).get("center")

    def step_fn(model, b):
        from lmzoo.data.preference import concatenated

        both = concatenated(b)
        r = model(both["input_ids"], attention_mask=both["attention_mask"]).rewards  # (2B,)
        chosen, rejected = r.chunk(2)
        loss = reward_loss(chosen, rejected, center_coefficient=center).mean()
        return loss, {"n_tokens": int(chosen.numel()), **reward_metrics(chosen, rejected)}

    last = {}  # the held-out rewards of the latest evaluation (the final one draws the histogram)

    def held_out(model) -> dict:
        last["rewards"] = _over_pairs(model, val_ex, pad, lambda m, both: m(
            both["input_ids"], attention_mask=both["attention_mask"]).rewards)
        m = reward_metrics(*last["rewards"])
        return {"accuracy": m["accuracy"], "margin": m["margin"]}

    if env.is_main:
        print(f"lmzoo reward: {fam.name} from {model_dir} with a new score head; template "
              f"{_name(template)}; train pairs: {train_ex.summary()}; held out: {val_ex.summary()}"
              f"{_made(made)}", file=sys.stderr)
    tcfg.extra = {**tcfg.extra, "stage": "reward", "family": fam.name, "model": str(model_dir)}
    trainer = Trainer(rm, _batches(train_ex, batch, env, tcfg, pad), step_fn, tcfg, out_dir, env=env,
                      eval_hooks=[held_out])
    result = trainer.fit(resume=resume or resume_or_start, start_if_missing=resume_or_start)
    final, trained = None, trainer.trained_model()  # a collective under FSDP: every rank calls it
    if env.is_main:
        tok.chat_template = resolve_template(template)
        final = lmzoo.save(trained, out_dir / "final", tokenizer=tok)
        plot_reward(out_dir / "metrics.jsonl", *last["rewards"], out_dir / "reward.png")
    return StageResult(result, final, None, result.initial_eval, result.eval, train_ex.summary())



def plot_reward(metrics: Path, chosen: torch.Tensor, rejected: torch.Tensor, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _records(metrics)
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and "loss" in r]
    acc = [(r["step"], r["accuracy"]) for r in rows if r.get("split") == "eval" and "accuracy" in r]
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.6))
    if train:
        ax[0].plot(*zip(*train))
    ax[0].set_title("Bradley–Terry loss"), ax[0].set_xlabel("step")
    if acc:
        ax[1].plot(*zip(*acc), "o-", color="tab:green")
    ax[1].set_ylim(0, 1), ax[1].set_title("held-out pairwise accuracy"), ax[1].set_xlabel("step")
    ax[2].hist(chosen.numpy(), bins=30, alpha=0.6, label="chosen")
    ax[2].hist(rejected.numpy(), bins=30, alpha=0.6, label="rejected")
    ax[2].set_title("held-out rewards (final)"), ax[2].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
