"""The continuous-batching engine equals running each request alone with lmzoo.generate: greedy outputs
token for token on every causal family, whatever the arrival order, block size, token budget and pool
size (chunked prefill, prefix caching and preemption included); a seeded sampled request draws the same
tokens alone or in a batch; finished and aborted requests give their blocks back."""

import random

import pytest
import torch

import lmzoo
from lmzoo.errors import LmzooError
from lmzoo.generate.continuous import Engine
from lmzoo.generate.requests import SamplingParams
from tests.stages.test_sft import tiny_decoder, tok  # noqa: F401  (tok: the fixture)

FAMILIES = ["gpt2", "llama", "bloom", "chatglm2", "deepseek_v2"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """On one thread (tests/conftest.py)."""


def _model(family, tok):  # noqa: F811
    from lmzoo.train.init import init_weights

    torch.manual_seed(0)
    with torch.no_grad():
        m = tiny_decoder(family, tok)
        for p in m.parameters():  # larger than init: peaked distributions, so argmax ties never decide a test
            p.normal_(0, 0.3) if p.ndim > 1 else None
    return m.eval()


def _prompts(n, vocab, seed=0, lo=1, hi=40):
    r = random.Random(seed)
    return [[r.randrange(vocab) for _ in range(r.randint(lo, hi))] for _ in range(n)]


def _alone(model, prompt, n):
    out = lmzoo.generate(model, torch.tensor([prompt]), max_new_tokens=n)
    return out[0, len(prompt):].tolist()


def in_order(eng, prompts, params, order, seed):
    """``eng.generate`` on the prompts submitted in ``order`` (None, "reversed" or "shuffled"); the outputs
    put back in the prompts' order."""
    idx = list(range(len(prompts)))
    if order == "reversed":
        idx.reverse()
    elif order == "shuffled":
        random.Random(seed).shuffle(idx)
    got = dict(zip(idx, eng.generate([prompts[i] for i in idx], params)))
    return [got[i] for i in range(len(prompts))]


@pytest.mark.parametrize("family", FAMILIES)
def test_concurrent_greedy_requests_equal_each_request_alone(family, tok):  # noqa: F811
    model = _model(family, tok)
    prompts = _prompts(7, tok.vocab_size, seed=1)
    want = [_alone(model, p, 6) for p in prompts]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for block_size, budget, order in ((16, 512, None), (4, 24, "reversed"), (1, 7, "shuffled")):
        eng = Engine(model, block_size=block_size, max_batched_tokens=budget, max_batch=5)
        assert in_order(eng, prompts, greedy, order, seed=3) == want, (family, block_size, budget, order)
        assert eng.stats()["blocks_used"] == 0 and eng.stats()["running"] == 0


def test_requests_sampled_in_one_group_keep_their_own_limits_and_options(tok):  # noqa: F811
    """Rows with the same sampling settings draw together; each still stops at its own max_tokens and gets
    log-probs only if it asked (a run of the serving benchmark once caught all rows stopping at the first's)."""
    model = _model("llama", tok)
    prompts = _prompts(4, tok.vocab_size, seed=7)
    limits = (3, 9, 5, 1)
    eng = Engine(model)
    rids = [eng.add_request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=n == 5))
            for p, n in zip(prompts, limits)]
    outs, lps = {}, {r: [] for r in rids}
    while eng.has_unfinished():
        for o in eng.step():
            lps[o.request_id] += o.new_logprobs
            if o.finished:
                outs[o.request_id] = o.token_ids
    assert [outs[r] for r in rids] == [_alone(model, p, n) for p, n in zip(prompts, limits)]
    assert [len(lps[r]) for r in rids] == [0, 0, 5, 0]


def test_requests_joining_mid_decode_and_preemption_keep_the_outputs(tok):  # noqa: F811
    model = _model("llama", tok)
    prompts = _prompts(10, tok.vocab_size, seed=2, lo=5, hi=30)
    want = [_alone(model, p, 12) for p in prompts]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    eng = Engine(model, block_size=4, num_blocks=24, max_batch=6, max_batched_tokens=32)  # 96 slots: too few
    rids, outs, pending = {}, {}, list(range(len(prompts)))
    while pending or eng.has_unfinished():
        if pending:  # one new request every step
            i = pending.pop(0)
            rids[eng.add_request(prompts[i], greedy)] = i
        for o in eng.step():
            if o.finished:
                outs[rids[o.request_id]] = o.token_ids
    assert [outs[i] for i in range(len(prompts))] == want
    assert eng.counters["preemptions"] > 0  # the pool was too small for all of them at once
    assert eng.stats()["blocks_used"] == 0


