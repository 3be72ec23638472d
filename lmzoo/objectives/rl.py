"""RL losses for language models as pure functions: PPO with a reward model and a value head, GRPO with
verifiable rewards, and the pieces both share (KL estimators, GAE, whitening, the KL controller).

    PPO    L = −E_t[min(ρ_t·Â_t, clip(ρ_t, 1 − ε, 1 + ε)·Â_t)],  ρ_t = π_θ(y_t|·) / π_old(y_t|·)   (PPO eq. 7)
    GRPO   the same clipped surrogate per token, Â_{i,t} = group-normalised reward of completion i,
           minus β·KL_k3(π_θ ‖ π_ref) per token, aggregated over tokens and sequences  (DeepSeekMath eq. 3)

Every tensor is (B, T) over *response tokens only*, right-padded, with a ``mask`` (bool or 0/1) that
is true on real tokens: ``logp[b, t]`` is log π(y_t | x, y_<t) of the t-th response token, as
``objectives.logprobs.token_logps`` gives it once the prompt columns are dropped (``lmzoo.rl.rollout``
lays rollouts out that way). Padding never reaches a result, even where it holds inf or NaN: masked
positions are selected away with ``torch.where``, not multiplied by 0.

Aggregation is where GRPO's variants differ (``GRPO_AGGREGATIONS``: ``grpo``, ``bnpo``, ``dr_grpo``,
``dapo``, with TRL 1.16's meanings); where TRL 1.16 departs from the papers is said at each function.
PPO's functions reduce to the token mean over the batch, as OpenAI's lm-human-preferences and TRL's
former PPOTrainer did. Statistics come back as floats under TRL's names. No function divides by the
number of gradient-accumulation steps: that is the training loop's (TRL divides ``grpo``, ``bnpo`` and
``dr_grpo`` by it inside its loss, and folds it into ``dapo``'s token count).
"""

from __future__ import annotations

from typing import Callable

import torch

from lmzoo.errors import LmzooError

# --- inputs and masked reductions -------------------------------------------------------------------------


def _check(where: str, mask: torch.Tensor, **tensors: torch.Tensor | None) -> torch.Tensor:
    """Floating tensors of the mask's (B, T) shape; returns the mask as bool."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise LmzooError(f"{where}: mask must be a (B, T) tensor, got "
                         + (f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__))
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise LmzooError(f"{where}: {name} must be a floating-point tensor, got "
                             + (str(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__))
        if t.shape != mask.shape:
            raise LmzooError(f"{where}: {name} has shape {tuple(t.shape)}, expected the mask's (B, T) "
                             f"{tuple(mask.shape)}")
    return mask.bool()


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    x = torch.where(mask.bool(), x, 0.0)  # not x * mask: a pad holding inf would give NaN
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the true positions of mask (over ``dim``, or all); 0 where there are none."""
    n = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / n.clamp(min=1)


def _item(t: torch.Tensor) -> float:
    return t.detach().float().item()


# --- KL(π_θ ‖ π_ref) per token, from tokens sampled from π_θ ----------------------------------------------


def _k1(log_r: torch.Tensor) -> torch.Tensor:
    return -log_r


