"""Preference losses: the reward model's Bradley–Terry loss, DPO and its variants, as pure functions
of log-probabilities (or rewards) that return one loss per pair (per example for KTO).

    reward model   L = -log σ(r(x, y_w) − r(x, y_l) [− m])  [+ c · (r(x, y_w) + r(x, y_l))²]
    DPO            L = -log σ(β · h),   h = log π_θ(y_w|x)/π_ref(y_w|x) − log π_θ(y_l|x)/π_ref(y_l|x)

Every DPO-family loss is a function of the one margin h (β · h is the difference of the implicit
rewards r = β · log π_θ/π_ref); SimPO and ORPO need no reference model, KTO scores single completions
against a reference point z_ref. The derivations and the papers are in docs/preference.md.

Callers pass sequence log-probs summed over the completion tokens (``objectives.logprobs``), or the
per-token means where a loss is length-normalised (``PreferenceLoss.length_normalised``: IPO as TRL
computes it, SimPO, ORPO). The functions do not reduce: ``.mean()`` of the result is TRL's loss.
``LOSSES`` names every loss; ``dpo_loss`` takes the reference-based pairwise ones by ``loss_type``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lmzoo.errors import LmzooError


def _check_beta(where: str, beta: float, name: str = "beta") -> None:
    if not beta > 0:
        raise LmzooError(f"{where}: {name} must be > 0, got {beta}")


def _check_same(where: str, **tensors: torch.Tensor) -> torch.Size:
    """All tensors floating and of one shape (one entry per pair); returns that shape."""
    shape = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise LmzooError(f"{where}: {name} must be a floating-point tensor, got {type(t).__name__}"
                             + (f" of {t.dtype}" if isinstance(t, torch.Tensor) else ""))
        if shape is None:
            shape = t.shape
        elif t.shape != shape:
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
            raise LmzooError(f"{where}: the inputs must have one shape (one entry per pair), got {shapes}")
    return shape


# --- pairwise losses of the margin h (β·h = implicit reward of y_w minus that of y_l) ----------------


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): ``-log σ(β·h)``.

    With ``label_smoothing`` ε > 0, conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy
    preferences"): each label is wrong with probability ε, so the target is the ε-smoothed one,
    ``-(1 − ε)·log σ(β·h) − ε·log σ(−β·h)`` (its minimum is at finite h: σ(β·h) = 1 − ε)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise LmzooError(f"sigmoid: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def hinge_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SLiC-HF's calibration loss ``max(0, δ − log P(y_w|x) + log P(y_l|x))`` (Zhao et al. 2023) on the
    reference-normalised likelihoods, as RSO writes it ("hinge-norm", Liu et al. 2024) and TRL computes
    it: ``max(0, 1 − β·h)`` (margin δ = 1/β in units of h)."""
    if label_smoothing:
        raise LmzooError("hinge: label_smoothing is not defined for this loss (use 'sigmoid' or 'robust')")
    return torch.relu(1 - beta * h)


