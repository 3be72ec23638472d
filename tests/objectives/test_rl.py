"""RL losses: KL estimators, GAE, whitening, PPO's clipped losses, the KL controller and GRPO's advantages
and aggregations, each on a hand-computed example; then ``grpo_loss`` against TRL 1.16's
``GRPOTrainer.compute_loss`` on a tiny LLaMA and one fixed batch, for every aggregation both have.
TRL 1.16 has no PPO trainer, so PPO's formulas are checked by hand only."""

import math
import warnings

import pytest
import torch

from lmzoo.errors import LmzooError
from lmzoo.objectives.rl import (GRPO_AGGREGATIONS, AdaptiveKLController, gae, grpo_advantages, grpo_loss,
                                 kl_controller, kl_estimate, masked_mean, ppo_policy_loss, ppo_value_loss,
                                 shaped_rewards, token_entropy, whiten)

T = torch.tensor
L = math.log


def close(got, want, tol=1e-6):
    torch.testing.assert_close(got, T(want, dtype=got.dtype), atol=tol, rtol=0)


# --- KL estimators and entropy ----------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    # token 1: π_θ = 0.5, π_ref = 0.25 (log r = log ½); token 2: π_θ = 0.25, π_ref = 0.5 (log r = log 2)
    logp, ref = T([[L(0.5), L(0.25)]]), T([[L(0.25), L(0.5)]])
    close(kl_estimate(logp, ref, "k1"), [[L(2), -L(2)]])  # −log r: negative on the second token
    close(kl_estimate(logp, ref, "k2"), [[0.5 * L(2) ** 2, 0.5 * L(2) ** 2]])
    close(kl_estimate(logp, ref, "k3"), [[0.5 - 1 + L(2), 2 - 1 - L(2)]])  # r − 1 − log r ≥ 0
    close(kl_estimate(logp, ref, "k3", mask=T([[True, False]])), [[0.5 - 1 + L(2), 0.0]])


def test_k1_and_k3_are_unbiased():
    # the expectation over y ~ p of each estimator, against the exact KL(p ‖ q) of two categoricals
    p, q = T([0.5, 0.25, 0.25]), T([0.25, 0.5, 0.25])
    exact = (p * (p / q).log()).sum()  # ½·log 2 − ¼·log 2 = ¼·log 2
    assert exact.item() == pytest.approx(0.25 * L(2))
    for kind in ("k1", "k3"):
        assert (p * kl_estimate(p.log(), q.log(), kind)).sum().item() == pytest.approx(exact.item(), abs=1e-7)
    assert (p * kl_estimate(p.log(), q.log(), "k2")).sum().item() != pytest.approx(exact.item(), abs=1e-3)


def test_token_entropy_by_hand():
    logits = T([[[L(0.5), L(0.25), L(0.25)], [0.0, 0.0, 0.0], [0.0, -math.inf, -math.inf]]])
    # H(½, ¼, ¼) = ½·log 2 + ½·log 4 = 1.5·log 2; uniform over 3: log 3; a one-hot: 0 (no 0·log 0 NaN)
    close(token_entropy(logits), [[1.5 * L(2), L(3), 0.0]])
    close(token_entropy(logits, T([[True, False, True]])), [[1.5 * L(2), 0.0, 0.0]])


# --- PPO ------------------------------------------------------------------------------------------------------------