def _k2(log_r: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_r ** 2


def _k3(log_r: torch.Tensor) -> torch.Tensor:
    return torch.expm1(log_r) - log_r  # r − 1 − log r without the cancellation of exp(x) − 1 near 0


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1",
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) per-token estimate of KL(π_θ ‖ π_ref) for tokens y ~ π_θ (Schulman 2020, "Approximating KL
    divergence"), with r = π_ref(y)/π_θ(y), i.e. log r = ref_logp − logp:

        k1 = −log r                unbiased, negative on some tokens  (the InstructGPT / Ziegler penalty)
        k2 = ½ (log r)²            biased, ≥ 0, low variance
        k3 = (r − 1) − log r       unbiased, ≥ 0  (DeepSeekMath eq. 4; TRL's GRPO)

    ``mask`` zeroes the padding."""
    if kind not in KL_ESTIMATORS:
        raise LmzooError(f"kl_estimate: unknown kind '{kind}'; known: {sorted(KL_ESTIMATORS)}")
    if logp.shape != ref_logp.shape:
        raise LmzooError(f"kl_estimate: logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ")
    kl = KL_ESTIMATORS[kind](ref_logp - logp)
    if mask is not None:
        kl = torch.where(_check("kl_estimate", mask, logp=logp), kl, 0.0)
    return kl


def token_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) entropy of each token distribution, H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v, in
    float32, 0 off ``mask``; pass the logits already divided by the sampling temperature (as TRL does).
    For logging (``masked_mean`` of it is TRL's ``entropy``); this form never evaluates 0·log 0."""
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    ent = torch.logsumexp(z, dim=-1) - (p * z.nan_to_num(neginf=0.0)).sum(-1)  # (B, T)
    if mask is not None:
        if mask.shape != ent.shape:
            raise LmzooError(f"token_entropy: mask {tuple(mask.shape)} must be the logits' (B, T) {tuple(ent.shape)}")
        ent = torch.where(mask.bool(), ent, 0.0)
    return ent


# --- PPO with a reward model and a value head ----------------------------------------------------------------


def shaped_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float, kind: str = "k1") -> torch.Tensor:
    """(B, T) per-token rewards of RLHF (Ziegler et al. 2019, eq. 2; InstructGPT eq. 2):
    R(x, y) = r(x, y) − β·log π_θ(y|x)/π_ref(y|x), spread over tokens as −β·KL_t at every response token
    plus the reward model's (B,) ``scores`` at the last one. k1 is the papers' log-ratio."""
    m = _check("shaped_rewards", mask, logp=logp, ref_logp=ref_logp)
    if scores.shape != (m.shape[0],):
        raise LmzooError(f"shaped_rewards: scores must be (B,) = ({m.shape[0]},), got {tuple(scores.shape)}")
    lengths = m.sum(-1)
    if bool((lengths == 0).any()):
        raise LmzooError("shaped_rewards: a row has no response token to carry its score")
    rewards = -kl_coef * kl_estimate(logp, ref_logp, kind, mask=m)  # (B, T)
    last = (torch.arange(m.shape[1], device=m.device) * m).argmax(-1, keepdim=True)  # (B, 1): last real token
    return rewards.scatter_add(1, last, scores.to(rewards.dtype).unsqueeze(-1))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) over right-padded response
    tokens: δ_t = r_t + γ·V_{t+1} − V_t,  Â_t = Σ_l (γλ)^l δ_{t+l},  returns R_t = Â_t + V_t.
    The state after the last response token is terminal (V = 0). Rewards may sit at any token (see
    ``shaped_rewards``). Returns ((B, T) advantages, (B, T) returns), 0 off the mask, without gradient:
    they are targets."""
    m = _check("gae", mask, rewards=rewards, values=values)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise LmzooError(f"gae: gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    if bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise LmzooError("gae: mask must be right-padded (each row's tokens first, then only padding)")
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(m, rewards.detach(), zero)
    v = torch.where(m, values.detach(), zero)  # padding values are terminal: V = 0 past the last token
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])  # (B,)
    for t in reversed(range(v.shape[1])):
        next_v = v[:, t + 1] if t + 1 < v.shape[1] else zero
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = delta + gamma * lam * last  # a pad has δ = 0 and last = 0 behind it, so rows stay separate
        adv[:, t] = last
    return adv, torch.where(m, adv + v, zero)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − μ)/√(σ² + eps) with μ, σ² the mean and unbiased variance over the masked entries of the whole
    batch (lm-human-preferences' and TRL's PPO-era ``masked_whiten``); ``shift_mean=False`` adds μ back (rewards
    are scaled but keep their sign). 0 off the mask."""
    m = _check("whiten", mask, x=x)
    n = m.sum()
    if n < 2:
        raise LmzooError(f"whiten: needs at least 2 masked entries, got {int(n)}")
    mean = masked_mean(x, m)
    var = masked_sum((x - mean) ** 2, m) / (n - 1)  # Bessel's correction, as TRL's PPO-era masked_var
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0.0)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated and averaged over the batch's tokens:
    ``mean_t max(−Â_t·ρ_t, −Â_t·clip(ρ_t, 1 − ε, 1 + ε))``, ρ_t = exp(logp − old_logp).
    Â > 0 is clipped above 1 + ε, Â < 0 below 1 − ε; the other side keeps the unclipped (pessimistic) term.
    Stats: ``clip_fraction`` (share of tokens where the clipped term wins, i.e. no gradient) and
    ``approx_kl`` = mean ½(log ρ)², the k2 estimate of KL(π_old ‖ π_θ)."""
    m = _check("ppo_policy_loss", mask, logp=logp, old_logp=old_logp, advantages=advantages)
    if not clip_eps > 0:
        raise LmzooError(f"ppo_policy_loss: clip_eps must be > 0, got {clip_eps}")
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    stats = {"clip_fraction": _item(masked_mean((clipped > unclipped).float(), m)),
             "approx_kl": _item(masked_mean(0.5 * log_ratio.detach() ** 2, m))}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range_value: float | None = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped value loss of OpenAI baselines' ppo2 and TRL's former PPOTrainer (not in the PPO paper, whose eq. 9
    has the plain squared error): ``½ · mean_t max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, ±c) − R_t)²)``.
    ``clip_range_value=None`` gives ½·(V − R)². Stats: ``clip_fraction``, the share where the clipped
    error is the larger."""
    m = _check("ppo_value_loss", mask, values=values, old_values=old_values, returns=returns)
    err = (values - returns) ** 2
    if clip_range_value is None:
        return 0.5 * masked_mean(err, m), {"clip_fraction": 0.0}
    if not clip_range_value > 0:
        raise LmzooError(f"ppo_value_loss: clip_range_value must be > 0 or None, got {clip_range_value}")
    v_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), m)
    return loss, {"clip_fraction": _item(masked_mean((err_clipped > err).float(), m))}


