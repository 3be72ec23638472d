"""SFT encoding (assistant-only labels, every turn, the end-of-turn token), overflow accounting, packing
without cross-contamination: a packed batch gives the per-token losses of each conversation run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmzoo
from lmzoo.data.instructions import builtin_sft_data
from lmzoo.data.sft import (IGNORE, PackedConversations, PaddedConversations, best_fit_decreasing,
                            encode_conversation, encode_conversations, sft_batches, split_conversations)
from lmzoo.errors import ConfigError, LmzooError
from lmzoo.objectives.causal_lm import causal_lm_loss

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]


def char_tokenizer(text: str):
    """One id per character (and per special), so token positions are character positions."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from lmzoo.tokenizers.backends import TokenizersBackend

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(text)))}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(SPECIALS)
    return lmzoo.Tokenizer(TokenizersBackend(hf, "chars"), roles={"unk": "<unk>", "eos": "<|im_end|>"})


def chat(*texts):
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(texts)]


@pytest.fixture(scope="module")
def chars():
    return char_tokenizer("userassistantsystem\n hiyookno0123456789abcdefghijklmnopqrstuvwxyz")


def test_two_turns_by_hand(chars):
    # <|im_start|> u s e r \n h i <|im_end|> \n  = positions 0-9
    # <|im_start|> a s s i s t a n t \n y o <|im_end|> \n  = 10-24: "y o <|im_end|>" at 21, 22, 23
    # <|im_start|> u s e r \n o k <|im_end|> \n  = 25-34
    # <|im_start|> a s s i s t a n t \n n o <|im_end|> \n  = 35-49: "n o <|im_end|>" at 46, 47, 48
    ids, labels = encode_conversation(chars, chat("hi", "yo", "ok", "no"), template="chatml")
    assert len(ids) == len(labels) == 50
    assert [k for k, y in enumerate(labels) if y != IGNORE] == [21, 22, 23, 46, 47, 48]
    assert all(labels[k] == ids[k] for k in (21, 22, 23, 46, 47, 48))
    end = chars.token_to_id("<|im_end|>")
    assert ids[23] == ids[48] == end and chars.decode(ids[21:23]) == "yo"
    ids2, everything = encode_conversation(chars, chat("hi", "yo", "ok", "no"), template="chatml",
                                           train_on_prompt=True)
    assert ids2 == ids and everything == [IGNORE] + ids[1:]  # the first token is never a target
    cut, cut_labels = encode_conversation(chars, chat("hi", "yo", "ok", "no"), template="chatml", max_len=23)
    assert cut == ids[:23] and [k for k, y in enumerate(cut_labels) if y != IGNORE] == [21, 22]


def test_system_turn_is_not_trained(chars):
    msgs = [{"role": "system", "content": "be"}] + chat("hi", "yo")
    ids, labels = encode_conversation(chars, msgs, template="chatml")
    # system segment: <|im_start|> s y s t e m \n b e <|im_end|> \n = 12 tokens; then the 25 of one round
    assert len(ids) == 12 + 25 and [k for k, y in enumerate(labels) if y != IGNORE] == [12 + 21, 12 + 22, 12 + 23]


def test_overflow_is_counted(chars):
    # one round costs 21 + len(user) + len(answer) tokens; the answer starts at 8 + len(user) + 11
    convs = [chat("hi", "yo"), chat("hi", "0123456789"), chat("abcdefghijklmnopqrst", "no")]
    ex = encode_conversations(chars, convs, max_len=30, template="chatml")
    assert ex.counts == {"kept": 1, "truncated": 1, "dropped": 1} and ex.dropped_index == [2]
    assert [len(x) for x in ex.input_ids] == [25, 30]
    assert [k for k, y in enumerate(ex.labels[1]) if y != IGNORE] == list(range(21, 30))
    assert "3 conversations: 1 kept, 1 truncated to 30 tokens, 1 dropped" in ex.summary()
    dropped = encode_conversations(chars, convs, max_len=30, template="chatml", overflow="drop")
    assert dropped.counts == {"kept": 1, "truncated": 0, "dropped": 2} and dropped.dropped_index == [1, 2]
    with pytest.raises(LmzooError, match="overflow must be one of"):
        encode_conversations(chars, convs, max_len=30, template="chatml", overflow="wrap")
    with pytest.raises(ConfigError, match=r"chat template 'llama2' writes \['bos_token'\], which chars does not"):
        encode_conversations(chars, convs, max_len=30, template="llama2")  # the char tokenizer names no bos
    with pytest.raises(LmzooError, match="no conversation is left"):
        encode_conversations(chars, convs[2:], max_len=30, template="chatml")
    with pytest.raises(LmzooError, match="conversation 0: chat template: chatml"):
        encode_conversations(chars, [[{"role": "user", "content": "hi"}]], max_len=30,
                             template="{{ raise_exception('chatml needs an answer') }}")