def test_gae_by_hand():
    # row 0, 4 tokens: r = (0, 0, 0, 1), V = (0.5, 0.4, 0.6, 0.8), γ = 0.9, λ = 0.5 (γλ = 0.45)
    #   δ3 = 1 − 0.8 = 0.2 (terminal: V4 = 0);  δ2 = 0.9·0.8 − 0.6 = 0.12;  δ1 = 0.9·0.6 − 0.4 = 0.14;
    #   δ0 = 0.9·0.4 − 0.5 = −0.14
    #   Â3 = 0.2; Â2 = 0.12 + 0.45·0.2 = 0.21; Â1 = 0.14 + 0.45·0.21 = 0.2345; Â0 = −0.14 + 0.45·0.2345 = −0.034475
    # row 1, 2 tokens then padding holding garbage: r = (0, 2), V = (1, 0.5): δ1 = 1.5, δ0 = 0.45 − 1 = −0.55,
    #   Â1 = 1.5, Â0 = −0.55 + 0.45·1.5 = 0.125
    rewards = T([[0.0, 0.0, 0.0, 1.0], [0.0, 2.0, 7.0, 7.0]])
    values = T([[0.5, 0.4, 0.6, 0.8], [1.0, 0.5, 9.0, math.inf]])
    mask = T([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(adv, [[-0.034475, 0.2345, 0.21, 0.2], [0.125, 1.5, 0.0, 0.0]])
    close(ret, [[0.465525, 0.6345, 0.81, 1.0], [1.125, 2.0, 0.0, 0.0]])  # R = Â + V
    # γ = λ = 1: Monte Carlo, Â_t = Σ_{s≥t} r_s − V_t; λ = 0: one-step TD, Â_t = δ_t
    close(gae(rewards, values, mask, 1.0, 1.0)[0], [[0.5, 0.6, 0.4, 0.2], [1.0, 1.5, 0.0, 0.0]])
    close(gae(rewards, values, mask, 0.9, 0.0)[0], [[-0.14, 0.14, 0.12, 0.2], [-0.55, 1.5, 0.0, 0.0]])


def test_shaped_rewards_by_hand():
    # scores (1, 2); β = 0.1; k1 = logp − ref per token; row 0 has 3 tokens, row 1 has 1
    logp, ref = T([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]]), T([[-1.5, -1.0, -0.5], [-3.0, 0.0, 0.0]])
    got = shaped_rewards(T([1.0, 2.0]), logp, ref, T([[1, 1, 1], [1, 0, 0]]), kl_coef=0.1)
    close(got, [[-0.05, 0.1, 0.0 + 1.0], [-0.2 + 2.0, 0.0, 0.0]])


def test_whiten_by_hand():
    x, mask = T([[1.0, 2.0], [3.0, 100.0]]), T([[1, 1], [1, 0]])
    # mean 2, unbiased variance ((−1)² + 0 + 1²)/2 = 1
    close(whiten(x, mask), [[-1.0, 0.0], [1.0, 0.0]])
    close(whiten(x, mask, shift_mean=False), [[1.0, 2.0], [3.0, 0.0]])


def test_ppo_clipped_surrogate_by_hand():
    # ε = 0.2. (ρ, Â) → −min(ρÂ, clip(ρ)Â):
    #   (1.1, +1) inside:                       −1.1, gradient −Â·ρ = −1.1
    #   (1.5, +1) above 1 + ε, Â > 0 clips:     −1.2, no gradient
    #   (0.5, +1) below 1 − ε, Â > 0 doesn't:   −0.5, gradient −0.5 (the pessimistic unclipped term)
    #   (0.5, −1) below 1 − ε, Â < 0 clips:     +0.8, no gradient
    #   (1.5, −1) above 1 + ε, Â < 0 doesn't:   +1.5, gradient +1.5
    ratio, adv = T([[1.1, 1.5, 0.5, 0.5, 1.5]]), T([[1.0, 1.0, 1.0, -1.0, -1.0]])
    logp = ratio.log().requires_grad_()
    loss, stats = ppo_policy_loss(logp, torch.zeros(1, 5), adv, torch.ones(1, 5), clip_eps=0.2)
    assert loss.item() == pytest.approx((-1.1 - 1.2 - 0.5 + 0.8 + 1.5) / 5)
    loss.backward()
    close(logp.grad, [[-1.1 / 5, 0.0, -0.5 / 5, 0.0, 1.5 / 5]])
    assert stats["clip_fraction"] == pytest.approx(2 / 5)
    assert stats["approx_kl"] == pytest.approx(sum(0.5 * L(r) ** 2 for r in (1.1, 1.5, 0.5, 0.5, 1.5)) / 5)
    # a padded token, however extreme, changes nothing
    loss2, _ = ppo_policy_loss(T([[L(1.1), 80.0]]), T([[0.0, -80.0]]), T([[1.0, 1.0]]), T([[1, 0]]))
    assert loss2.item() == pytest.approx(-1.1)


def test_ppo_value_loss_by_hand():
    # c = 0.2, V_old = 0:  V = 0.5, R = 1: clipped V = 0.2, errors 0.25 vs 0.64 → 0.64 (clipped wins)
    #                      V = 0.1, R = 1: inside, 0.81;  V = −0.5, R = 0: errors 0.25 vs 0.04 → 0.25
    values, ret = T([[0.5, 0.1, -0.5]]), T([[1.0, 1.0, 0.0]])
    loss, stats = ppo_value_loss(values, torch.zeros(1, 3), ret, torch.ones(1, 3), clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.25) / 3)
    assert stats["clip_fraction"] == pytest.approx(1 / 3)
    unclipped, _ = ppo_value_loss(values, torch.zeros(1, 3), ret, torch.ones(1, 3), clip_range_value=None)
    assert unclipped.item() == pytest.approx(0.5 * (0.25 + 0.81 + 0.25) / 3)


