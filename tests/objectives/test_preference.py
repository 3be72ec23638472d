"""Preference losses: each against a hand-computed 2-pair batch, then against TRL 1.16's trainers
(DPOTrainer, CPOTrainer for SimPO, ORPOTrainer, KTOTrainer, RewardTrainer) on a tiny LLaMA and the
same pairs: TRL's ``compute_loss`` and logged metrics vs lmzoo's functions on log-probs this test
computes itself from the model's logits, to 1e-5."""

import math
import warnings

import pytest
import torch

from lmzoo.errors import LmzooError
from lmzoo.objectives.preference import (LOSSES, dpo_loss, dpo_metrics, kto_loss, kto_metrics,
                                         kto_reference_point, orpo_loss, preference_loss, reward_loss,
                                         reward_metrics, simpo_loss)

T = torch.tensor


def sp(x):  # softplus, by hand: -log σ(-x) = log(1 + eˣ)
    return math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


# Two pairs with known log-probs: h = (π_c − ref_c) − (π_r − ref_r) = (0.5 + 0.5, −1 − 1) = (1, −2)
PC, PR, RC, RR = T([-1.0, -3.0]), T([-2.0, -1.0]), T([-1.5, -2.0]), T([-1.5, -2.0])


def close(got, want, tol=1e-6):
    torch.testing.assert_close(got, T(want, dtype=got.dtype), atol=tol, rtol=0)


# --- by hand ------------------------------------------------------------------------------------------


def test_dpo_variants_by_hand():
    # β = 0.5: β·h = (0.5, −1); −log σ(t) = log(1 + e^(−t))
    close(dpo_loss(PC, PR, RC, RR, beta=0.5), [sp(-0.5), sp(1.0)])
    # cDPO, ε = 0.1: 0.9·log(1 + e^(−t)) + 0.1·log(1 + e^t)
    close(dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1),
          [0.9 * sp(-0.5) + 0.1 * sp(0.5), 0.9 * sp(1.0) + 0.1 * sp(-1.0)])
    # hinge: max(0, 1 − β·h) = (0.5, 2); with β = 2 the first pair is past the margin: max(0, 1 − 2) = 0
    close(dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="hinge"), [0.5, 2.0])
    close(dpo_loss(PC, PR, RC, RR, beta=2.0, loss_type="hinge"), [0.0, 5.0])
    # IPO, τ = 0.5: (h − 1/(2τ))² = (1 − 1)², (−2 − 1)² = 0, 9
    close(dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo"), [0.0, 9.0])
    # rDPO, ε = 0.1: [0.9·log(1 + e^(−t)) − 0.1·log(1 + e^t)] / 0.8
    close(dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="robust", label_smoothing=0.1),
          [(0.9 * sp(-0.5) - 0.1 * sp(0.5)) / 0.8, (0.9 * sp(1.0) - 0.1 * sp(-1.0)) / 0.8])
    # ε = 0 is plain DPO for both smoothed forms
    close(dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="robust"), [sp(-0.5), sp(1.0)])


def test_dpo_gradient_is_the_papers():
    # DPO's gradient (eq. 7 differentiated): ∂L/∂log π(y_w) = −β·σ(−β·h), ∂L/∂log π(y_l) = +β·σ(−β·h)
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    dpo_loss(pc, pr, RC, RR, beta=0.5).sum().backward()
    close(pc.grad, [-0.5 * sig(-0.5), -0.5 * sig(1.0)])
    close(pr.grad, [0.5 * sig(-0.5), 0.5 * sig(1.0)])


def test_simpo_by_hand():
    # mean log-probs c = (−0.5, −1), r = (−1, −0.5); β = 2, γ = 1: β(c − r) − γ = (0, −2)
    close(simpo_loss(T([-0.5, -1.0]), T([-1.0, -0.5]), beta=2.0, gamma=1.0), [math.log(2), sp(2.0)])


