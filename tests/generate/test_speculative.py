"""Speculative decoding: greedy output is plain greedy's token for token (five families, a random draft,
the target as its own draft, prompt lookup); sampled tokens have the target's distribution (the
acceptance rule alone and end to end, with the bound a broken rule would break); a cropped cache
gives a fresh forward's logits; EOS and max_new_tokens; bad input."""

from __future__ import annotations

import math

import pytest
import torch

import lmzoo
from lmzoo.errors import LmzooError
from lmzoo.generate.sampling import LogitsProcessor, process_logits
from lmzoo.generate.speculative import lookup_ngram, speculative_generate, verify_sampled
from lmzoo.models.bloom.config import BloomConfig
from lmzoo.models.chatglm2.config import ChatGLM2Config
from lmzoo.models.deepseek_v2.config import DeepseekV2Config
from lmzoo.models.gpt2.config import GPT2Config
from lmzoo.models.llama.config import LlamaConfig
from lmzoo.nn.kv_cache import LatentCache

FAMILIES = ("llama", "gpt2", "deepseek_v2", "bloom", "chatglm2")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models decode fastest on one thread (conftest's ``one_thread``)."""


def tiny(family: str, vocab: int = 64, seed: int = 0, d_model: int = 32, n_layers: int = 2):
    common = dict(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=4, max_positions=128)
    cfg = {
        "llama": lambda: LlamaConfig(**common, n_kv_heads=2, d_ff=2 * d_model),
        "gpt2": lambda: GPT2Config(**common, d_ff=2 * d_model, tie_embeddings=False),  # tied: it repeats its input
        "bloom": lambda: BloomConfig(**common, d_ff=4 * d_model, tie_embeddings=False),
        "chatglm2": lambda: ChatGLM2Config(**common, n_kv_heads=2, d_ff=2 * d_model),
        "deepseek_v2": lambda: DeepseekV2Config(**common, d_ff=2 * d_model, q_lora_rank=None, kv_lora_rank=16,
                                                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                                n_routed_experts=4, n_shared_experts=1, top_k=2, d_expert=16),
    }[family]()
    torch.manual_seed(seed)
    return lmzoo.build(cfg).eval()


def tv_bound(n: int, vocab: int, delta: float = 1e-6) -> float:
    """TV(empirical, true) exceeds this with probability < delta for n i.i.d. draws over ``vocab`` values:
    P(||p̂ - p||_1 >= ε) <= 2^V · exp(-n ε² / 2) (Weissman et al. 2003), and TV = ||·||_1 / 2."""
    return 0.5 * math.sqrt(2 * (vocab * math.log(2) + math.log(1 / delta)) / n)


def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


# -- greedy: token for token plain greedy decoding -----------------------------------------------


@pytest.fixture(scope="module")
def models():
    return {f: (tiny(f), tiny(f, seed=1, d_model=16, n_layers=1)) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_plain_greedy(models, family):
    """Two prompts (random; repeating), three drafters. The random small draft is mostly rejected and
    prompt lookup partly accepted, so crops to every point of a round are exercised."""
    target, small = models[family]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (1, 7), generator=g), torch.tensor([[5, 9, 2, 5, 9, 2, 5, 9]])]
    rejected = looked_up = 0
    for ids in prompts:
        ref = lmzoo.generate(target, ids, max_new_tokens=24)
        for kw in (dict(draft=small), dict(draft=target), dict(prompt_lookup=3)):
            out, stats = speculative_generate(target, ids, max_new_tokens=24, k=4, **kw)
            assert torch.equal(out, ref), (family, kw.keys())
            assert stats.new_tokens == 24 and stats.target_forwards + stats.accepted == 24  # j accepted + 1 own
            if kw.get("draft") is target:  # its own draft always agrees: every round yields k + 1 = 5 tokens
                assert stats.acceptance_rate == 1.0 and stats.target_forwards == 5  # ceil(24 / 5)
            else:
                rejected += stats.proposed - stats.accepted
            looked_up += stats.accepted if "prompt_lookup" in kw else 0
    assert rejected > 0 and looked_up > 0


def test_greedy_prompt_lookup_on_repeated_text_accepts_and_saves_forwards(models):
    """A 2-layer random llama falls into a loop; prompt lookup copies it and needs fewer target forwards."""
    target, _ = models["llama"]
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6] * 3])
    ref = lmzoo.generate(target, ids, max_new_tokens=40)
    out, stats = speculative_generate(target, ids, prompt_lookup=2, k=4, max_new_tokens=40)
    assert torch.equal(out, ref)
    assert stats.accepted > 0 and stats.target_forwards + stats.accepted == 40  # each forward: its accepted + 1
    assert stats.tokens_per_forward == 40 / stats.target_forwards > 1.0


