"""loglikelihoods against transformers' own forward (LLaMA, GPT-2, T5) and against a direct forward
of ChatGLM-6B's prefix layout; ragged batches equal requests alone; is_greedy on a continuation built
from the argmax; truncation from the left; the rolling windows against lm-eval's; clear errors."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmzoo  # noqa: E402
from lmzoo.errors import ConfigError  # noqa: E402
from lmzoo.eval.likelihood import loglikelihoods, rolling_loglikelihoods, rolling_windows  # noqa: E402

V, MAXLEN = 48, 32
# ragged on purpose: contexts 1..9 tokens, continuations 1..6
REQUESTS = [([3, 4, 5], [6]), ([7], [8, 9, 10, 11, 12, 13]), ([1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11]),
            ([20, 21], [22, 23, 24]), ([30, 31, 32, 33], [34]), ([40, 2], [1, 1, 1, 1])]


def _hf_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAXLEN,
                                   initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def _hf_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=MAXLEN,
                                  initializer_range=0.3, bos_token_id=2, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory):
    hf = {"llama": _hf_llama, "gpt2": _hf_gpt2}[request.param]()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, lmzoo.load(path)


def _reference(hf, ctx, cont):
    """transformers, one request alone: sum of the continuation's log-probs, and the argmax check."""
    ids = torch.tensor([ctx + cont[:-1]])  # the last token is predicted, never fed
    with torch.no_grad():
        logp = hf(ids).logits[0, len(ctx) - 1:].float().log_softmax(-1)  # (n, V)
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_matches_transformers_in_ragged_batches(pair):
    hf, ours = pair
    batched = loglikelihoods(ours, REQUESTS, batch_size=4)  # 4 + 2 rows, each batch right-padded
    alone = [loglikelihoods(ours, [r], batch_size=1)[0] for r in REQUESTS]
    for (lp, greedy), (lp1, greedy1), (ctx, cont) in zip(batched, alone, REQUESTS):
        ref_lp, ref_greedy = _reference(hf, ctx, cont)
        assert abs(lp - ref_lp) <= 1e-4, (ctx, cont, lp, ref_lp)
        assert abs(lp - lp1) <= 1e-5 and greedy == greedy1 == ref_greedy
    assert all(isinstance(lp, float) and lp < 0 for lp, _ in batched)
    assert len({round(lp, 3) for lp, _ in batched}) == len(REQUESTS)  # distinct requests, distinct scores


def test_is_greedy_on_the_argmax_continuation(pair):
    hf, ours = pair
    ids = [5, 9, 17]
    with torch.no_grad():
        for _ in range(5):  # the model's own greedy continuation, built with transformers
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    ctx, cont = ids[:3], ids[3:]
    wrong = cont[:-1] + [(cont[-1] + 1) % V]
    (lp, greedy), (lp_wrong, greedy_wrong) = loglikelihoods(ours, [(ctx, cont), (ctx, wrong)])
    assert greedy and not greedy_wrong
    assert lp > lp_wrong  # the argmax token beats any other in the last position


def test_too_long_drops_context_from_the_left(pair):
    hf, ours = pair
    ctx, cont = list(range(3, 43)), [7, 8, 9, 10, 11]  # 40 + 5 tokens; 32 may be fed
    (lp, _), = loglikelihoods(ours, [(ctx, cont)])
    kept = ctx[-(MAXLEN - (len(cont) - 1)):]  # 28 context tokens + 4 fed continuation tokens = 32
    assert len(kept) == 28
    assert abs(lp - _reference(hf, kept, cont)[0]) <= 1e-4
    assert abs(lp - _reference(hf, ctx[-27:], cont)[0]) > 1e-4  # one token less is another score
    longest = list(range(1, MAXLEN + 1))  # a 32-token continuation still fits after one context token
    assert abs(loglikelihoods(ours, [([4] * 5, longest)])[0][0] - _reference(hf, [4], longest)[0]) <= 1e-4
    with pytest.raises(ConfigError, match="33 tokens, more than the model's max_positions 32"):
        loglikelihoods(ours, [([4], list(range(1, MAXLEN + 2)))])