def test_orpo_by_hand():
    # P = (0.5, 0.25) vs (0.25, 0.5): odds 1 and 1/3, log odds ratio ±log 3; log σ(log 3) = log(3/4),
    # log σ(−log 3) = log(1/4); with L_SFT = 2 and λ = 0.1: 2 − 0.1·log(3/4), 2 − 0.1·log(1/4)
    c, r = T([math.log(0.5), math.log(0.25)]), T([math.log(0.25), math.log(0.5)])
    close(orpo_loss(c, r, T(2.0), beta=0.1), [2 - 0.1 * math.log(0.75), 2 - 0.1 * math.log(0.25)])
    # P(y|x) = 1 exactly: odds infinite, the loss stays finite (log σ(+∞) = 0)
    out = orpo_loss(T([0.0, 0.0]), T([-1.0, 0.0]), 0.0)
    assert torch.isfinite(out).all() and out[0].item() == pytest.approx(0.0, abs=1e-6)


def test_kto_by_hand():
    # r = π − ref = (1, 0, −1), desirable = (yes, no, yes); KL pairs: mean((−1 + 2), (−3 + 2.5)) = 0.25
    z = kto_reference_point(T([-1.0, -3.0]), T([-2.0, -2.5]))
    assert z.item() == pytest.approx(0.25)
    # β = 1, λ_D = 1, λ_U = 2: 1 − σ(1 − 0.25), 2·(1 − σ(0.25 − 0)), 1 − σ(−1 − 0.25)
    got = kto_loss(T([-1.0, -2.0, -3.0]), T([-2.0, -2.0, -2.0]), T([True, False, True]), z, beta=1.0,
                   undesirable_weight=2.0)
    close(got, [1 - sig(0.75), 2 * (1 - sig(0.25)), 1 - sig(-1.25)])
    # a negative KL estimate is clamped to 0, and z_ref carries no gradient
    p = T([-3.0, -3.0], requires_grad=True)
    z0 = kto_reference_point(p, T([-2.0, -2.0]))
    assert z0.item() == 0.0 and not z0.requires_grad
    m = kto_metrics(T([-1.0, -2.0, -3.0]), T([-2.0, -2.0, -2.0]), T([True, False, True]), z, beta=1.0)
    assert m == pytest.approx({"kl": 0.25, "rewards/chosen": 0.0, "logps/chosen": -2.0, "rewards/rejected": 0.0,
                               "logps/rejected": -2.0, "rewards/margins": 0.0})


def test_reward_loss_by_hand():
    rc, rr = T([2.0, 0.0]), T([1.0, 1.0])
    close(reward_loss(rc, rr), [sp(-1.0), sp(1.0)])  # −log σ(1), −log σ(−1)
    # margin (0.5, 0): −log σ(0.5), −log σ(−1); centering 0.01·(r_w + r_l)² = 0.09, 0.01
    close(reward_loss(rc, rr, margin=T([0.5, 0.0]), center_coefficient=0.01), [sp(-0.5) + 0.09, sp(1.0) + 0.01])
    assert reward_metrics(rc, rr) == pytest.approx({"accuracy": 0.5, "margin": 0.0, "min_reward": 0.0,
                                                    "mean_reward": 1.0, "max_reward": 2.0})


def test_dpo_metrics_by_hand():
    # β = 0.5: r_w = 0.5·(0.5, −1) = (0.25, −0.5), r_l = 0.5·(−0.5, 1) = (−0.25, 0.5)
    assert dpo_metrics(PC, PR, RC, RR, beta=0.5) == pytest.approx(
        {"rewards/chosen": -0.125, "rewards/rejected": 0.125, "rewards/accuracies": 0.5, "rewards/margins": -0.25,
         "logps/chosen": -2.0, "logps/rejected": -1.5})
    # no reference (SimPO, ORPO): the rewards are β·log π
    assert dpo_metrics(PC, PR, beta=0.5)["rewards/margins"] == pytest.approx(0.5 * (-2.0 + 1.5))


