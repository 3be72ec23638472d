"""Sliding-window perplexity: against transformers' LLaMA and GPT-2 scored window by window in a plain
loop; ChatGLM-6B's [gMASK] <sop> windows and T5's encoder/decoder windows against forwards written out
by hand; bits per byte on multi-byte text; bad input."""

from __future__ import annotations

import math

import pytest
import torch

import lmzoo
from lmzoo.errors import ConfigError
from lmzoo.eval.perplexity import text_perplexity, windows
from lmzoo.models.bert.config import BertConfig
from lmzoo.models.chatglm.config import ChatGLMConfig
from lmzoo.models.t5.config import T5Config
from tests.stages.test_sft import tok  # noqa: F401  (tok: the shared byte-level BPE fixture, BOS <s>)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats two waiting on each other

TEXT = ("The quick brown fox jumps over the lazy dog while 3 + 4 = 7 and hello world 你好 世界; "
        "sorting 3 1 2 gives 1 2 3, then five is 五 and two is 二.")
SECOND = "What is 3 + 4? 7. Translate into Chinese: two"
CHINESE = "从小到大排序：三 一 二。你好，世界！五加二等于七。"
CONTEXT = 16


def _hf_llama(vocab):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   initializer_range=0.1)
    return transformers.LlamaForCausalLM(cfg)


def _hf_gpt2(vocab):
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  initializer_range=0.1, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _loaded(make, tok, tmp_path):
    torch.manual_seed(0)
    hf = make(tok.vocab_size).eval()
    hf.save_pretrained(tmp_path / "hf")
    return hf, lmzoo.load(tmp_path / "hf")


def reference_nll(hf, ids: list[int], context: int, stride: int) -> tuple[float, list[int]]:
    """The windows spelled out: inputs ids[begin:end] (end = begin + context, capped at the last input),
    each window adding -log p(ids[t + 1]) for the inputs t the previous window did not reach."""
    nll, predicted, prev = 0.0, [], 0
    last = len(ids) - 1  # inputs 0 .. last - 1 each predict the next token
    for begin in range(0, last, stride):
        end = min(begin + context, last)
        with torch.no_grad():
            logp = hf(torch.tensor([ids[begin:end]])).logits[0].double().log_softmax(-1)  # (end - begin, V)
        for t in range(prev, end):
            nll -= float(logp[t - begin, ids[t + 1]])
            predicted.append(t + 1)
        prev = end
        if end == last:
            break
    return nll, predicted


@pytest.mark.parametrize("make", [_hf_llama, _hf_gpt2], ids=["llama", "gpt2"])
def test_matches_transformers_window_by_window(make, tok, tmp_path):
    hf, ours = _loaded(make, tok, tmp_path)
    docs = [[tok.bos_id] + tok.encode(t) for t in (TEXT, SECOND)]
    assert len(docs[0]) > 5 * CONTEXT  # several windows at every stride
    worst = {}
    for stride in (16, 8, 5):
        nll, n = 0.0, 0
        for d in docs:
            d_nll, predicted = reference_nll(hf, d, CONTEXT, stride)
            assert predicted == list(range(1, len(d)))  # every token after the first, once
            nll, n = nll + d_nll, n + len(predicted)
        got = text_perplexity(ours, tok, [TEXT, SECOND], context=CONTEXT, stride=stride, batch_size=3)
        assert got["tokens"] == n == sum(len(d) - 1 for d in docs)
        assert (got["context"], got["stride"], got["documents"]) == (CONTEXT, stride, 2)
        worst[stride] = abs(got["perplexity"] / math.exp(nll / n) - 1)
        assert worst[stride] <= 1e-4, worst
    # more context per prediction is a different score: the strides are not a no-op
    a = text_perplexity(ours, tok, [TEXT], context=CONTEXT, stride=16)["loss"]
    b = text_perplexity(ours, tok, [TEXT], context=CONTEXT, stride=2)["loss"]
    assert abs(a - b) > 1e-3


def test_default_window_is_the_whole_context_and_progress_counts_windows(tok, tmp_path):
    _, ours = _loaded(_hf_llama, tok, tmp_path)
    seen = []
    out = text_perplexity(ours, tok, [TEXT], batch_size=2, progress=lambda done, total: seen.append((done, total)))
    n = len(tok.encode(TEXT))  # + BOS: n + 1 tokens, n inputs, 32 per window
    assert (out["context"], out["stride"]) == (32, 32)
    windows_ = -(-n // 32)
    assert seen == [(min(k, windows_), windows_) for k in range(2, windows_ + 2, 2)]
    assert out["tokens"] == n


def test_windows_cover_each_prediction_once():
    assert windows(10, 4, 4) == [(0, 0, 4), (4, 4, 8), (8, 8, 10)]
    assert windows(10, 4, 3) == [(0, 0, 4), (3, 4, 7), (6, 7, 10)]
    assert windows(3, 8, 2) == [(0, 0, 3)] and windows(0, 8, 2) == []


def test_bits_per_byte_on_multibyte_text(tok, tmp_path):
    _, ours = _loaded(_hf_llama, tok, tmp_path)
    out = text_perplexity(ours, tok, [CHINESE], context=CONTEXT, stride=8)
    n_bytes = len(CHINESE.encode("utf-8"))
    spaces = CHINESE.count(" ")
    assert out["bytes"] == n_bytes == 3 * (len(CHINESE) - spaces) + spaces  # three bytes a character but spaces
    assert out["tokens"] == len(tok.encode(CHINESE))  # the BOS predicts the first one
    assert out["bits_per_byte"] == pytest.approx(out["loss"] * out["tokens"] / (math.log(2) * n_bytes), rel=1e-9)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]), rel=1e-12)