def ipo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): ``(h − 1/(2τ))²`` with τ = ``beta``: a squared loss that
    regresses h to a finite target instead of pushing it to infinity as DPO does on deterministic
    preferences. TRL (and the IPO authors' own runs) take h from per-token mean log-probs: pass those."""
    if label_smoothing:
        raise LmzooError("ipo: label_smoothing is not defined for this loss (use 'sigmoid' or 'robust')")
    return (h - 1 / (2 * beta)) ** 2


def robust_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (rDPO; Chowdhury et al. 2024, §3): with labels flipped with probability ε, the
    unbiased estimate of the clean DPO loss,
    ``[-(1 − ε)·log σ(β·h) + ε·log σ(−β·h)] / (1 − 2ε)``  (ε = ``label_smoothing`` ∈ [0, 0.5)).
    Unlike cDPO it keeps pushing h up (its gradient is DPO's, reweighted), and at ε = 0 it is DPO."""
    if not 0.0 <= label_smoothing < 0.5:
        raise LmzooError(f"robust: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


_PAIRWISE: dict[str, Callable] = {"sigmoid": sigmoid_loss, "hinge": hinge_loss, "ipo": ipo_loss,
                                  "robust": robust_loss}


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss of the reference-based pairwise ``loss_type`` (``sigmoid``, ``hinge``, ``ipo``,
    ``robust``) on the margin ``h = (π_c − ref_c) − (π_r − ref_r)`` of (B,) sequence log-probs."""
    if loss_type not in _PAIRWISE:
        if loss_type in LOSSES:
            raise LmzooError(f"dpo_loss: loss_type '{loss_type}' takes other inputs; call "
                             f"{LOSSES[loss_type].fn.__name__} (LOSSES['{loss_type}'].fn)")
        raise LmzooError(f"dpo_loss: unknown loss_type '{loss_type}'; known: {sorted(_PAIRWISE)} "
                         f"(and {sorted(set(LOSSES) - set(_PAIRWISE))} with their own functions)")
    _check_beta(f"dpo_loss[{loss_type}]", beta)
    _check_same("dpo_loss", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    return _PAIRWISE[loss_type](h, beta, label_smoothing)


# --- reference-free and unpaired losses ---------------------------------------------------------------


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, *, beta: float = 2.0,
               gamma: float = 1.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): no reference model; the reward is the length-normalised
    log-likelihood, and a target margin γ separates the pair:
    ``-log σ(β/|y_w|·log π_θ(y_w|x) − β/|y_l|·log π_θ(y_l|x) − γ)``.
    Pass per-token mean log-probs. Defaults are the paper's range (β = 2, γ/β = 0.5)."""
    _check_beta("simpo_loss", beta)
    _check_same("simpo_loss", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    return -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - gamma)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x ≤ 0 without cancellation (Mächler 2012: switch at −log 2)."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)  # p = 1 exactly would give log 0
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              chosen_nll: torch.Tensor | float, *, beta: float = 0.1) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eqs. 4–7): no reference model; the SFT loss on the chosen response plus
    λ times the odds-ratio loss, ``L_SFT − λ·log σ(log odds_θ(y_w|x) − log odds_θ(y_l|x))`` with
    ``odds_θ(y|x) = P_θ(y|x) / (1 − P_θ(y|x))`` and P the per-token mean likelihood (pass mean log-probs).
    ``chosen_nll`` is the SFT term (a scalar, or one per pair); λ = ``beta`` as TRL names it."""
    _check_beta("orpo_loss", beta, "beta (ORPO's λ)")
    _check_same("orpo_loss", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    if (policy_chosen_logps > 0).any() or (policy_rejected_logps > 0).any():
        raise LmzooError("orpo_loss: log-probs must be <= 0 (the odds need P(y|x) <= 1)")
    c = policy_chosen_logps.to(torch.promote_types(policy_chosen_logps.dtype, torch.float32))
    r = policy_rejected_logps.to(c.dtype)
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))  # eq. 4-5: log of the odds ratio, (B,)
    return chosen_nll - beta * F.logsigmoid(log_odds)


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's z_ref (Ethayarajh et al. 2024, §4.1): the batch estimate of KL(π_θ ‖ π_ref),
    ``max(0, mean_j [log π_θ(y'_j|x_j) − log π_ref(y'_j|x_j)])`` over mismatched pairs (x_j, y'_j)
    (TRL pairs each prompt with the previous example's completion), detached: no gradient flows
    through it. TRL computes the policy side under no_grad too, and under data parallelism averages
    the per-process means before clamping."""
    _check_same("kto_reference_point", policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             reference_point: torch.Tensor | float, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, §4.1) on unpaired data: each completion y is desirable or not,
    with implicit reward r = log π_θ(y|x)/π_ref(y|x) and reference point z = ``reference_point``::

        λ_D · (1 − σ(β·(r − z)))   if y is desirable
        λ_U · (1 − σ(β·(z − r)))   if not

    (λ_y − v(x, y) of the paper). Returns one loss per example, in input order; ``.mean()`` is TRL's."""
    _check_beta("kto_loss", beta)
    _check_same("kto_loss", policy_logps=policy_logps, ref_logps=ref_logps)
    if desirable.shape != policy_logps.shape:
        raise LmzooError(f"kto_loss: desirable must have one entry per example {tuple(policy_logps.shape)}, "
                         f"got {tuple(desirable.shape)}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise LmzooError(f"kto_loss: weights must be >= 0, got desirable_weight={desirable_weight}, "
                         f"undesirable_weight={undesirable_weight}")
    r = policy_logps - ref_logps
    z = torch.as_tensor(reference_point, dtype=r.dtype, device=r.device)
    good = desirable.to(torch.bool)
    # 1 − σ(t) = σ(−t): no cancellation when σ(t) is close to 1
    return torch.where(good, desirable_weight * torch.sigmoid(-beta * (r - z)),
                       undesirable_weight * torch.sigmoid(-beta * (z - r)))


# --- reward model -------------------------------------------------------------------------------------


def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                margin: torch.Tensor | None = None, center_coefficient: float | None = None) -> torch.Tensor:
    """Bradley–Terry loss of a reward model (InstructGPT eq. 1; DPO eq. 2), per pair:
    ``-log σ(r_w − r_l − m)`` with an optional margin m per pair (Llama 2, eq. 2), plus
    ``c · (r_w + r_l)²`` with ``center_coefficient`` c, which pulls the rewards to zero mean
    (Eisenstein et al. 2023, eq. 2; they and TRL recommend c = 0.01)."""
    _check_same("reward_loss", chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        _check_same("reward_loss", chosen_rewards=chosen_rewards, margin=margin)
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coefficient is not None:
        if center_coefficient < 0:
            raise LmzooError(f"reward_loss: center_coefficient must be >= 0, got {center_coefficient}")
        loss = loss + center_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return loss


def sft_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The SFT term RPO adds to DPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization",
    eq. 1: L_DPO + α·L_NLL): the chosen responses' negative log-likelihood per token, averaged over every
    response token of the batch, ``-Σ log π_θ(y_w,t | x, y_w,<t) / Σ |y_w|`` (TRL's ``loss_type="sft"``).
    ``token_logps`` and ``mask`` (B, T) as ``objectives.logprobs.token_logps`` gives them."""
    if token_logps.shape != mask.shape:
        raise LmzooError(f"sft_nll: token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} differ")
    m = mask.bool()
    if not bool(m.any()):
        raise LmzooError("sft_nll: no response token in the batch")
    return -token_logps[m].float().mean()


# --- the registry ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceLoss:
    """A loss by name: its function, whether it needs the reference model's log-probs, whether TRL
    (and so a stage that wants its numbers) feeds it per-token mean log-probs instead of sums, and
    whether it takes unpaired examples."""

    fn: Callable
    reference: bool
    length_normalised: bool
    paired: bool = True


LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss(sigmoid_loss, reference=True, length_normalised=False),
    "hinge": PreferenceLoss(hinge_loss, reference=True, length_normalised=False),
    "ipo": PreferenceLoss(ipo_loss, reference=True, length_normalised=True),
    "robust": PreferenceLoss(robust_loss, reference=True, length_normalised=False),
    "simpo": PreferenceLoss(simpo_loss, reference=False, length_normalised=True),
    "orpo": PreferenceLoss(orpo_loss, reference=False, length_normalised=True),
    "kto": PreferenceLoss(kto_loss, reference=True, length_normalised=False, paired=False),
}


def preference_loss(name: str) -> PreferenceLoss:
    if name not in LOSSES:
        raise LmzooError(f"unknown preference loss '{name}'; known: {sorted(LOSSES)}")
    return LOSSES[name]


# --- inputs and logged statistics ---------------------------------------------------------------------


def _mean(t: torch.Tensor) -> float:
    return t.detach().float().mean().item()


def dpo_metrics(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                *, beta: float = 0.1) -> dict[str, float]:
    """The batch statistics TRL logs, under its names: ``rewards/chosen`` and ``rewards/rejected``
    (means of the implicit rewards β·(log π_θ − log π_ref); β·log π_θ without a reference, as TRL's
    CPO/ORPO trainers log them), ``rewards/accuracies`` (share of pairs with r_w > r_l),
    ``rewards/margins`` (mean r_w − r_l), ``logps/chosen``, ``logps/rejected`` (mean policy log-probs)."""
    _check_beta("dpo_metrics", beta)
    _check_same("dpo_metrics", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise LmzooError("dpo_metrics: pass both reference log-probs or neither")
    c, r = policy_chosen_logps.detach(), policy_rejected_logps.detach()
    if ref_chosen_logps is not None:
        _check_same("dpo_metrics", policy_chosen_logps=c, ref_chosen_logps=ref_chosen_logps,
                    ref_rejected_logps=ref_rejected_logps)
        rc, rr = beta * (c - ref_chosen_logps.detach()), beta * (r - ref_rejected_logps.detach())
    else:
        rc, rr = beta * c, beta * r
    return {"rewards/chosen": _mean(rc), "rewards/rejected": _mean(rr),
            "rewards/accuracies": _mean((rc > rr).float()), "rewards/margins": _mean(rc - rr),
            "logps/chosen": _mean(c), "logps/rejected": _mean(r)}


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """What TRL's RewardTrainer logs: ``accuracy`` (r_w > r_l), ``margin`` (mean r_w − r_l) and the
    ``min_reward`` / ``mean_reward`` / ``max_reward`` over both sides."""
    _check_same("reward_metrics", chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    both = torch.cat([c.reshape(-1), r.reshape(-1)])
    return {"accuracy": _mean((c > r).float()), "margin": _mean(c - r), "min_reward": both.min().item(),
            "mean_reward": both.mean().item(), "max_reward": both.max().item()}


def kto_metrics(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
                reference_point: torch.Tensor | float, *, beta: float = 0.1) -> dict[str, float]:
    """TRL's KTO statistics: ``kl`` (z_ref), ``rewards/chosen`` / ``rewards/rejected`` and
    ``logps/chosen`` / ``logps/rejected`` over the desirable / undesirable examples (a side with no
    example is left out), ``rewards/margins`` when both sides are present."""
    _check_beta("kto_metrics", beta)
    _check_same("kto_metrics", policy_logps=policy_logps, ref_logps=ref_logps)
    good = desirable.to(torch.bool)
    rewards = beta * (policy_logps - ref_logps).detach()
    out = {"kl": float(torch.as_tensor(reference_point))}
    for side, sel in (("chosen", good), ("rejected", ~good)):
        if sel.any():
            out[f"rewards/{side}"] = _mean(rewards[sel])
            out[f"logps/{side}"] = _mean(policy_logps[sel])
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