def test_rolling_windows_are_lm_evals_and_sum_to_the_document():
    lm_utils = pytest.importorskip("lm_eval.utils")
    for n in (0, 1, 5, 31, 32, 33, 70, 96):
        for L in (1, 4, 32):
            toks = list(range(100, 100 + n))
            ref = [tuple(map(list, lm_utils.make_disjoint_window(w)))
                   for w in lm_utils.get_rolling_token_windows(toks, 7, L, 1)]
            assert rolling_windows(toks, 7, L) == ref, (n, L)
    hf = _hf_llama()
    doc = [int(t) for t in torch.randint(3, V, (70,), generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():  # windows of 32: [1] -> doc[:32], doc[31] -> doc[32:64], doc[37:64] -> doc[64:70]
        ref = sum(_reference(hf, c, t)[0] for c, t in [([1], doc[:32]), (doc[31:32], doc[32:64]),
                                                        (doc[37:64], doc[64:70])])
    ours = _lmzoo_of(hf)
    total, short = rolling_loglikelihoods(ours, [doc, doc[:10]], prefix_token=1, batch_size=2)
    assert abs(total - ref) <= 1e-4
    assert abs(short - _reference(hf, [1], doc[:10])[0]) <= 1e-4


def _lmzoo_of(hf, tmp=None):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        return lmzoo.load(d)


# -- ChatGLM-6B: context + [gMASK] <sop> + continuation --------------------------------------------

GMASK, SOP = 45, 46


def _chatglm():
    from lmzoo.models.chatglm.config import ChatGLMConfig

    torch.manual_seed(0)
    cfg = ChatGLMConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_positions=MAXLEN,
                        bos_token_id=SOP, eos_token_id=47, pad_token_id=0, mask_token_id=44, gmask_token_id=GMASK)
    return lmzoo.build(cfg).eval()


def test_chatglm_scores_after_gmask_sop_with_a_bidirectional_prefix():
    model = _chatglm()
    reqs = [([3, 4, 5, 6], [7, 8, 9]), ([10], [11]), ([12, 13, 14, 15, 16, 17, 18], [19, 20])]
    got = loglikelihoods(model, reqs, batch_size=3)
    for (ctx, cont), (lp, _) in zip(reqs, got):
        ids = torch.tensor([ctx + [GMASK, SOP] + cont])  # the prompt ChatGLM-6B's tokenizer builds
        with torch.no_grad():
            logp = model(ids).logits[0].float().log_softmax(-1)
        # <sop> sits at len(ctx)+1 and predicts cont[0]; the last token is not needed
        ref = logp[len(ctx) + 1:len(ctx) + 1 + len(cont)].gather(-1, torch.tensor(cont)[:, None]).sum()
        assert abs(lp - float(ref)) <= 1e-4
    again = loglikelihoods(model, [(ctx + [GMASK, SOP], cont) for ctx, cont in reqs])  # tail given: not doubled
    assert max(abs(a[0] - b[0]) for a, b in zip(got, again)) <= 1e-5
    # the prefix is bidirectional: the first context token sees the last, so changing the last context
    # token changes what the model makes of the first one (a causal reading would not), and the score
    changed = loglikelihoods(model, [([3, 4, 5, 30], [7, 8, 9])])[0][0]
    assert abs(changed - got[0][0]) > 1e-3
    assert loglikelihoods(model, [([], [7, 8])])[0][0] < 0  # an empty context is fine: [gMASK] <sop> precede


# -- T5: encoder = context, decoder labels = continuation -------------------------------------------

def test_t5_encoder_reads_the_context_decoder_scores_the_continuation(tmp_path):
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    hf.save_pretrained(tmp_path)
    ours = lmzoo.load(tmp_path)
    got = loglikelihoods(ours, REQUESTS, batch_size=4)
    for (ctx, cont), (lp, greedy) in zip(REQUESTS, got):
        with torch.no_grad():  # HFLM(backend="seq2seq"): model(input_ids=ctx, labels=cont)
            logp = hf(input_ids=torch.tensor([ctx]), labels=torch.tensor([cont])).logits[0].float().log_softmax(-1)
        target = torch.tensor(cont)
        assert abs(lp - float(logp.gather(-1, target[:, None]).sum())) <= 1e-4
        assert greedy == bool((logp.argmax(-1) == target).all())


# -- errors ---------------------------------------------------------------------------------------

def test_errors_name_the_request_and_the_family(tmp_path):
    hf = _hf_llama()
    ours = _lmzoo_of(hf)
    with pytest.raises(ConfigError, match="request 1 has an empty continuation"):
        loglikelihoods(ours, [([1], [2]), ([1, 2], [])])
    with pytest.raises(ConfigError, match="request 0 has an empty context"):
        loglikelihoods(ours, [([], [2, 3])])
    from lmzoo.models.bert.config import BertConfig

    bert = lmzoo.build(BertConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_positions=16))
    with pytest.raises(ConfigError, match="bert family is an encoder"):
        loglikelihoods(bert, [([1], [2])])