def test_kl_controllers_by_hand():
    # target 6, horizon 10000, 256 samples: KL 9 → e = clip(0.5) = 0.2, β·(1 + 0.2·256/10⁴);
    # then KL 5.7 → e = −0.05, β·(1 − 0.05·256/10⁴)
    ctl = kl_controller("adaptive", 0.1, target=6.0, horizon=10000)
    assert isinstance(ctl, AdaptiveKLController)
    assert ctl.update(9.0, 256) == pytest.approx(0.1 * 1.00512)
    assert ctl.update(5.7, 256) == pytest.approx(0.1 * 1.00512 * 0.99872)
    fixed = kl_controller("fixed", 0.05)
    assert fixed.update(100.0, 256) == 0.05 and fixed.value == 0.05


# --- GRPO -----------------------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    r = T([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])  # two prompts, G = 3; both group means are 2
    # group 0: unbiased std 1; group 1: deviations (−2, −2, 4), variance 24/2 = 12
    s0, s1 = 1 + 1e-4, math.sqrt(12) + 1e-4
    close(grpo_advantages(r, 3), [-1 / s0, 0.0, 1 / s0, -2 / s1, -2 / s1, 4 / s1])
    # batch: group-mean deviations over the batch's unbiased std, √(26/5) (squares 1, 0, 1, 4, 4, 16)
    sb = math.sqrt(26 / 5) + 1e-4
    close(grpo_advantages(r, 3, scale="batch"), [-1 / sb, 0.0, 1 / sb, -2 / sb, -2 / sb, 4 / sb])
    close(grpo_advantages(r, 3, scale="none"), [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0])
    close(grpo_advantages(T([5.0, 5.0, 1.0, 0.0]), 2), [0.0, 0.0, 0.5 / (math.sqrt(0.5) + 1e-4),
                                                        -0.5 / (math.sqrt(0.5) + 1e-4)])  # a tie: no signal


def test_group_std_is_trls():
    from_trl = pytest.importorskip("trl.trainer.utils")
    g = T([[1.0, 2.0, 4.0], [0.0, 0.0, 6.0]])
    close(from_trl.nanstd(g, dim=1), g.std(dim=1).tolist())  # Bessel-corrected, as grpo_advantages


