"""Training: each kind is deterministic (also across processes), honours its vocab size and specials,
saves a tokenizer.json that transformers encodes identically, and handles Chinese well."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

import lmzoo
from lmzoo.errors import LmzooError
from tests.tokenizers.corpus import tiny_corpus
from tests.tokenizers.strings import CORPORA, EDGE_CASES, need

KINDS = {"bpe": 700, "wordpiece": 600, "unigram": 500, "sp-bpe": 700}
SPECIALS = {"bpe": ["<|endoftext|>"], "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            "unigram": ["<pad>", "</s>", "<unk>"], "sp-bpe": ["<unk>", "<s>", "</s>"]}
PROBE = ["床前明月光，疑是地上霜。", "To be, or not to be: that is the question.", "分词器 tokenizer 😀"] + EDGE_CASES

_HASH_SCRIPT = """
import hashlib, json, sys
sys.path.insert(0, {root!r})
import lmzoo
from tests.tokenizers.corpus import tiny_corpus
out = {{}}
for kind, size in json.loads({kinds!r}).items():
    tok = lmzoo.train_tokenizer(kind, texts=tiny_corpus(), vocab_size=size, special_tokens=["<|im_end|>"], sentinels=8)
    out[kind] = hashlib.sha256(tok.backend.tok.to_str().encode()).hexdigest()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def trained():
    return {k: lmzoo.train_tokenizer(k, texts=tiny_corpus(), vocab_size=v, special_tokens=["<|im_end|>"], sentinels=8)
            for k, v in KINDS.items()}


def test_training_is_deterministic_across_processes(trained):
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    here = {k: hashlib.sha256(t.backend.tok.to_str().encode()).hexdigest() for k, t in trained.items()}
    again = lmzoo.train_tokenizer("wordpiece", texts=tiny_corpus(), vocab_size=KINDS["wordpiece"],
                                  special_tokens=["<|im_end|>"])
    assert hashlib.sha256(again.backend.tok.to_str().encode()).hexdigest() == here["wordpiece"]
    # a fresh process gets fresh hash seeds: this is where tokenizers' own WordPiece/Unigram trainers drift
    r = subprocess.run([sys.executable, "-c", _HASH_SCRIPT.format(root=root, kinds=json.dumps(KINDS))],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == here


@pytest.mark.parametrize("kind", list(KINDS))
def test_vocab_size_and_special_tokens(trained, kind):
    tok = trained[kind]
    assert tok.vocab_size <= KINDS[kind] and tok.vocab_size >= 0.9 * KINDS[kind]
    for k, s in enumerate(SPECIALS[kind]):
        assert tok.token_to_id(s) == k, (kind, s)
    assert tok.encode("<|im_end|>") == [tok.token_to_id("<|im_end|>")]  # an extra special is one token
    if kind == "unigram":  # T5: the sentinels are the last ids, <extra_id_0> the very last
        assert tok.token_to_id("<extra_id_0>") == tok.vocab_size - 1
        assert tok.token_to_id("<extra_id_7>") == tok.vocab_size - 8
        assert tok.encode("hi", add_special_tokens=True)[-1] == tok.eos_id == 1
    if kind == "sp-bpe":  # LLaMA: <0x00>..<0xFF> right after the specials, BOS prepended
        assert tok.token_to_id("<0x00>") == 4 and tok.token_to_id("<0xFF>") == 259  # after 4 specials
        assert tok.encode("hi", add_special_tokens=True)[0] == tok.bos_id == 1
    if kind == "wordpiece":
        ids = tok.encode("hi", add_special_tokens=True)
        assert (ids[0], ids[-1]) == (tok.cls_id, tok.sep_id) == (2, 3)


@pytest.mark.parametrize("kind", list(KINDS))
def test_saved_tokenizer_json_encodes_identically_in_transformers(trained, kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = trained[kind]
    tok.save(tmp_path)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for t in PROBE:
        assert tok.encode(t) == ref.encode(t, add_special_tokens=False), (kind, t)
        assert tok.encode(t, add_special_tokens=True) == ref.encode(t), (kind, t)
        ids = tok.encode(t)
        assert tok.decode(ids) == ref.decode(ids), (kind, t)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))  # with tokenizer_config.json's specials
    assert auto.eos_token == tok.eos_token and auto.pad_token == tok.pad_token


@pytest.mark.parametrize("kind", ["bpe", "sp-bpe"])
def test_byte_level_kinds_round_trip_everything(trained, kind):
    tok = trained[kind]
    texts = PROBE + ["稀有字：龘靐齉 and emoji 🤖"]
    bad = [t for t in texts if tok.decode(tok.encode(t)) != t]
    assert not bad
    assert not any(i == tok.unk_id for t in texts for i in tok.encode(t))  # bytes, never <unk>


def test_empty_corpus_and_bad_settings_raise(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for kind in KINDS:
        with pytest.raises(LmzooError, match="empty"):
            lmzoo.train_tokenizer(kind, files=[empty], vocab_size=500)
    with pytest.raises(LmzooError, match="empty"):
        lmzoo.train_tokenizer("bpe", texts=iter([]), vocab_size=500)
    with pytest.raises(LmzooError, match="unknown tokenizer kind"):
        lmzoo.train_tokenizer("bbpe", texts=["x"], vocab_size=500)
    with pytest.raises(LmzooError, match="no room"):
        lmzoo.train_tokenizer("sp-bpe", texts=["x"], vocab_size=200)


def test_chinese_training_is_sensible():
    """Trained on 90% of the Chinese corpora (Tang poems in traditional characters, Song lyrics and
    the Analects in simplified), tested on the held-out 10%: no flood of unknown tokens (only
    characters the training text never had), and merges of common characters pay off."""
    import random

    zh = []
    for name in ("tang300", "songci300", "lunyu"):
        zh += [p for rec in json.loads((need(CORPORA) / "zh" / f"{name}.json").read_text()) for p in rec["paragraphs"]]
    random.Random(0).shuffle(zh)
    held, train = zh[:400], zh[400:]
    n_chars = sum(len(t) for t in held)
    for kind in KINDS:
        tok = lmzoo.train_tokenizer(kind, texts=train, vocab_size=8000)
        ids = [i for t in held for i in tok.encode(t)]
        unk = sum(i == tok.unk_id for i in ids) / len(ids)
        assert unk < 0.03, (kind, unk)  # measured 0.0167 for wordpiece and unigram, 0 for the byte kinds
        for common in ["不", "人", "山", "月", "之", "曰"]:
            assert tok.unk_id not in tok.encode(common) and len(tok.encode(common)) <= 2, (kind, common)
        if kind == "wordpiece":  # BERT style: one token per Chinese character, by design
            assert len(tok.encode("学而时习之")) == 5
        else:  # frequent words are single tokens: fewer tokens than characters (0.89-0.93 measured)
            assert len(ids) / n_chars < 0.97, (kind, len(ids) / n_chars)
            assert len(tok.encode("子曰：学而时习之")) < 8, kind  # e.g. 子曰 学而 (+ "▁" for unigram)
