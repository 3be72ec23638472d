"""Mixture of experts, DeepSeekMoE style (DeepSeek-V2 section 2.2): shared experts + routed experts.

    h'_t = h_t + Σ_{shared i} FFN_i(h_t) + Σ_{routed i} g_{i,t} · FFN_i(h_t)          eq. 20
    s_{i,t} = softmax_i(h_t · e_i)                                                     eq. 22
    g_{i,t} = s_{i,t} · routed_scaling_factor  if i ∈ TopK(s_t, K_r) else 0            eq. 21

- Routing is a registry (``ROUTINGS``): ``greedy`` is plain top-k; ``group_limited_greedy``
  (device-limited routing, section 2.2.2) first keeps the ``topk_group`` of ``n_group`` expert
  groups whose best expert scores highest, then takes the top-k among their experts.
- ``norm_topk_prob`` renormalises the k chosen weights to sum to 1 before the scaling (every
  DeepSeek-V2 release has it off; transformers' DeepseekV2 router ignores it).
- Dispatch is exact (no capacity, no token ever dropped) and grouped: the (token, slot) pairs are
  sorted by expert, each expert runs one matmul on its contiguous block, and ``index_add_``
  scatters the weighted results back. The only Python loop is over experts.
- In training the router also returns the expert-level balance loss (eq. 23-25); the decoder adds
  ``aux_loss_alpha`` times the sum over layers to the LM loss.

diff from a Mixtral-style MoE: softmax before top-k (not after), no renormalisation by default,
always-on shared experts, fine-grained experts (160 of width 1536 in DeepSeek-V2), group limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from lmzoo.nn.mlp import GatedMLP, activation


@dataclass
class Routing:
    scores: torch.Tensor  # (N, E) float32 softmax over all routed experts
    weights: torch.Tensor  # (N, k) float32 gate values g_{i,t} of the chosen experts
    indices: torch.Tensor  # (N, k) chosen expert ids


def _greedy(scores: torch.Tensor, router: "TopKRouter") -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(scores, k=router.top_k, dim=-1)


def _group_limited_greedy(scores: torch.Tensor, router: "TopKRouter") -> tuple[torch.Tensor, torch.Tensor]:
    N, E = scores.shape
    grouped = scores.view(N, router.n_group, E // router.n_group)  # (N, G, E/G)
    best_groups = grouped.max(dim=-1).values.topk(router.topk_group, dim=-1).indices  # (N, topk_group)
    keep = torch.zeros(N, router.n_group, dtype=torch.bool, device=scores.device)
    keep.scatter_(1, best_groups, True)
    # Experts outside the kept groups score 0 (softmax scores are > 0, so they are never chosen).
    masked = grouped.masked_fill(~keep[..., None], 0.0).view(N, E)
    return torch.topk(masked, k=router.top_k, dim=-1)


ROUTINGS: dict[str, Callable[[torch.Tensor, "TopKRouter"], tuple[torch.Tensor, torch.Tensor]]] = {
    "greedy": _greedy,
    "group_limited_greedy": _group_limited_greedy,
}


class TopKRouter(nn.Module):
    """Softmax gate over the routed experts; its weight is (E, d_model) and runs in float32."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, *, method: str = "greedy",
                 n_group: int | None = None, topk_group: int | None = None, routed_scaling_factor: float = 1.0,
                 norm_topk_prob: bool = False):
        super().__init__()
        if method not in ROUTINGS:
            raise ValueError(f"routing method '{method}' is unknown; known: {sorted(ROUTINGS)}")
        if not 0 < top_k <= n_experts:
            raise ValueError(f"top_k ({top_k}) must be in 1..n_experts ({n_experts})")
        if method == "group_limited_greedy":
            if not n_group or n_experts % n_group:
                raise ValueError(f"n_group ({n_group}) must divide n_experts ({n_experts})")
            if not topk_group or not 0 < topk_group <= n_group or topk_group * (n_experts // n_group) < top_k:
                raise ValueError(f"topk_group ({topk_group}) groups of {n_experts // n_group} experts cannot "
                                 f"hold top_k ({top_k}) experts")
        self.n_experts, self.top_k, self.method = n_experts, top_k, method
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor, self.norm_topk_prob = routed_scaling_factor, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.softmax(dim=-1)
        weights, indices = ROUTINGS[self.method](scores, self)  # (N, k), (N, k)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(scores, weights * self.routed_scaling_factor, indices)


class Experts(nn.Module):
    """E gated MLPs as stacked tensors: gate_up_proj (E, 2·d_expert, d) rows [gate | up], down_proj (E, d, d_expert)."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, act: str = "silu"):
        super().__init__()
        self.n_experts, self.d_expert, self.act_name = n_experts, d_expert, act
        self.act = activation(act)
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_expert, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        # nn.Linear's default init, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        nn.init.uniform_(self.gate_up_proj, -d_model ** -0.5, d_model ** -0.5)
        nn.init.uniform_(self.down_proj, -d_expert ** -0.5, d_expert ** -0.5)

    @property
    def kind(self) -> str:
        return GatedMLP.kind.fget(self)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """FFN_e(x) for (n, d) inputs."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # (n, d_expert) each
        return F.linear(self.act(gate) * up, self.down_proj[e])  # (n, d)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_k weights[t, k] · FFN_{indices[t, k]}(x_t) for (N, d) tokens, grouped by expert."""
        N, k = indices.shape
        flat = indices.reshape(-1)  # (N·k,) expert of each (token, slot)
        order = flat.argsort(stable=True)  # slots grouped by expert, tokens in order within a group
        token = order // k  # (N·k,) token of each sorted slot
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()  # one host sync per layer
        blocks = torch.split(x[token], counts)  # per expert: (n_e, d)
        y = torch.cat([self.expert(e, b) for e, b in enumerate(blocks) if b.shape[0]])  # (N·k, d)
        y = y * weights.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y)


