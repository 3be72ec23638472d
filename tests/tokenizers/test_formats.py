"""vocab.txt, merges.txt and *.tiktoken read line by line the way their reference readers do.

A line ends at "\n" ("\r\n" and "\r" too). Characters that str.splitlines() also breaks at (U+2028,
U+2029, U+0085, \x0b, \x0c, \x1c-\x1e) are tokens of real vocabularies (Chinese BERT vocabularies
hold "\u2028" and "##\u2028"), so reading with splitlines() shifted every later id.
"""

from __future__ import annotations

import base64
import json

import pytest

import lmzoo

# every character str.splitlines() breaks at and a "\n" line does not
SEPARATORS = ["\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c"]
TEXTS = ["中国人民", "hello world", "中国 hello 人民 world", "国人 hel"]


def _bert_lines():
    words = ["中", "国", "人", "民", "##国", "##人", "hello", "world", "he", "##llo", "hel", "##lo", "wo", "##rld"]
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "\u2028", "##\u2028"] + words[:4] + SEPARATORS[1:]
            + [f"##{s}" for s in SEPARATORS[1:]] + ["a\u2029b"] + words[4:] + ["中"])  # "中" twice: last id wins


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_bert_vocab_ids_equal_bert_tokenizer_legacy(tmp_path, newline):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    lines = _bert_lines()
    path = tmp_path / "vocab.txt"
    path.write_bytes("".join(t + newline for t in lines).encode("utf-8"))
    ref = BertTokenizerLegacy(vocab_file=str(path))
    tok = lmzoo.load_tokenizer(path)
    assert len(ref.vocab) == len(lines) - 1 == 36  # one token per line; the repeated "中" is one token
    assert {t: tok.token_to_id(t) for t in ref.vocab} == dict(ref.vocab)
    assert tok.token_to_id("hello") == ref.vocab["hello"] == lines.index("hello") == 28  # splitlines(): 45
    assert tok.token_to_id("中") == ref.vocab["中"] == len(lines) - 1
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=True) == ref.encode(text), text


def test_bert_vocab_line_count_is_newlines_not_splitlines(tmp_path):
    from lmzoo.tokenizers.formats import read_bert_vocab

    path = tmp_path / "vocab.txt"
    path.write_text("[UNK]\n\u2028\n##\u2028\nx\n", encoding="utf-8")
    assert read_bert_vocab(path) == {"[UNK]": 0, "\u2028": 1, "##\u2028": 2, "x": 3}
    assert len(path.read_text(encoding="utf-8").splitlines()) == 6  # what the old reader counted


def test_merges_with_separator_tokens_equal_tokenizers_bpe_from_file(tmp_path):
    from tokenizers import Tokenizer, models

    tokens, merges = ["<|endoftext|>", "a", "b", "c", "bc"], ["b c"]
    for s in SEPARATORS:  # "a" + s, then (a s) + "b": both sides of a merge may hold a separator
        tokens += [s, f"a{s}", f"a{s}b"]
        merges += [f"a {s}", f"a{s} b"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    ref = json.loads(Tokenizer(models.BPE.from_file(str(tmp_path / "vocab.json"),
                                                    str(tmp_path / "merges.txt"))).to_str())["model"]
    tok = lmzoo.load_tokenizer(tmp_path)  # the old reader: "merges.txt:3: expected 'left right' ..., got 'a '"
    mine = json.loads(tok.backend.tok.to_str())["model"]
    assert len(ref["merges"]) == len(merges) == 17
    assert mine["merges"] == ref["merges"] and mine["vocab"] == ref["vocab"]


def test_tiktoken_ranks_with_separator_bytes_equal_tiktoken(tmp_path, monkeypatch):
    from tiktoken.load import load_tiktoken_bpe

    from lmzoo.tokenizers.tiktoken_backend import read_ranks

    # the token bytes of U+2028, U+2029, U+0085 (multi-byte), CRLF, and "a" + U+2028, after the 256 bytes
    tokens = [bytes([b]) for b in range(256)] + [s.encode() for s in SEPARATORS[:3]] + [b"\r\n", b"a\xe2\x80\xa8"]
    path = tmp_path / "mine.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\r\n" % i for i, t in enumerate(tokens)))  # CRLF file
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file, do not cache it
    ref = load_tiktoken_bpe(str(path))
    assert len(ref) == len(tokens) == 261
    assert read_ranks(path) == ref and ref["\u2028".encode()] == 256