# Three completions of ragged lengths 4, 2, 1 (7 tokens); the padding holds values that would overflow
MASK = T([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
ADV = T([1.0, -2.0, 3.0])
LOGP = T([[-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, 90.0, 90.0], [-1.0, 90.0, 90.0, 90.0]])


@pytest.mark.parametrize("loss_type, want", [
    # ρ = 1 everywhere, β = 0: ℓ = −Â_i on each token; row sums −4, +4, −3 (total −3), lengths 4, 2, 1
    ("grpo", (-4 / 4 + 4 / 2 - 3 / 1) / 3),  # mean of per-sequence means: −2/3
    ("bnpo", -3 / 7),                        # token mean over the batch
    ("dr_grpo", -3 / (3 * 8)),               # over B · max_completion_length = 3 · 8
    ("dapo", -3 / 7),                        # over the global token count, here this batch's
])
def test_grpo_aggregations_by_hand(loss_type, want):
    old = torch.where(MASK.bool(), LOGP, -90.0)
    loss, stats = grpo_loss(LOGP, old, None, ADV, MASK, beta=0.0, loss_type=loss_type, max_completion_length=8)
    assert loss.item() == pytest.approx(want)
    assert stats["clip_ratio/region_mean"] == 0.0 and "kl" not in stats
    # β = 0.5 and one token with π_ref = 2·π_θ (row 1, token 0): + 0.5·(2 − 1 − log 2) on that token only
    ref = LOGP.clone()
    ref[1, 0] += L(2)
    k = 0.5 * (1 - L(2))
    with_kl = {"grpo": want + k / 2 / 3, "bnpo": want + k / 7, "dr_grpo": want + k / 24, "dapo": want + k / 7}
    loss, stats = grpo_loss(LOGP, old, ref, ADV, MASK, beta=0.5, loss_type=loss_type, max_completion_length=8)
    assert loss.item() == pytest.approx(with_kl[loss_type])
    assert stats["kl"] == pytest.approx((1 - L(2)) / 7)


def test_dapo_normalises_by_the_global_token_count():
    kw = dict(beta=0.0, loss_type="dapo")
    # 2 processes, 14 tokens between them: each divides its sum by 14/2 = 7, the mean of the two is the global mean
    assert grpo_loss(LOGP, None, None, ADV, MASK, num_items_in_batch=14, num_processes=2, **kw)[0].item() == \
        pytest.approx(-3 / 7)
    assert grpo_loss(LOGP, None, None, ADV, MASK, num_items_in_batch=T(28), num_processes=2, **kw)[0].item() == \
        pytest.approx(-3 / 14)


def test_grpo_decoupled_clip_by_hand():
    # ε_low = 0.2, ε_high = 0.28: ρ = 1.25 with Â > 0 is inside (it would clip at ε = 0.2), ρ = 1.3 clips at 1.28,
    # ρ = 0.7 with Â < 0 clips at 0.8, ρ = 0.7 with Â > 0 does not
    ratio, adv = T([[1.25, 1.3, 0.7, 0.7]]), T([[1.0, 1.0, -1.0, 1.0]])
    logp = ratio.log().requires_grad_()
    loss, stats = grpo_loss(logp, torch.zeros(1, 4), None, adv, torch.ones(1, 4), beta=0.0, eps_low=0.2,
                            eps_high=0.28, loss_type="bnpo")
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8 - 0.7) / 4)
    loss.backward()
    close(logp.grad, [[-1.25 / 4, 0.0, 0.0, -0.7 / 4]])
    assert stats == pytest.approx({"clip_ratio/low_mean": 0.25, "clip_ratio/high_mean": 0.25,
                                   "clip_ratio/region_mean": 0.5})
    # on-policy (old_logp None): ρ = 1, and the gradient is the policy gradient −Â per token
    lp = T([[-1.0, -2.0]], requires_grad=True)
    grpo_loss(lp, None, None, T([2.0]), torch.ones(1, 2), beta=0.0, loss_type="bnpo")[0].backward()
    close(lp.grad, [[-1.0, -1.0]])
    # kl_ratio_correction: the k3 term weighed by ρ. ρ = 2, π_ref = π_θ/2 (log r = −log 2): k3 = ½ − 1 + log 2;
    # Â = 0 leaves only β·ρ·k3 = 0.1·2·k3
    args = (T([[L(2.0)]]), T([[0.0]]), T([[L(2.0) - L(2)]]), T([0.0]), T([[1]]))
    k3 = 0.5 - 1 + L(2)
    assert grpo_loss(*args, beta=0.1, loss_type="bnpo")[0].item() == pytest.approx(0.1 * k3)
    assert grpo_loss(*args, beta=0.1, loss_type="bnpo", kl_ratio_correction=True)[0].item() == \
        pytest.approx(0.1 * 2 * k3)
    # delta = 1.5 caps the unclipped term: ρ = 3 with Â < 0 gives −min(1.5·(−1), 1.2·(−1)) = 1.5, not 3
    got = grpo_loss(T([[L(3.0)]]), T([[0.0]]), None, T([-1.0]), T([[1]]), beta=0.0, loss_type="bnpo", delta=1.5)
    assert got[0].item() == pytest.approx(1.5)