def test_greedy_on_the_prefix_decoder_chatglm():
    """ChatGLM-6B reads its prefix off [gMASK] <sop> at prefill; the first verification forward is that
    prefill (prompt + drafts), and the layout its cache keeps survives the crops."""
    from lmzoo.models.chatglm.config import ChatGLMConfig

    torch.manual_seed(0)
    target = lmzoo.build(ChatGLMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_positions=128,
                                       gmask_token_id=60, mask_token_id=61, bos_token_id=62, eos_token_id=63,
                                       pad_token_id=0)).eval()
    ids = torch.tensor([[5, 9, 2, 5, 9, 60, 62]])
    ref = lmzoo.generate(target, ids, max_new_tokens=20)
    for kw in (dict(draft=target), dict(prompt_lookup=2)):
        out, stats = speculative_generate(target, ids, max_new_tokens=20, **kw)
        assert torch.equal(out, ref) and stats.accepted > 0


def test_lookup_ngram_by_hand():
    assert lookup_ngram([5, 6, 7, 8, 5, 6], 2, 3) == [7, 8, 5]  # "5 6" first seen at 0
    assert lookup_ngram([1, 2, 3, 9, 2], 2, 4) == [3, 9, 2]  # "9 2" unseen; falls back to "2" at index 1
    assert lookup_ngram([7, 7, 7], 3, 4) == [7]  # n capped at len - 1: "7 7" at 0, one token follows
    assert lookup_ngram([1, 2, 3], 2, 4) == []  # nothing repeats: no drafts, a plain step


def test_eos_stops_and_max_new_tokens_is_exact(models):
    target, small = models["llama"]
    ids = torch.randint(0, 64, (1, 5))
    ref = lmzoo.generate(target, ids, max_new_tokens=20)
    eos = int(ref[0, 5 + 6])  # the 7th new token
    first = ref[0, 5:].tolist().index(eos)
    out, stats = speculative_generate(target, ids, draft=target, k=4, max_new_tokens=20, eos_token_id=eos)
    assert torch.equal(out, ref[:, :5 + first + 1]) and stats.new_tokens == first + 1
    for n in (0, 1, 2, 3, 7):  # a round of k + 1 = 5 never runs past n
        out, stats = speculative_generate(target, ids, draft=target, k=4, max_new_tokens=n)
        assert out.shape == (1, 5 + n) and torch.equal(out, ref[:, :5 + n])


# -- the KV cache crop ------------------------------------------------------------------------


def test_kv_cache_crop_rewinds_and_refuses_growth():
    cache = LatentCache(2, 1, kv_lora_rank=4, rope_dim=2, max_len=8)
    c, r = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 2)
    for layer in range(2):
        cache.update(layer, c, r)
    cache.commit()
    cache.crop(3)
    assert cache.length == 3 and cache.nbytes == 3 * (4 + 2) * 2 * 4
    new = torch.full((1, 1, 1, 4), 7.0), torch.full((1, 1, 1, 2), 7.0)
    k, v = cache.update(0, *new)  # writes slot 3, over the forgotten token
    assert k.shape[2] == 4 and torch.equal(k[:, :, :3], c[:, :, :3]) and bool((k[:, :, 3] == 7).all())
    with pytest.raises(LmzooError, match="outside 0..3"):
        cache.crop(4)


@pytest.mark.parametrize("family", FAMILIES)
def test_cropped_cache_gives_a_fresh_forwards_logits(models, family):
    """Verify 4 drafts, keep 1 (as after a rejection), feed the target's own token: the logits equal a
    cacheless forward over the accepted sequence (DeepSeek-V2's latent cache too)."""
    target, _ = models[family]
    prompt, drafts, own = torch.tensor([[4, 8, 15, 16, 23]]), torch.tensor([[42, 7, 7, 1]]), torch.tensor([[30]])
    with torch.inference_mode():
        cache = target.new_cache(1, 16)
        target(torch.cat([prompt, drafts], 1), cache=cache, logits_to_keep=5)
        cache.crop(prompt.shape[1] + 1)
        got = target(own, cache=cache, logits_to_keep=1).logits[0, -1]
        want = target(torch.cat([prompt, drafts[:, :1], own], 1)).logits[0, -1]
    assert cache.length == prompt.shape[1] + 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- sampling: the target's distribution --------------------------------------------------------


def _first_token(p, q, x, rng) -> int:
    j, nxt = verify_sampled(p, q, x, rng)
    return int(x[0]) if j else nxt


def test_acceptance_rule_gives_the_target_distribution_and_broken_rules_do_not():
    """The rule alone on fixed p (2, 8), q (1, 8) with TV(p_1, q) = 0.55: the first token's histogram over
    6000 draws is within the 1e-6-probability TV bound (0.040) of p_1; "always accept" (TV 0.55) and
    "accept with min(1, p/q) but resample from p" (TV 0.14) are far outside it. A one-hot q (prompt lookup) too."""
    V, N = 8, 6000
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[.30, .20, .15, .10, .10, .05, .05, .05], [.125] * 8])
    q = torch.tensor([[.05, .05, .05, .05, .10, .10, .20, .40]])
    assert abs(0.5 * float((p[0] - q[0]).abs().sum()) - 0.55) < 1e-6
    bound = tv_bound(N, V)
    rng = torch.Generator().manual_seed(1)
    good, always, from_p, lookup = (torch.zeros(V) for _ in range(4))
    one_hot = torch.nn.functional.one_hot(torch.tensor([[0]]), V).float()[0]  # a lookup that always drafts 0
    for _ in range(N):
        x = torch.multinomial(q[0], 1, generator=g)
        good[_first_token(p, q, x, rng)] += 1
        always[int(x)] += 1
        ok = float(torch.rand((), generator=rng)) < min(1.0, float(p[0, x] / q[0, x]))
        from_p[int(x) if ok else int(torch.multinomial(p[0], 1, generator=rng))] += 1
        lookup[_first_token(p, one_hot, torch.tensor([0]), rng)] += 1
    assert tv(good, p[0]) < bound and tv(lookup, p[0]) < bound
    assert tv(always, p[0]) > 0.4 and tv(from_p, p[0]) > 0.1 > 2 * bound


