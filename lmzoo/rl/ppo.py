"""PPO's three pieces for the loop (``lmzoo.stages.ppo`` wires them): the rollout buffer (``make_buffer``),
the optimisation step (``ppo_step``) and the held-out evaluation (``heldout_hook``).

    make:  y ~ π_old (lmzoo.rl.rollout) -> r(x, y) -> ref log-probs, V(s_t) -> shaped rewards (−β·KL_t,
           the score at the last token) -> GAE -> whitened advantages; β moves once (the controller)
    step:  PolicyAndCritic forward -> ppo_policy_loss + vf_coef · ppo_value_loss

The buffer is in the losses' layout: (N, R) over the response columns of the rollout (its
``prompt_len`` on; ``lmzoo.stages.rl.response_part``), with ``input_ids`` / ``attention_mask`` (N, T)
for the training forward and 0-dim statistics that every minibatch logs: ``reward/mean``,
``reward/std``, ``kl`` (the mean over the rollout of the per-sequence sum of the penalty's estimator,
what the adaptive controller reads; under DDP the mean over ranks), ``kl_coef`` (the β this rollout
was shaped with), ``response_length``, ``explained_variance`` (1 − Var(R − V_old)/Var(R): how much of
the returns the critic predicted at rollout time) and ``eos_fraction``.
"""

from __future__ import annotations

import torch

from lmzoo.objectives.rl import (gae, kl_estimate, masked_mean, masked_sum, ppo_policy_loss, ppo_value_loss,
                                 shaped_rewards, whiten)
from lmzoo.rl.rollout import rollout
from lmzoo.rl.value import Part, response_values

ROLLOUT_STATS = ("reward/mean", "reward/std", "kl", "kl_coef", "response_length", "explained_variance",
                 "eos_fraction")


def _explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_e = masked_mean((err - masked_mean(err, mask)) ** 2, mask)
    return 1 - var_e / var_r if var_r > 0 else torch.zeros(())


def make_buffer(model, tok, prompts, ids, reward, ref, controller, env, precision: str, o: dict):
    """``make(prompt batch, generator) -> buffer`` for ``RolloutBatches``; ``model`` is the
    ``PolicyAndCritic`` the loop trains, ``ref`` the reference's log-probs (``reference_logps``, or None
    for β = 0), ``o`` the rollout / GAE options."""
    from lmzoo.stages.rl import device_generator, response_part, score
    from lmzoo.train.distributed import all_reduce
    from lmzoo.train.precision import Precision

    autocast = Precision(precision, env.device).autocast

    def make(batch: dict, gen: torch.Generator) -> dict:
        idx = batch["index"].tolist()
        device = next(model.parameters()).device
        g = gen if device.type == "cpu" else device_generator(gen, device)
        policy, critic = Part(model, "policy"), Part(model, "critic")
        with torch.no_grad(), autocast():
            r = rollout(policy, [ids[i] for i in idx], n=o["n"], max_new_tokens=o["max_new_tokens"],
                        temperature=o["temperature"], top_k=o["top_k"], top_p=o["top_p"],
                        eos_token_id=o["stops"] or None, pad_token_id=o["pad"], generator=g, max_len=o["context"])
        rows = [prompts[i] for i in idx for _ in range(o["n"])]
        texts = [tok.decode(x, skip_special_tokens=True) for x in r.response_ids()]
        scores = score(reward, rows, texts, r).to(device)  # (N,)
        P = r.prompt_len
        mask = response_part(r.response_mask, P).bool()  # (N, R)
        logp = response_part(r.logps, P)
        with torch.no_grad(), autocast():
            ref_lp = logp if ref is None else response_part(ref(r.input_ids, r.attention_mask, r.response_mask),
                                                            P).float()
            values = response_values(critic(r.input_ids, r.attention_mask), P).float()  # (N, R) V(s_t)
        beta = controller.value
        rewards = shaped_rewards(scores, logp, ref_lp, mask, beta, o["kl_kind"])
        adv, returns = gae(rewards, values, mask, o["gamma"], o["lam"])
        if o["whiten"]:
            adv = whiten(adv, mask)
        kl = kl_estimate(logp, ref_lp, o["kl_kind"], mask).sum(1).mean()  # per sequence, this rank
        kl = float(all_reduce(kl.reshape(1).double()).item()) / env.world_size  # every rank's β stays the same
        controller.update(kl, len(idx) * o["n"] * env.world_size)
        cpu = {"input_ids": r.input_ids, "attention_mask": r.attention_mask, "mask": mask, "old_logps": logp,
               "ref_logps": ref_lp, "old_values": values, "advantages": adv, "returns": returns, "scores": scores}
        stats = {"reward/mean": scores.mean(), "reward/std": scores.std() if len(scores) > 1 else scores.new_zeros(()),
                 "kl": torch.tensor(kl, dtype=torch.float64), "kl_coef": torch.tensor(beta, dtype=torch.float64),
                 "response_length": r.response_lengths.float().mean(),
                 "explained_variance": _explained_variance(values, returns, mask),
                 "eos_fraction": r.ended_with_eos.float().mean()}
        return {**{k: v.detach().cpu() for k, v in {**cpu, **stats}.items()}, "prompt_len": torch.tensor(P)}

    return make


