"""DeepSeekMoE: grouped dispatch equals a loop over experts (no token dropped), routing obeys its group
limit and scaling, the balance loss matches hand-computed values."""

import pytest
import torch

from lmzoo.nn.mlp import GatedMLP
from lmzoo.nn.moe import MoE, Experts, TopKRouter, expert_balance_loss

D, E, I = 16, 8, 12


def _moe(top_k=3, shared=True, **router_kw):
    router = TopKRouter(D, E, top_k, **router_kw)
    with torch.no_grad():
        router.weight.normal_(0, 1.0)  # spread the scores so the choice is not a near tie
    return MoE(router, Experts(E, D, I), GatedMLP(D, 2 * I) if shared else None, n_shared=2).eval()


def _loop_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, masked by the routing: Σ_e g_{e,t} · FFN_e(x_t) + shared(x_t)."""
    flat = x.reshape(-1, D)
    r = moe.router(flat)
    gates = torch.zeros(flat.shape[0], E).scatter(1, r.indices, r.weights)  # (N, E), zero off the top-k
    out = torch.zeros_like(flat)
    for e in range(E):
        gate, up = (flat @ moe.experts.gate_up_proj[e].T).chunk(2, -1)
        out += gates[:, e:e + 1] * ((torch.nn.functional.silu(gate) * up) @ moe.experts.down_proj[e].T)
    out = out.view_as(x)
    return out + moe.shared_experts(x) if moe.shared_experts is not None else out


@pytest.mark.parametrize("router_kw", [dict(), dict(method="group_limited_greedy", n_group=4, topk_group=2,
                                                     routed_scaling_factor=2.5)])
def test_dispatch_equals_a_loop_over_experts(router_kw):
    moe = _moe(**router_kw)
    x = torch.randn(3, 11, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _loop_reference(moe, x), atol=1e-5, rtol=0)


def test_no_token_is_dropped_when_every_token_picks_the_same_experts():
    """All 64 tokens routed to experts 0, 1, 2: no capacity limit, every token gets all three."""
    moe = _moe(shared=False)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:3, 0] = torch.tensor([3.0, 2.0, 1.0])
    x = torch.randn(64, 1, D)
    x[..., 0] = x[..., 0].abs() + 1  # the first feature positive: experts 0, 1, 2 win for every token
    with torch.no_grad():
        r = moe.router(x.reshape(-1, D))
        assert sorted(set(r.indices.flatten().tolist())) == [0, 1, 2]
        torch.testing.assert_close(moe(x), _loop_reference(moe, x), atol=1e-5, rtol=0)
        # each token's output is the full weighted sum of its three experts, computed one token at a time
        for t in (0, 37, 63):
            one = sum(w * moe.experts.expert(int(e), x[t]) for w, e in zip(r.weights[t], r.indices[t]))
            torch.testing.assert_close(moe(x)[t], one, atol=1e-5, rtol=0)


def test_group_limited_routing_keeps_to_the_best_groups():
    router = TopKRouter(D, E, 3, method="group_limited_greedy", n_group=4, topk_group=2)
    with torch.no_grad():
        router.weight.normal_(0, 2.0)
    x = torch.randn(50, D)
    r = router(x)
    scores = torch.softmax(x @ router.weight.T, -1)
    for t in range(50):  # the reference, one token at a time: groups ranked by their best expert
        groups = sorted(range(4), key=lambda g: -scores[t, 2 * g:2 * g + 2].max().item())[:2]
        allowed = [e for g in groups for e in (2 * g, 2 * g + 1)]
        best = sorted(allowed, key=lambda e: -scores[t, e].item())[:3]
        assert sorted(r.indices[t].tolist()) == sorted(best)
    torch.testing.assert_close(r.weights, scores.gather(1, r.indices), atol=1e-6, rtol=0)


def test_scaling_and_renormalisation():
    x = torch.randn(20, D)
    plain = TopKRouter(D, E, 3, routed_scaling_factor=16.0)
    r = plain(x)
    torch.testing.assert_close(r.weights, 16.0 * r.scores.gather(1, r.indices))
    normed = TopKRouter(D, E, 3, routed_scaling_factor=2.0, norm_topk_prob=True)
    normed.load_state_dict(plain.state_dict())
    torch.testing.assert_close(normed(x).weights.sum(-1), torch.full((20,), 2.0))


def test_balance_loss_hand_computed():
    # B=1, T=2, E=4, K=1, both tokens on expert 0: f_0 = E/(K·T)·2 = 4, P_0 = (0.7 + 0.5)/2 = 0.6 -> 2.4
    scores = torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1]]])
    idx = torch.tensor([[[0], [0]]])
    assert expert_balance_loss(scores, idx, 4).item() == pytest.approx(2.4)
    assert expert_balance_loss(scores, idx, 4, per_sequence=False).item() == pytest.approx(2.4)
    # uniform scores give exactly 1 whatever the routing
    uni = torch.full((3, 5, 4), 0.25)
    idx = torch.randint(0, 4, (3, 5, 2))
    assert expert_balance_loss(uni, idx, 4).item() == pytest.approx(1.0)
    # per sequence vs per batch: two one-token sequences on experts 0 and 1 (E=2, K=1).
    # per sequence: f = (2, 0) with P = (.9, .1) -> 1.8; f = (0, 2) with P = (.2, .8) -> 1.6; mean 1.7.
    # per batch: f = E/(K·B·T)·counts = (1, 1), P = (.55, .45) -> 1.0.
    scores = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]]])
    idx = torch.tensor([[[0]], [[1]]])
    assert expert_balance_loss(scores, idx, 2).item() == pytest.approx(1.7)
    assert expert_balance_loss(scores, idx, 2, per_sequence=False).item() == pytest.approx(1.0)


def test_aux_loss_only_in_training_and_differentiable():
    moe = _moe()
    x = torch.randn(2, 6, D)
    moe.eval()
    moe(x)
    assert moe.aux_loss is None
    moe.train()
    moe(x)
    assert moe.aux_loss is not None and moe.aux_loss.item() > 0
    moe.aux_loss.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_kind_and_bad_configs():
    assert _moe().kind == "SwiGLU MoE 2 shared + 3/8 routed"
    with pytest.raises(ValueError, match="n_group"):
        TopKRouter(D, E, 2, method="group_limited_greedy", n_group=3, topk_group=1)
    with pytest.raises(ValueError, match="cannot hold"):
        TopKRouter(D, E, 5, method="group_limited_greedy", n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="unknown"):
        TopKRouter(D, E, 2, method="noaux_tc")