def expert_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int,
                        per_sequence: bool = True) -> torch.Tensor:
    """DeepSeek-V2's expert-level balance loss without α (eq. 23-25): Σ_i f_i · P_i with

        f_i = E / (K·T) · #{(t, slot) routed to i},   P_i = 1/T · Σ_t s_{i,t}

    ``scores`` (B, T, E) and ``indices`` (B, T, K). ``per_sequence`` (the released models'
    ``seq_aux``) computes f and P within each sequence and averages over the batch; otherwise over
    all B·T tokens at once. Perfectly balanced routing with uniform scores gives 1.
    """
    B, T, K = indices.shape
    if per_sequence:
        counts = torch.zeros(B, n_experts, device=scores.device, dtype=scores.dtype)
        counts.scatter_add_(1, indices.reshape(B, T * K), torch.ones(B, T * K, device=scores.device, dtype=scores.dtype))
        f = counts * (n_experts / (K * T))  # (B, E)
        return (f * scores.mean(dim=1)).sum(dim=1).mean()
    counts = torch.bincount(indices.reshape(-1), minlength=n_experts).to(scores.dtype)  # (E,)
    f = counts * (n_experts / (K * B * T))
    return (f * scores.reshape(-1, n_experts).mean(dim=0)).sum()


class MoE(nn.Module):
    """Shared experts (always on) + routed experts; ``aux_loss`` holds the balance loss after a
    training forward (None in eval), for the decoder to collect."""

    def __init__(self, router: TopKRouter, experts: Experts, shared_experts: nn.Module | None = None,
                 n_shared: int = 0, seq_aux: bool = True):
        super().__init__()
        if router.n_experts != experts.n_experts:
            raise ValueError(f"router has {router.n_experts} experts, experts has {experts.n_experts}")
        self.router, self.experts, self.shared_experts = router, experts, shared_experts
        self.n_shared, self.seq_aux = n_shared, seq_aux
        self.aux_loss: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        shared = f"{self.n_shared} shared + " if self.shared_experts is not None else ""
        return f"{self.experts.kind} MoE {shared}{self.router.top_k}/{self.router.n_experts} routed"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        r = self.router(flat)
        y = self.experts(flat, r.indices, r.weights).view(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        self.aux_loss = None
        if self.training:
            self.aux_loss = expert_balance_loss(r.scores.view(B, T, -1), r.indices.view(B, T, -1),
                                                self.router.n_experts, self.seq_aux)
        return y