def ppo_step(temperature: float, clip_eps: float, clip_range_value: float | None, vf_coef: float):
    """``step_fn(model, minibatch) -> (loss, metrics)``: the clipped surrogate on the policy plus
    ``vf_coef`` times the clipped value loss on the critic, both token means over the minibatch."""

    def step_fn(model, b: dict):
        m = b["mask"]
        logps, entropy, values = model(b["input_ids"], b["attention_mask"], int(b["prompt_len"]), temperature)
        pg, ps = ppo_policy_loss(logps, b["old_logps"], b["advantages"], m, clip_eps)
        vf, vs = ppo_value_loss(values, b["old_values"], b["returns"], m, clip_range_value)
        metrics = {"n_tokens": int(m.sum()), "policy_loss": pg.detach(), "value_loss": vf.detach(),
                   "clip_fraction": ps["clip_fraction"], "approx_kl": ps["approx_kl"],
                   "value_clip_fraction": vs["clip_fraction"], "entropy": masked_mean(entropy, m),
                   **{k: b[k] for k in ROLLOUT_STATS}}
        return pg + vf_coef * vf, metrics

    return step_fn


def _reference_logits(policy, ref, lora: bool):
    """``logits(ids, mask, keep)`` of the reference, or None when no reference is kept (β = 0)."""
    if ref is None:
        return None
    if lora:
        from lmzoo.peft import disable_adapters

        def base(ids, am, keep):
            with disable_adapters(policy):
                return policy(ids, attention_mask=am, logits_to_keep=keep).logits
        return base
    frozen = ref.model
    return lambda ids, am, keep: frozen.to(ids.device)(ids, attention_mask=am, logits_to_keep=keep).logits


def sequence_kl(policy, ref_logits, r) -> torch.Tensor:
    """(N,) Σ_t KL(π_θ(·|s_t) ‖ π_ref(·|s_t)) along each response of rollout ``r``, exact over the
    vocabulary (not an estimate from the sampled tokens): a greedy response's KL is well defined."""
    P, T = r.prompt_len, r.input_ids.shape[1]
    keep = T - P + 1
    lp = torch.log_softmax(policy(r.input_ids, attention_mask=r.attention_mask, logits_to_keep=keep).logits[:, :-1]
                           .float(), -1)  # (N, R, V)
    lq = torch.log_softmax(ref_logits(r.input_ids, r.attention_mask, keep)[:, :-1].float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)  # (N, R)
    return masked_sum(kl, r.response_mask[:, P:], dim=1)


def heldout_hook(tok, prompts, ids, reward, ref, lora: bool, env, o: dict):
    """An eval hook: greedy replies to the held-out prompts, their mean reward (``reward/mean``,
    ``reward/std``), the exact KL to the reference along them (``kl``, nats per sequence),
    ``response_length`` and, where the prompts are verifiable tasks, the exact-match ``accuracy``."""
    from lmzoo.data.tasks import check
    from lmzoo.stages.rl import score

    def hook(model) -> dict:
        policy = Part(model, "policy")
        ref_logits = _reference_logits(policy, ref, lora)
        scores, kls, lengths, right = [], [], [], []
        for start in range(0, len(ids), o["batch_size"]):
            chunk = list(range(start, min(start + o["batch_size"], len(ids))))
            r = rollout(policy, [ids[i] for i in chunk], n=1, max_new_tokens=o["max_new_tokens"], temperature=0,
                        eos_token_id=o["stops"] or None, pad_token_id=o["pad"], max_len=o["context"])
            rows = [prompts[i] for i in chunk]
            texts = [tok.decode(x, skip_special_tokens=True) for x in r.response_ids()]
            scores.append(score(reward, rows, texts, r))
            lengths.append(r.response_lengths.float().cpu())
            right += [float(check(p.task, t)) for p, t in zip(rows, texts) if p.task is not None]
            if ref_logits is not None:
                kls.append(sequence_kl(policy, ref_logits, r).cpu())
        s = torch.cat(scores)
        out = {"reward/mean": float(s.mean()), "reward/std": float(s.std()) if len(s) > 1 else 0.0,
               "response_length": float(torch.cat(lengths).mean())}
        if kls:
            out["kl"] = float(torch.cat(kls).mean())
        if right:
            out["accuracy"] = sum(right) / len(right)
        return out

    return hook