def test_best_fit_decreasing_by_hand():
    # 5 -> new bin A (3 left); 4 -> new B (4 left); 3 -> A (the tightest fit, 0 left); 3 -> B (1 left);
    # 2 -> new C; 1 -> B
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    with pytest.raises(LmzooError, match="item 1 has 9 tokens, more than a row of 8"):
        best_fit_decreasing([1, 9], 8)


def test_packed_rows_fence_each_conversation(chars):
    convs = [chat("hi", "yo"), chat("ok", "no", "hi", "yo"), chat("hi", "no")]
    ex = encode_conversations(chars, convs, max_len=60, template="chatml")
    rows = PackedConversations(ex, seq_len=60, pad_id=0)
    assert rows.rows == [[1], [0, 2]]  # 50 tokens alone; 25 + 25 together
    b = rows.batch([0, 1])
    assert b["input_ids"].shape == b["labels"].shape == b["doc_ids"].shape == (2, 50)
    assert b["doc_ids"][1].tolist() == [0] * 25 + [1] * 25 and b["doc_ids"][0].tolist() == [0] * 50
    assert b["labels"][1, 25] == IGNORE  # conversation 2's first token: not predicted from conversation 0
    assert b["input_ids"][1, :25].tolist() == ex.input_ids[0] and b["labels"][1, 25:].tolist() == ex.labels[2]
    padded = PaddedConversations(ex, pad_id=0).batch([0, 1])
    assert padded["attention_mask"].sum(1).tolist() == [25, 50]
    assert (padded["labels"][0, 25:] == IGNORE).all() and padded["labels"][1].tolist() == ex.labels[1]
    ex2 = encode_conversations(chars, [chat("hi", "yo"), chat("hi", "yo", "ok", "no")], 60, "chatml")
    mixed = PackedConversations(ex2, seq_len=60)
    assert mixed.rows == [[1], [0]]  # 50 + 25 > 60
    mixed = mixed.batch([0, 1])  # rows of 50 and 25 tokens: the short one's tail is padding, a document of its own
    assert (mixed["input_ids"][1, 25:] == 0).all()
    assert mixed["doc_ids"][1].tolist() == [0] * 25 + [1] * 25 and (mixed["labels"][1, 25:] == IGNORE).all()


# -- the loss: a packed batch equals the conversations one by one --------------------------------------