def test_bad_inputs_raise():
    m = torch.ones(2, 3)
    with pytest.raises(LmzooError, match="known.*'bnpo'.*'dapo'.*'dr_grpo'.*'grpo'"):
        grpo_loss(torch.zeros(2, 3), None, None, T([1.0, 1.0]), m, beta=0.0, loss_type="gspo")
    with pytest.raises(LmzooError, match="max_completion_length"):
        grpo_loss(torch.zeros(2, 3), None, None, T([1.0, 1.0]), m, beta=0.0, loss_type="dr_grpo")
    with pytest.raises(LmzooError, match="needs ref_logp"):
        grpo_loss(torch.zeros(2, 3), None, None, T([1.0, 1.0]), m, beta=0.1)
    with pytest.raises(LmzooError, match="advantages must be"):
        grpo_loss(torch.zeros(2, 3), None, None, T([1.0, 1.0, 1.0]), m, beta=0.0)
    with pytest.raises(LmzooError, match="old_logp has shape"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 4), None, T([1.0, 1.0]), m, beta=0.0)
    with pytest.raises(LmzooError, match="divide"):
        grpo_advantages(T([1.0, 2.0, 3.0]), 2)
    with pytest.raises(LmzooError, match="known"):
        grpo_advantages(T([1.0, 2.0]), 2, scale="rank")
    with pytest.raises(LmzooError, match="right-padded"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), T([[1, 0, 1]]))
    with pytest.raises(LmzooError, match="known"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")
    with pytest.raises(LmzooError, match="known"):
        kl_controller("pid", 0.1)
    with pytest.raises(LmzooError, match="floating"):
        ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), T([[1, 1]]), torch.ones(1, 2))
    with pytest.raises(LmzooError, match="no response token"):
        shaped_rewards(T([1.0]), torch.zeros(1, 2), torch.zeros(1, 2), T([[0, 0]]), kl_coef=0.1)
    assert set(GRPO_AGGREGATIONS) == {"grpo", "bnpo", "dr_grpo", "dapo"}


# --- against TRL 1.16's GRPOTrainer ---------------------------------------------------------------------------------

P, C, MAX_COMPLETION = 3, 5, 8  # prompt width, completion width, the config's max_completion_length (> C)


@pytest.fixture(scope="module")
def grpo_setup(tmp_path_factory):
    """A tiny LLaMA saved to disk (so TRL can build its reference model from the path when β > 0), one
    fixed batch of 4 left-padded prompts and right-padded completions of lengths 5, 2, 3, 1, advantages
    of both signs, old log-probs perturbed away from the current ones (so ratios leave 1 ± ε) and a
    reference model's log-probs (another seed)."""
    from tests.objectives.test_preference import lm  # noqa: F401  (imports trl, or skips)

    path = tmp_path_factory.mktemp("grpo") / "policy"
    lm(0).save_pretrained(path)
    prompt_ids = T([[0, 3, 4], [5, 6, 7], [0, 0, 8], [9, 10, 11]])
    completion_ids = T([[12, 13, 14, 15, 2], [16, 2, 0, 0, 0], [17, 18, 3, 0, 0], [2, 0, 0, 0, 0]])
    completion_mask = (torch.arange(C) < T([[5], [2], [3], [1]])).long()
    batch = {"prompt_ids": prompt_ids, "prompt_mask": (prompt_ids != 0).long(), "completion_ids": completion_ids,
             "completion_mask": completion_mask,
             "advantages": grpo_advantages(T([1.0, 0.0, 0.5, 2.0]), group_size=2)}  # ±0.707 per pair
    ref_lp, _ = _completion_logps(lm(1), batch)
    gen = torch.Generator().manual_seed(0)
    batch["ref_per_token_logps"] = ref_lp.detach()
    batch["num_items_in_batch"] = completion_mask.sum()
    return path, batch, 0.4 * torch.randn(4, C, generator=gen)


def _completion_logps(model, batch):
    """((B, C) log-probs, (B, C, V) logits) of the completion tokens, by lmzoo's ``token_logps`` on the model's
    original forward (TRL's patched forward calls it when not asked for its fused head)."""
    from lmzoo.objectives.logprobs import token_logps

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)  # (B, P + C)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    labels = ids.masked_fill(att == 0, -100)
    labels[:, :P] = -100
    logits = model(input_ids=ids, attention_mask=att).logits
    lp, _ = token_logps(logits, labels)  # position t holds log p(ids[t + 1])
    return lp[:, P - 1:P + C - 1], logits[:, P - 1:P + C - 1]  # (B, C): the completion's tokens