def test_prefix_caching_shares_blocks_and_changes_nothing(tok):  # noqa: F811
    model = _model("llama", tok)
    system = _prompts(1, tok.vocab_size, seed=4, lo=40, hi=40)[0]
    prompts = [system + q for q in _prompts(4, tok.vocab_size, seed=5, lo=2, hi=6)]
    want = [_alone(model, p, 5) for p in prompts]
    eng = Engine(model, block_size=8, max_batch=1)  # one at a time: each later request finds the prefix cached
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    cached = []
    for p, w in zip(prompts, want):
        rid = eng.add_request(p, greedy)
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished and o.request_id == rid:
                    assert o.token_ids == w
                    cached.append(o.cached_tokens)
    assert cached == [0, 40, 40, 40]  # five full blocks of the shared 40 tokens


def test_a_seeded_sampled_request_draws_the_same_alone_or_in_a_batch(tok):  # noqa: F811
    model = _model("gpt2", tok)
    prompts = _prompts(5, tok.vocab_size, seed=6)
    sampled = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, top_k=50, seed=11, ignore_eos=True)
    alone = Engine(model).generate([prompts[2]], sampled)[0]
    others = [SamplingParams(max_tokens=8, temperature=1.0, seed=k, ignore_eos=True) for k in range(5)]
    others[2] = sampled
    assert Engine(model, max_batch=5).generate(prompts, others)[2] == alone
    assert Engine(model).generate([prompts[2]], SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95,
                                                                top_k=50, seed=12, ignore_eos=True))[0] != alone


def test_stop_tokens_max_tokens_abort_and_logprobs(tok):  # noqa: F811
    model = _model("llama", tok)
    p = _prompts(1, tok.vocab_size, seed=7)[0]
    full = _alone(model, p, 10)
    stop = full[3]
    first = full.index(stop)
    eng = Engine(model)
    out = eng.generate([p], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop,), ignore_eos=True))[0]
    assert out == full[:first + 1]
    rid = eng.add_request(p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=True))
    outs = eng.step() + eng.step()
    lp = [x for o in outs for x in o.new_logprobs]
    assert len(lp) == 2 and all(x <= 0 for x in lp)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), -1)[full[0]]
    assert lp[0] == pytest.approx(float(ref), abs=1e-5)
    eng.abort(rid)
    (o,) = eng.step()
    assert o.finished and o.finish_reason == "abort" and eng.stats()["blocks_used"] == 0
    with pytest.raises(LmzooError, match="exceeds the model's context"):
        eng.add_request(p, SamplingParams(max_tokens=eng.context_length))
    with pytest.raises(LmzooError, match="empty"):
        eng.add_request([], SamplingParams())


def test_t5_on_the_paged_engine_equals_its_static_cache_loop(tok):  # noqa: F811
    """The encoder-decoder: each source encoded once at admission, its cross-attention K/V in blocks of the
    same pool. Ragged sources, in any arrival order and block size, and with a pool too small for all of
    them (preemption: cross blocks freed and the source encoded again), give the tokens of
    ``stream_seq2seq`` (the preallocated ``EncoderDecoderCache`` loop) run on each source alone."""
    from lmzoo.generate.seq2seq import stream_seq2seq

    model = _model("t5", tok)
    sources = _prompts(7, tok.vocab_size, seed=6, lo=2, hi=30)
    want = [torch.stack(list(stream_seq2seq(model, torch.tensor([s]), max_new_tokens=10)), 1)[0].tolist()
            for s in sources]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for block_size, num_blocks, order in ((16, None, None), (4, None, "reversed"), (2, 40, "shuffled")):
        eng = Engine(model, block_size=block_size, num_blocks=num_blocks, max_batch=4, max_batched_tokens=48)
        assert in_order(eng, sources, greedy, order, seed=4) == want, (block_size, num_blocks, order)
        assert eng.stats()["blocks_used"] == 0
    assert eng.counters["preemptions"] > 0  # 80 slots for sources of up to 30 tokens and 11 decoder tokens each
    with pytest.raises(LmzooError, match="need 41 blocks of 2; the paged cache has 40"):
        eng.add_request(list(range(70)), SamplingParams(max_tokens=10))


def test_a_prefix_decoder_is_refused_with_one_line(tok):  # noqa: F811
    with pytest.raises(LmzooError, match="per-row state"):
        Engine(_model("chatglm", tok))