@pytest.fixture(scope="module")
def sft_tok():
    data = builtin_sft_data(300, seed=1)
    texts = [m["content"] for c in data.train for m in c]
    return lmzoo.train_tokenizer("bpe", texts=texts, vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"])


def conversations():
    convs = builtin_sft_data(10, seed=2).train
    system = {"role": "system", "content": "你是一个严谨的助手。"}
    return convs + [[system] + chat("把 305 写成中文数字。", "三百零五", "What is 2 + 3?", "5", "Sort: 3 1", "1 3")]


def tiny(family, vocab_size):
    from lmzoo.models.registry import get_family

    cfg = next(iter(get_family(family).presets.values())).replace(
        vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=None, d_ff=64,
        max_positions=160, dtype="float32")
    torch.manual_seed(0)
    return lmzoo.build(cfg).eval()


def token_losses(logits, labels):
    """Per-token CE of the trained positions, in order: logits at t predict the label at t + 1."""
    ce = F.cross_entropy(logits[:-1], labels[1:].clamp(min=0), reduction="none")
    return ce[labels[1:] != IGNORE]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # RoPE; learned absolute positions
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_loss_equals_one_by_one(sft_tok, family, train_on_prompt):
    ex = encode_conversations(sft_tok, conversations(), max_len=150, template="chatml",
                              train_on_prompt=train_on_prompt)
    model = tiny(family, sft_tok.vocab_size)
    rows = PackedConversations(ex, seq_len=150)
    assert len(rows) < len(ex)  # several conversations share a row
    b = rows.batch(range(len(rows)))
    with torch.no_grad():
        out = model(b["input_ids"], doc_ids=b["doc_ids"])
        leaky = model(b["input_ids"]).logits
        alone = [token_losses(model(torch.tensor([ex.input_ids[i]])).logits[0], torch.tensor(ex.labels[i]))
                 for row in rows.rows for i in row]
    packed = torch.cat([token_losses(out.logits[r], b["labels"][r]) for r in range(len(rows))])
    alone = torch.cat(alone)
    assert packed.numel() == alone.numel() == ex.n_trained
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-6)
    mean = causal_lm_loss(out.logits, b["labels"])
    torch.testing.assert_close(mean, alone.sum() / alone.numel(), atol=1e-5, rtol=0)
    leaked = torch.cat([token_losses(leaky[r], b["labels"][r]) for r in range(len(rows))])
    assert (leaked - alone).abs().max() > 1e-3  # without doc_ids later conversations see earlier ones


def test_padded_loss_equals_one_by_one(sft_tok):
    ex = encode_conversations(sft_tok, conversations(), max_len=150, template="chatml")
    model = tiny("llama", sft_tok.vocab_size)
    b = PaddedConversations(ex, pad_id=0).batch(range(len(ex)))
    with torch.no_grad():
        logits = model(b["input_ids"], attention_mask=b["attention_mask"]).logits
        alone = torch.cat([token_losses(model(torch.tensor([x])).logits[0], torch.tensor(y))
                           for x, y in zip(ex.input_ids, ex.labels)])
    padded = torch.cat([token_losses(logits[r], b["labels"][r]) for r in range(len(ex))])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-6)


def test_sft_batches_resume_and_split(sft_tok):
    convs = builtin_sft_data(60, seed=3).train
    first, ex = sft_batches(sft_tok, convs, seq_len=64, batch_size=2, template="chatml", seed=5)
    assert ex.counts["kept"] + ex.counts["truncated"] == len(ex) and sum(ex.counts.values()) == 60
    next(first)
    state = first.state_dict()
    want = next(first)
    again, _ = sft_batches(sft_tok, convs, seq_len=64, batch_size=2, template="chatml", seed=5)
    again.load_state_dict(state)
    got = next(again)
    assert set(got) == {"input_ids", "labels", "doc_ids"}
    assert all(torch.equal(got[k], want[k]) for k in got)
    padded, _ = sft_batches(sft_tok, convs, seq_len=64, batch_size=4, template="chatml", packing=False)
    assert set(next(padded)) == {"input_ids", "labels", "attention_mask"}
    train, val = split_conversations(convs, 0.1, seed=0)
    assert len(val) == 6 and len(train) == 54 and sorted(map(str, train + val)) == sorted(map(str, convs))
    assert split_conversations(convs, 0.1, seed=0) == (train, val)


@pytest.mark.parametrize("name, template, trained", [
    ("qwen", None, lambda answer: answer + "<|im_end|>"),  # Qwen's own template: ChatML
    ("llama2", "llama2", lambda answer: answer.strip() + " </s>"),
])
def test_real_alpaca_answers_are_exactly_the_trained_tokens(name, template, trained):
    from lmzoo.data.conversations import read_conversations
    from tests.shared_data import DATA, need

    convs = [c for lang in ("en", "zh")
             for c in read_conversations(need(DATA / "sft" / f"alpaca_{lang}_demo.json"))[:60]]
    tok = lmzoo.load_tokenizer(need(DATA / "tokenizers" / name))
    ex = encode_conversations(tok, convs, max_len=4096, template=template)
    assert ex.counts == {"kept": 120, "truncated": 0, "dropped": 0}
    for conv, labels in zip(convs, ex.labels):
        assert tok.decode([y for y in labels if y != IGNORE]) == trained(conv[-1]["content"])