def _randomize(model, std=0.3):
    """Larger random weights than the initialisation's, so a wrong window moves the score visibly."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _chatglm(tok):
    ids = {k: tok.token_to_id(t) for k, t in
           dict(sop="<sop>", eop="<eop>", pad="<pad>", mask="[MASK]", gmask="[gMASK]").items()}
    cfg = ChatGLMConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_positions=64,
                        bos_token_id=ids["sop"], eos_token_id=ids["eop"], pad_token_id=ids["pad"],
                        mask_token_id=ids["mask"], gmask_token_id=ids["gmask"])
    return _randomize(lmzoo.build(cfg)), ids


def _nll_of_last(logits: torch.Tensor, targets: list[int]) -> float:
    """-Σ log p(targets) read off the last len(targets) positions of (T, V) logits."""
    logp = logits[-len(targets):].double().log_softmax(-1)
    return -float(logp[torch.arange(len(targets)), torch.tensor(targets)].sum())


def test_chatglm_scores_text_after_gmask_sop(tok):
    model, sp = _chatglm(tok)
    text = "hello world 你好"
    d = tok.encode(text)
    assert len(d) + 1 < 64
    with torch.no_grad():
        logits = model(torch.tensor([[sp["gmask"], sp["sop"]] + d[:-1]])).logits[0]  # <sop> predicts d[0]
    out = text_perplexity(model, tok, [text])
    assert out["tokens"] == len(d) and out["stride"] == 63  # 64 places, [gMASK] <sop> and 62 inputs
    assert out["loss"] == pytest.approx(_nll_of_last(logits, d) / len(d), rel=1e-5)


def test_chatglm_later_windows_restart_with_gmask_sop(tok):
    model, sp = _chatglm(tok)
    text = "What is 3 + 4? 7 and hello world"
    d = tok.encode(text)[:10]
    lead = [sp["gmask"], sp["sop"]]
    # context 6: [gMASK] <sop> + at most 4 inputs, 5 predictions; stride 3
    rows = [(lead + d[0:4], d[0:5]), (lead + d[3:7], d[5:8]), (lead + d[6:9], d[8:10])]
    with torch.no_grad():
        want = sum(_nll_of_last(model(torch.tensor([x])).logits[0], y) for x, y in rows)
        fresh = sum(_nll_of_last(model(torch.tensor([lead + y[:-1]])).logits[0], y) for _, y in rows)
    got = text_perplexity(model, tok, [tok.decode(d)], context=6, stride=3, batch_size=2)
    assert tok.encode(tok.decode(d)) == d and got["tokens"] == 10
    assert got["loss"] * 10 == pytest.approx(want, rel=1e-5)
    assert abs(want - fresh) > 1e-2  # the windows' context tokens matter at these weights
    with pytest.raises(ConfigError, match=r"stride 6 > 5, .* after the 2 tokens .*would skip tokens"):
        text_perplexity(model, tok, [text], context=6, stride=6)  # a window of 6 scores 5


def _t5(tok):
    cfg = T5Config(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, head_dim=8, d_ff=48,
                   max_positions=64, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id,
                   decoder_start_token_id=tok.pad_id)
    return _randomize(lmzoo.build(cfg), std=0.2)


def _t5_nll(model, tok, enc: list[int], labels: list[int]) -> float:
    dec = [tok.pad_id] + labels[:-1]  # decoding starts from decoder_start_token_id
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([dec])).logits[0]
    return _nll_of_last(logits, labels)


def test_t5_first_window_encodes_eos_alone(tok):
    model = _t5(tok)
    text = "hello world 你好"
    d = tok.encode(text)
    out = text_perplexity(model, tok, [text])
    assert out["tokens"] == len(d) and out["context"] == 64
    assert out["loss"] * len(d) == pytest.approx(_t5_nll(model, tok, [tok.eos_id], d), rel=1e-5)


def test_t5_later_windows_encode_their_scored_context(tok):
    model = _t5(tok)
    d = tok.encode("What is 3 + 4? 7 and hello world")[:10]
    eos = tok.eos_id
    # context 6, stride 3: the encoder reads what the window has already scored, then </s>
    want = (_t5_nll(model, tok, [eos], d[0:6]) + _t5_nll(model, tok, d[3:6] + [eos], d[6:9])
            + _t5_nll(model, tok, d[6:9] + [eos], d[9:10]))
    got = text_perplexity(model, tok, [tok.decode(d)], context=6, stride=3, batch_size=2)
    assert got["tokens"] == 10
    assert got["loss"] * 10 == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kw, texts, needle", [
    ({}, [], "nothing to score"),
    ({}, ["", ""], "nothing to score"),
    ({}, "a string", "list of texts"),
    ({"stride": 0}, [TEXT], "stride must be a positive integer"),
    ({"context": 1}, [TEXT], "at least 2 tokens"),
    ({"context": 8, "stride": 9}, [TEXT], "a stride larger than the context would skip tokens"),
    ({"context": 33}, [TEXT], "longer than the model's maximum length 32"),
])
def test_bad_input_is_one_clear_error(kw, texts, needle, tok, tmp_path):
    _, ours = _loaded(_hf_llama, tok, tmp_path)
    with pytest.raises(ConfigError, match=needle):
        text_perplexity(ours, tok, texts, **kw)


def test_an_encoder_is_refused_by_name(tok):
    model = lmzoo.build(BertConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, d_ff=48))
    with pytest.raises(ConfigError, match="the bert family is a 'encoder'"):
        text_perplexity(model, tok, [TEXT])