def _tokenizer():
    """test_preference's word-level tokenizer (its fixture cannot be called directly); GRPOTrainer wants
    one, though compute_loss on a given batch never tokenizes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "</s>"] + list("abcdefghijklmnop"))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def _trl_grpo(path, tmp_path, **config):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
                          per_device_train_batch_size=4, num_generations=2, max_completion_length=MAX_COMPLETION,
                          **config)
        trainer = GRPOTrainer(str(path), reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                              train_dataset=Dataset.from_dict({"prompt": ["a b", "c d"]}),
                              processing_class=_tokenizer())
    trainer.model.eval()  # mode "eval": no gradient-accumulation divisor (the loop's business, not the loss's)
    return trainer


@pytest.mark.parametrize("beta, correction", [(0.0, False), (0.04, True), (0.04, False)])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_matches_trl(grpo_setup, tmp_path, loss_type, beta, correction):
    """Same loss, same gradient, same logged kl / entropy / clip ratios, to 1e-5. TRL computes the
    current log-probs itself (fused head); lmzoo's come from the logits of the same model. β > 0 is run
    with TRL's default ``use_bias_correction_kl=True`` (ρ·k3) and with the paper's plain k3."""
    path, batch, noise = grpo_setup
    trainer = _trl_grpo(path, tmp_path, beta=beta, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type,
                        use_bias_correction_kl=correction)
    model, mask = trainer.model, batch["completion_mask"]
    logp, logits = _completion_logps(model, batch)
    old = torch.where(mask.bool(), logp.detach() + noise, 0.0)
    inputs = {**batch, "old_per_token_logps": old}
    if beta == 0.0:
        del inputs["ref_per_token_logps"]  # TRL does not read it then; lmzoo still logs the kl
    want = trainer.compute_loss(model, inputs)
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    got, stats = grpo_loss(logp, old, batch["ref_per_token_logps"] if beta else None, batch["advantages"], mask,
                           beta=beta, eps_low=0.2, eps_high=0.28, loss_type=loss_type,
                           max_completion_length=MAX_COMPLETION, num_items_in_batch=batch["num_items_in_batch"],
                           kl_ratio_correction=correction)
    assert abs(got.item() - want.item()) <= 1e-5, (got.item(), want.item())
    got.backward()
    for p, g in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=0)

    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    stats["entropy"] = masked_mean(token_entropy(logits.detach(), mask), mask).item()
    assert set(logged) >= set(stats) - ({"kl"} if beta == 0 else set()), sorted(logged)
    for key in logged.keys() & stats.keys():
        assert abs(stats[key] - logged[key]) <= 1e-5, (key, stats[key], logged[key])
    # the batch exercises what it should: clipping on both sides, and a clipped loss unlike the unclipped one
    assert stats["clip_ratio/low_mean"] > 0 and stats["clip_ratio/high_mean"] > 0
    unclipped, _ = grpo_loss(logp.detach(), old, None, batch["advantages"], mask, beta=0.0, eps_low=0.99,
                             eps_high=1e9, loss_type=loss_type, max_completion_length=MAX_COMPLETION)
    assert abs(unclipped.item() - got.item()) > 1e-3


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_grpo_gradient_accumulation_matches_trl(grpo_setup, tmp_path, loss_type):
    """In training with 2 accumulation steps, TRL divides ``bnpo`` (``grpo``, ``dr_grpo`` alike) by 2 inside
    its loss, and divides ``dapo``'s sum by the generation batch's token count (here 2 micro-batches of this
    batch's size) × grad_accum / steps_per_generation. lmzoo leaves the first to the training loop and takes
    the second as ``num_items_in_batch``. HF's loop sets ``current_gradient_accumulation_steps`` per window;
    the test sets it as the loop would."""
    path, batch, noise = grpo_setup
    trainer = _trl_grpo(path, tmp_path, beta=0.04, loss_type=loss_type, gradient_accumulation_steps=2)
    assert trainer.args.steps_per_generation == 2
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    mask = batch["completion_mask"]
    logp, _ = _completion_logps(trainer.model, batch)
    old = torch.where(mask.bool(), logp.detach() + noise, 0.0)
    n_window = 2 * mask.sum()  # the generation batch: this micro-batch and one more of the same size
    want = trainer.compute_loss(trainer.model, {**batch, "old_per_token_logps": old, "num_items_in_batch": n_window})
    kw = dict(beta=0.04, loss_type=loss_type, kl_ratio_correction=True)
    got, _ = grpo_loss(logp, old, batch["ref_per_token_logps"], batch["advantages"], mask, num_items_in_batch=n_window,
                       **kw)
    local, _ = grpo_loss(logp, old, batch["ref_per_token_logps"], batch["advantages"], mask, **kw)
    # both are half this micro-batch's token mean, by different routes
    assert abs(local.item() / 2 - want.item()) <= 1e-5 and abs(local.item()) > 1e-2, (local, want)
    assert abs((local.item() / 2 if loss_type == "bnpo" else got.item()) - want.item()) <= 1e-5, (got, want)