class FixedKLController:
    """β stays ``init_kl_coef``."""

    def __init__(self, init_kl_coef: float):
        if init_kl_coef < 0:
            raise LmzooError(f"kl controller: init_kl_coef must be >= 0, got {init_kl_coef}")
        self.value = float(init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, §2.2: e_t = clip(KL_t / KL_target − 1, −0.2, 0.2), β_{t+1} = β_t·(1 + K_β·e_t),
    with K_β = n_steps / horizon as in their code (lm-human-preferences' AdaptiveKLController): β moves
    by at most 20 % per ``horizon`` samples, up when the measured KL is above target, down below."""

    def __init__(self, init_kl_coef: float, target: float = 6.0, horizon: int = 10000):
        super().__init__(init_kl_coef)
        if not (target > 0 and horizon > 0):
            raise LmzooError(f"adaptive kl controller: target and horizon must be > 0, got {target}, {horizon}")
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


KL_CONTROLLERS: dict[str, type] = {"fixed": FixedKLController, "adaptive": AdaptiveKLController}


def kl_controller(kind: str, init_kl_coef: float, **kw) -> FixedKLController:
    """``kl_controller("adaptive", 0.1, target=6, horizon=10000)``; ``"fixed"`` takes only the β."""
    if kind not in KL_CONTROLLERS:
        raise LmzooError(f"unknown kl controller '{kind}'; known: {sorted(KL_CONTROLLERS)}")
    return KL_CONTROLLERS[kind](init_kl_coef, **kw)


# --- GRPO ------------------------------------------------------------------------------------------------------


def _group_std(g: torch.Tensor) -> torch.Tensor:
    return g.std(dim=1, keepdim=True)  # (n_groups, 1), unbiased: TRL's nanstd applies Bessel's correction


def _batch_std(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(-1).std().expand(g.shape[0], 1)


_REWARD_SCALES: dict[str, Callable | None] = {"group": _group_std, "batch": _batch_std, "none": None}


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """(N,) advantages of N = n_prompts · group_size completions, each prompt's group in consecutive rows:
    Â_i = (r_i − mean(r_group)) / (std(r_group) + ε)  (DeepSeekMath §4.1.2, outcome supervision), the same
    for every token of completion i. ``scale``: ``group`` (the paper), ``batch`` (group mean, the whole
    batch's std: Liu et al. 2025, "Tricks or Traps?"), ``none`` (r_i − mean only: Dr. GRPO, which drops
    the std to remove the question-difficulty bias). The std is unbiased and ε = 1e-4, as in TRL 1.16."""
    if scale not in _REWARD_SCALES:
        raise LmzooError(f"grpo_advantages: unknown scale '{scale}'; known: {sorted(_REWARD_SCALES)}")
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise LmzooError(f"grpo_advantages: rewards must be a (N,) floating tensor, got {tuple(rewards.shape)} "
                         f"{rewards.dtype}")
    if group_size < 2 or rewards.numel() % group_size:
        raise LmzooError(f"grpo_advantages: group_size must be >= 2 and divide N = {rewards.numel()}, got {group_size}")
    if not bool(torch.isfinite(rewards).all()):
        raise LmzooError("grpo_advantages: rewards must be finite")
    g = rewards.reshape(-1, group_size)  # (n_prompts, G)
    adv = g - g.mean(dim=1, keepdim=True)
    std = _REWARD_SCALES[scale]
    if std is not None:
        adv = adv / (std(g) + eps)
    return adv.reshape(-1)


def _seq_mean_then_batch_mean(loss, m, **_):
    return (masked_sum(loss, m, dim=-1) / m.sum(-1).clamp(min=1)).mean()


def _local_token_mean(loss, m, **_):
    return masked_mean(loss, m)


def _constant_length(loss, m, *, max_completion_length=None, **_):
    if max_completion_length is None or max_completion_length < m.shape[1]:
        raise LmzooError(f"grpo_loss[dr_grpo]: max_completion_length must be given and >= the response width "
                         f"{m.shape[1]}, got {max_completion_length}")
    return masked_sum(loss, m) / (m.shape[0] * max_completion_length)


def _global_token_mean(loss, m, *, num_items_in_batch=None, num_processes=1, **_):
    n = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=loss.device)
    return masked_sum(loss, m) / (n.to(loss.dtype).clamp(min=1) / num_processes)


GRPO_AGGREGATIONS: dict[str, Callable] = {"grpo": _seq_mean_then_batch_mean, "bnpo": _local_token_mean,
                                          "dr_grpo": _constant_length, "dapo": _global_token_mean}


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, beta: float, eps_low: float = 0.2,
              eps_high: float | None = None, loss_type: str = "grpo", max_completion_length: int | None = None,
              num_items_in_batch: int | torch.Tensor | None = None, num_processes: int = 1,
              delta: float | None = None, kl_ratio_correction: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's loss (DeepSeekMath eq. 3, negated), per token

        ℓ_{i,t} = −min(ρ_{i,t}·Â_i, clip(ρ_{i,t}, 1 − ε_low, 1 + ε_high)·Â_i) + β·k3_{i,t}

    (ρ = exp(logp − old_logp); decoupled ε_low/ε_high: DAPO's clip-higher, eq. 8; ``delta`` caps ρ in the
    unclipped term too: INTELLECT-2's two-sided clipping; k3 of ``kl_estimate`` against ``ref_logp``,
    eq. 4), aggregated by ``loss_type``::

        grpo     1/B Σ_i 1/|o_i| Σ_t ℓ_{i,t}          the paper's: mean per sequence, then over the batch
        bnpo     Σ_{i,t} ℓ / Σ_i |o_i|                token mean over this (local) batch
        dr_grpo  Σ_{i,t} ℓ / (B · max_completion_length)   Dr. GRPO: a constant, no length bias (TRL's
                 constant is the config's generation cap, not the batch's padded width)
        dapo     Σ_{i,t} ℓ / (num_items_in_batch / num_processes)   DAPO eq. 8's token mean over the
                 *global* batch: ``num_items_in_batch`` counts the response tokens of every process's
                 micro-batches in the accumulation window (default: this batch's); data parallelism then
                 averages the per-process gradients, so the sum over processes is the global token mean.
                 (TRL 1.16 passes the generation batch's count × grad_accum / steps_per_generation.)

    ``kl_ratio_correction`` weighs the KL term by ρ (DeepSeek-V3.2's unbiased KL estimate: the tokens come
    from π_old, so E_old[ρ·k3] is the KL at π_θ, and its gradient the reverse-KL gradient); TRL 1.16 does
    this by default (``use_bias_correction_kl=True``), the GRPO paper does not.

    ``advantages``: (B,) per completion or (B, T) per token. ``old_logp=None``: on-policy (one update per
    rollout), ρ = exp(logp − logp.detach()) = 1 with the policy gradient intact. ``ref_logp`` may be None
    only when β = 0. Returns (loss, stats): ``kl`` (token mean of the KL term, when ref_logp is given) and TRL's
    ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (share of tokens whose
    clipped side is active: ρ < 1 − ε_low with Â < 0, ρ > 1 + ε_high with Â > 0)."""
    if loss_type not in GRPO_AGGREGATIONS:
        raise LmzooError(f"grpo_loss: unknown loss_type '{loss_type}'; known: {sorted(GRPO_AGGREGATIONS)}")
    m = _check("grpo_loss", mask, logp=logp, old_logp=old_logp, ref_logp=ref_logp)
    eps_high = eps_low if eps_high is None else eps_high
    if not (0 < eps_low < 1 and eps_high > 0):
        raise LmzooError(f"grpo_loss: need 0 < eps_low < 1 and eps_high > 0, got {eps_low}, {eps_high}")
    if beta < 0 or (beta > 0 and ref_logp is None):
        raise LmzooError(f"grpo_loss: beta must be >= 0 and needs ref_logp when > 0, got beta={beta}"
                         + (" without ref_logp" if ref_logp is None else ""))
    if num_processes < 1:
        raise LmzooError(f"grpo_loss: num_processes must be >= 1, got {num_processes}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1): one advantage for every token of the completion
    if advantages.shape not in ((m.shape[0], 1), m.shape):
        raise LmzooError(f"grpo_loss: advantages must be (B,) or (B, T) for mask {tuple(m.shape)}, "
                         f"got {tuple(advantages.shape)}")
    old_logp = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old_logp)  # (B, T)
    ratio_clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    ratio_capped = ratio if delta is None else ratio.clamp(max=delta)
    loss = -torch.minimum(ratio_capped * advantages, ratio_clipped * advantages)  # (B, T)
    stats = {}
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, "k3")  # KL to π_ref at the *current* policy, as eq. 3 writes it
        if kl_ratio_correction:
            kl = kl * ratio  # the raw ρ, before any delta cap (and differentiable even where ρ = 1)
        stats["kl"] = _item(masked_mean(kl, m))
        if beta > 0:
            loss = loss + beta * kl
    out = GRPO_AGGREGATIONS[loss_type](loss, m, max_completion_length=max_completion_length,
                                       num_items_in_batch=num_items_in_batch, num_processes=num_processes)
    low = (ratio < 1 - eps_low) & (advantages < 0)
    high = (ratio > 1 + eps_high) & (advantages > 0)
    stats.update({"clip_ratio/low_mean": _item(masked_mean(low.float(), m)),
                  "clip_ratio/high_mean": _item(masked_mean(high.float(), m)),
                  "clip_ratio/region_mean": _item(masked_mean((low | high).float(), m))})
    return out, stats