def test_finite_at_extremes():
    big = T([1e4, -1e4])
    zero = torch.zeros(2)
    for lt, eps in (("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)):
        assert torch.isfinite(dpo_loss(big, -big, zero, zero, beta=1.0, loss_type=lt, label_smoothing=eps)).all()
    assert torch.isfinite(simpo_loss(big, -big)).all()
    assert torch.isfinite(reward_loss(big, -big)).all()
    assert torch.isfinite(orpo_loss(T([-1e-30, -50.0]), T([-50.0, -1e-30]), 0.0)).all()


def test_bad_inputs_raise():
    with pytest.raises(LmzooError, match="known.*'hinge'.*'ipo'.*'robust'.*'sigmoid'"):
        dpo_loss(PC, PR, RC, RR, loss_type="sigmod")
    with pytest.raises(LmzooError, match="simpo_loss"):
        dpo_loss(PC, PR, RC, RR, loss_type="simpo")
    with pytest.raises(LmzooError, match="known.*kto.*orpo.*simpo"):
        preference_loss("dpop")
    with pytest.raises(LmzooError, match="one shape"):
        dpo_loss(PC, PR, RC, T([-1.0, -2.0, -3.0]))
    with pytest.raises(LmzooError, match="one shape"):
        reward_loss(T([1.0, 2.0]), T([[1.0], [2.0]]))
    with pytest.raises(LmzooError, match="floating"):
        dpo_loss(PC, PR, RC, T([1, 2]))
    for bad in (0.0, -0.1):
        with pytest.raises(LmzooError, match="beta must be > 0"):
            dpo_loss(PC, PR, RC, RR, beta=bad)
        with pytest.raises(LmzooError, match="beta must be > 0"):
            simpo_loss(PC, PR, beta=bad)
        with pytest.raises(LmzooError, match="beta"):
            orpo_loss(PC, PR, 0.0, beta=bad)
        with pytest.raises(LmzooError, match="beta must be > 0"):
            kto_loss(PC, RC, T([True, False]), 0.0, beta=bad)
    with pytest.raises(LmzooError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(LmzooError, match=r"\[0, 0.5\)"):
        dpo_loss(PC, PR, RC, RR, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(LmzooError, match="<= 0"):
        orpo_loss(T([0.1, -1.0]), PR, 0.0)
    with pytest.raises(LmzooError, match="one entry per example"):
        kto_loss(PC, RC, T([True]), 0.0)
    with pytest.raises(LmzooError, match="both"):
        dpo_metrics(PC, PR, RC)


def test_registry_names_every_loss():
    assert set(LOSSES) == {"sigmoid", "hinge", "ipo", "robust", "simpo", "orpo", "kto"}
    assert [n for n, s in LOSSES.items() if not s.reference] == ["simpo", "orpo"]
    assert preference_loss("simpo").fn is simpo_loss and not preference_loss("kto").paired


# --- against TRL 1.16 ---------------------------------------------------------------------------------

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "</s>"] + list("abcdefghijklmnop"))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def llama_config(**kw):
    from transformers import LlamaConfig

    # initializer_range 0.3: log-probs that differ by O(1) between the pairs and the two models
    return LlamaConfig(vocab_size=19, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=2,
                       bos_token_id=None, initializer_range=0.3, **kw)


def lm(seed):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config())


PAIRS = {"prompt": ["a b", "c d e", "f", "g h"], "chosen": [" f g", " h", " i j k", " a"],
         "rejected": [" i", " j k l", " m", " n o"]}
COMMON = dict(report_to=[], bf16=False, use_cpu=True, per_device_train_batch_size=4, max_length=None,
              gradient_checkpointing=False)


def seq_logps(model, input_ids, attention_mask, mask, average=False):
    """By hand, from the model's original forward (TRL patched a fused head in; without
    ``fused_lm_head`` it calls the original): Σ_t log softmax(logits_t)[x_{t+1}] over completion tokens."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    lp = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    m = mask[:, 1:].float()
    return (lp * m).sum(-1) / (m.sum(-1) if average else 1)


def one_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(trainer.train_dataset) == COMMON["per_device_train_batch_size"]  # the whole data set, one batch
    return batch


def metrics_of(store):
    return {k: v[-1] for k, v in store.items()}


def assert_metrics(want: dict, trl_logged: dict, tol=1e-5):
    for key, value in want.items():
        assert key in trl_logged, f"TRL does not log {key}: {sorted(trl_logged)}"
        assert abs(value - trl_logged[key]) <= tol, (key, value, trl_logged[key])


def trl_dpo(tok, tmp_path, **config):
    """(trainer, its one batch, TRL's loss on it): a DPOTrainer on lm(0) with reference lm(1)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path), **config, **COMMON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(lm(0), lm(1), args=args, train_dataset=Dataset.from_dict(PAIRS), processing_class=tok)
        b = one_batch(trainer)
        return trainer, b, trainer.compute_loss(trainer.model, b).item()


@pytest.mark.parametrize("loss_type, beta, eps", [("sigmoid", 0.5, 0.0), ("hinge", 0.5, 0.0), ("ipo", 0.5, 0.0),
                                                  ("robust", 0.5, 0.2)])
def test_dpo_matches_trl(tok, tmp_path, loss_type, beta, eps):
    trainer, b, want = trl_dpo(tok, tmp_path, loss_type=loss_type, beta=beta, label_smoothing=eps)
    ids, att, cm = b["input_ids"], b["attention_mask"], b["completion_mask"]
    average = preference_loss(loss_type).length_normalised  # IPO: TRL takes per-token means
    pc, pr = seq_logps(trainer.model, ids, att, cm, average).chunk(2)  # rows are [chosen..., rejected...]
    rc, rr = seq_logps(trainer.ref_model, ids, att, cm, average).chunk(2)
    got = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert abs(got.mean().item() - want) <= 1e-5, (got, want)
    assert got.shape == (4,) and (got - got.mean()).abs().max() > 1e-3  # the pairs differ: a real comparison
    # the statistics, always on summed log-probs as TRL logs them
    pc, pr = seq_logps(trainer.model, ids, att, cm).chunk(2)
    rc, rr = seq_logps(trainer.ref_model, ids, att, cm).chunk(2)
    assert_metrics(dpo_metrics(pc, pr, rc, rr, beta=beta), metrics_of(trainer._metrics["train"]))


def test_dpo_plus_sft_term_matches_trl(tok, tmp_path):
    """RPO: TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, α] is dpo_loss + α · sft_nll."""
    from lmzoo.objectives.preference import sft_nll

    alpha = 0.7
    trainer, b, want = trl_dpo(tok, tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha], beta=0.5)
    ids, att, cm = b["input_ids"], b["attention_mask"], b["completion_mask"]
    pc, pr = seq_logps(trainer.model, ids, att, cm).chunk(2)
    rc, rr = seq_logps(trainer.ref_model, ids, att, cm).chunk(2)
    with torch.no_grad():  # the chosen rows' per-token log-probs, by hand
        logits = trainer.model(input_ids=ids, attention_mask=att).logits.float()
    lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    n = len(pc)
    nll = sft_nll(lp[:n], cm[:n, 1:].bool())
    got = dpo_loss(pc, pr, rc, rr, beta=0.5).mean() + alpha * nll
    assert abs(got.item() - want) <= 1e-5, (got.item(), want)
    assert nll.item() > 0.5  # the term is not negligible: a real comparison
    assert abs(nll.item() - (-(lp[:n] * cm[:n, 1:]).sum() / cm[:n, 1:].sum()).item()) < 1e-6  # token mean, by hand


def _cpo_style_logps(model, b, average):
    """CPO/ORPO batches: chosen_* and rejected_* rows whose labels are −100 outside the completion."""
    return [seq_logps(model, b[f"{side}_input_ids"], b[f"{side}_attention_mask"],
                      (b[f"{side}_labels"] != -100).long(), average) for side in ("chosen", "rejected")]


@pytest.mark.parametrize("loss_type", ["simpo", "sigmoid"])
def test_simpo_and_cdpo_match_trl_cpo_trainer(tok, tmp_path, loss_type):
    """SimPO; and cDPO's smoothed sigmoid, which TRL 1.16 computes only here (its DPOTrainer's 'sigmoid'
    ignores label_smoothing): CPO's sigmoid is DPO's with the reference log-probs set to 0."""
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    kw = dict(simpo_gamma=1.0, beta=2.0) if loss_type == "simpo" else dict(label_smoothing=0.2, beta=0.5)
    args = CPOConfig(output_dir=str(tmp_path), loss_type=loss_type, cpo_alpha=0.0, **kw, **COMMON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = CPOTrainer(lm(0), args=args, train_dataset=Dataset.from_dict(PAIRS), processing_class=tok)
        b = one_batch(trainer)
        want = trainer.compute_loss(trainer.model, b).item()
    pc, pr = _cpo_style_logps(trainer.model, b, average=loss_type == "simpo")
    if loss_type == "simpo":
        got = simpo_loss(pc, pr, beta=2.0, gamma=1.0)
    else:
        got = dpo_loss(pc, pr, torch.zeros_like(pc), torch.zeros_like(pr), beta=0.5, label_smoothing=0.2)
    assert abs(got.mean().item() - want) <= 1e-5, (got, want)
    assert (got - got.mean()).abs().max() > 1e-3
    assert_metrics(dpo_metrics(pc, pr, beta=kw["beta"]), metrics_of(trainer._stored_metrics["train"]))


def test_orpo_matches_trl(tok, tmp_path):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(output_dir=str(tmp_path), beta=0.25, **COMMON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ORPOTrainer(lm(0), args=args, train_dataset=Dataset.from_dict(PAIRS), processing_class=tok)
        b = one_batch(trainer)
        want = trainer.compute_loss(trainer.model, b).item()
    pc, pr = _cpo_style_logps(trainer.model, b, average=True)
    # TRL's L_SFT: the token-mean NLL of the chosen rows over prompt and response (not the response alone)
    ids, att = b["chosen_input_ids"], b["chosen_attention_mask"]
    nll = -seq_logps(trainer.model, ids, att, att).sum() / att[:, 1:].sum()
    got = orpo_loss(pc, pr, nll, beta=0.25)
    assert abs(got.mean().item() - want) <= 1e-5, (got, want)
    assert_metrics({**dpo_metrics(pc, pr, beta=0.25), "nll_loss": nll.item()},
                   metrics_of(trainer._stored_metrics["train"]))


@pytest.mark.parametrize("ref_seed, clamped", [(1, False), (3, True)])  # KL estimate ≈ +0.66 and ≈ −0.53
def test_kto_matches_trl(tok, tmp_path, ref_seed, clamped):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    data = {"prompt": PAIRS["prompt"], "completion": PAIRS["chosen"][:2] + PAIRS["rejected"][2:],
            "label": [True, False, True, False]}
    args = KTOConfig(output_dir=str(tmp_path), beta=0.5, desirable_weight=1.0, undesirable_weight=1.5, **COMMON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = KTOTrainer(lm(0), lm(ref_seed), args=args, train_dataset=Dataset.from_dict(data),
                             processing_class=tok)
        b = one_batch(trainer)
        want = trainer.compute_loss(trainer.model, b).item()
    logps = seq_logps(trainer.model, b["input_ids"], b["attention_mask"], b["completion_mask"])
    ref = seq_logps(trainer.ref_model, b["input_ids"], b["attention_mask"], b["completion_mask"])
    kl_args = (b["KL_input_ids"], b["KL_attention_mask"], b["KL_completion_mask"])
    z = kto_reference_point(seq_logps(trainer.model, *kl_args), seq_logps(trainer.ref_model, *kl_args))
    assert (z.item() == 0.0) if clamped else (z.item() > 0.1)  # both sides of the clamp max(0, ·)
    got = kto_loss(logps, ref, b["label"], z, beta=0.5, undesirable_weight=1.5)
    assert abs(got.mean().item() - want) <= 1e-5, (got, want)
    assert_metrics(kto_metrics(logps, ref, b["label"], z, beta=0.5), metrics_of(trainer._metrics["train"]))


@pytest.mark.parametrize("margin, center", [(False, None), (True, None), (True, 0.01)])
def test_reward_matches_trl(tok, tmp_path, margin, center):
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    data = {"chosen": [p + c for p, c in zip(PAIRS["prompt"], PAIRS["chosen"])],
            "rejected": [p + r for p, r in zip(PAIRS["prompt"], PAIRS["rejected"])]}
    if margin:
        data["margin"] = [0.5, 1.0, 0.0, 2.0]
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(llama_config(num_labels=1))
    args = RewardConfig(output_dir=str(tmp_path), center_rewards_coefficient=center, **COMMON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RewardTrainer(model, args=args, train_dataset=Dataset.from_dict(data), processing_class=tok)
        b = one_batch(trainer)
        want = trainer.compute_loss(trainer.model, dict(b)).item()
    with torch.no_grad():
        rewards = trainer.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, 0]
    rc, rr = rewards.chunk(2)
    got = reward_loss(rc, rr, margin=b.get("margin"), center_coefficient=center)
    assert abs(got.mean().item() - want) <= 1e-5, (got, want)
    assert (rc - rr).abs().max() > 1e-2  # the rewards differ: a real comparison
    assert_metrics(reward_metrics(rc, rr), metrics_of(trainer._metrics["train"]))