def _exact_marginals(target, ids, proc, n: int) -> list[torch.Tensor]:
    """The exact distribution of each of the first n new tokens, Σ over every prefix of its probability
    (p2 = Σ_x p(x) p(· | x), ...), from cacheless forwards over all V^i prefixes."""
    V = target.config.vocab_size
    prefixes, weights, out = ids, torch.ones(1), []
    with torch.no_grad():
        for _ in range(n):
            dist = process_logits(target(prefixes).logits[:, -1].float(), prefixes, proc).softmax(-1)  # (P, V)
            out.append(weights @ dist)
            weights = (weights[:, None] * dist).reshape(-1)  # (P·V,): prefix-major, as the rows below
            prefixes = torch.cat([prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(len(prefixes))[:, None]], 1)
    return out


@pytest.mark.parametrize("drafter,k", [("model", 1), ("model", 2), ("lookup", 1)])
def test_speculative_sampling_has_the_targets_distribution(drafter, k):
    """Vocabulary 8, target ≠ draft (TV 0.57 between their first-token distributions), temperature 0.9 and
    top-k 6 on both, k + 1 new tokens (a full round: accept, residual and bonus paths): over 2000 seeded
    runs each new token's histogram is within the TV bound (0.070) of the target's exact marginal. With
    k = 1 the one verified draft's acceptance rate is Leviathan's α = Σ min(p, q) (lookup: p(x) of the
    copied token), within Hoeffding's 1e-6 bound (0.060). "Always accept" would give the draft's
    distribution, TV(q, p) > 2·bound away from p's: it would fail."""
    N, V = 2000, 8
    target, draft = (tiny("llama", vocab=8, seed=s, d_model=16, n_layers=1) for s in (0, 1))
    for m in (target, draft):
        m.lm_head.weight.data.mul_(3.0)  # random heads are near uniform; sharpen so p and q differ
    proc = LogitsProcessor(True, 0.9, 6)
    ids = torch.tensor([[1, 2, 3]]) if drafter == "model" else torch.tensor([[3, 1, 3]])  # lookup drafts 1
    exact = _exact_marginals(target, ids, proc, k + 1)
    p1 = exact[0]
    if drafter == "model":
        with torch.no_grad():
            q1 = process_logits(draft(ids).logits[:, -1], ids, proc).softmax(-1)[0]
        alpha = float(torch.minimum(p1, q1).sum())
        assert 1 - alpha > 2 * tv_bound(N, V)  # TV(p1, q1) = 1 - α
        kw = dict(draft=draft)
    else:
        alpha, kw = float(p1[1]), dict(prompt_lookup=1)
        assert 0.2 < alpha < 0.8  # both branches (accept, resample without the draft) are exercised
        assert 1 - alpha > 2 * tv_bound(N, V)  # "always accept" would always emit the copied token
    rng = torch.Generator().manual_seed(0)
    counts, accepted = torch.zeros(k + 1, V), 0
    for _ in range(N):
        out, stats = speculative_generate(target, ids, k=k, max_new_tokens=k + 1, do_sample=True, temperature=0.9,
                                          top_k=6, generator=rng, **kw)
        counts[torch.arange(k + 1), out[0, ids.shape[1]:]] += 1
        accepted += stats.accepted
    for i in range(k + 1):
        assert tv(counts[i], exact[i]) < tv_bound(N, V), i
    if k == 1:  # the second round proposes nothing (max_new_tokens), so accepted is the first draft's fate
        assert abs(accepted / N - alpha) < math.sqrt(math.log(2 / 1e-6) / (2 * N))


# -- bad input --------------------------------------------------------------------------------


def test_bad_inputs(models):
    target, small = models["llama"]
    ids = torch.randint(0, 64, (1, 4))
    with pytest.raises(LmzooError, match="batch 1 only"):
        speculative_generate(target, ids.expand(2, -1), draft=small, max_new_tokens=4)
    with pytest.raises(LmzooError, match=r"vocabulary \(50\) is not the target's \(64\)"):
        speculative_generate(target, ids, draft=tiny("llama", vocab=50), max_new_tokens=4)
    with pytest.raises(ValueError, match="exactly one drafter"):
        speculative_generate(target, ids, draft=small, prompt_lookup=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="exactly one drafter"):
        speculative_generate(target, ids, max_new_tokens=4)
    with pytest.raises(LmzooError, match="context of 128"):
        speculative_generate(target, ids, prompt_lookup=2, max_new_tokens=125)
