"""Tokenise once into a memmap, cached by the content hash of data and tokenizer."""

import numpy as np
import pytest

import lmzoo
from lmzoo.data import token_file as tfmod
from lmzoo.data.token_file import TokenFile, token_dtype, tokenize_files, tokenize_texts
from lmzoo.errors import LmzooError
from tests.data.conftest import TEXTS


def test_documents_round_trip_with_eos(tok, tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "the cat sat"}\n{"text": "二〇二一年"}\n', encoding="utf-8")
    tf = tokenize_files(f, tok, cache_dir=tmp_path / "cache")
    assert tf.n_docs == 2
    assert isinstance(tf.tokens, np.memmap) and tf.tokens.dtype == np.uint16
    eos = tok.eos_id
    for i, text in enumerate(["the cat sat", "二〇二一年"]):
        ids = tf.doc(i).tolist()
        assert ids == tok.encode(text) + [eos]
        assert tok.decode(ids[:-1]) == text
    assert tf.n_tokens == len(tok.encode("the cat sat")) + len(tok.encode("二〇二一年")) + 2


def test_dtype_follows_the_vocabulary():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32 and token_dtype(151643) == np.uint32


def test_cache_hit_and_invalidation(tok, tmp_path, monkeypatch):
    f = tmp_path / "a.txt"
    f.write_text("the cat sat on the mat")
    cache = tmp_path / "cache"
    first = tokenize_files(f, tok, cache_dir=cache)
    calls = []
    real = tfmod.write_token_file
    monkeypatch.setattr(tfmod, "write_token_file", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = tokenize_files(f, tok, cache_dir=cache)
    assert again.path == first.path and calls == []  # same bytes, same tokenizer: read from the cache
    f.write_text("the cat sat on the mat!")
    changed = tokenize_files(f, tok, cache_dir=cache)
    assert changed.path != first.path and calls == [1]
    other_tok = lmzoo.train_tokenizer("bpe", texts=TEXTS, vocab_size=280)
    assert tokenize_files(f, other_tok, cache_dir=cache).path not in (first.path, changed.path)
    assert tokenize_files(f, tok, cache_dir=cache, eos=False).path != changed.path
    # an interrupted write (no .json yet) is made again
    changed.path.with_suffix(".json").unlink()
    tokenize_files(f, tok, cache_dir=cache)
    assert calls == [1, 1, 1, 1]


def test_texts_are_cached_by_content(tok, tmp_path):
    a = tokenize_texts(["x y", "z"], tok, cache_dir=tmp_path)
    assert tokenize_texts(["x y", "z"], tok, cache_dir=tmp_path).path == a.path
    assert tokenize_texts(["x y", "z w"], tok, cache_dir=tmp_path).path != a.path
    with pytest.raises(LmzooError, match="every text is empty"):
        tokenize_texts(["", "  "], tok, cache_dir=tmp_path)


def test_bad_inputs_and_damaged_files(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(LmzooError, match=r"empty\.jsonl: holds no text"):
        tokenize_files(empty, tok, cache_dir=tmp_path / "c")
    with pytest.raises(LmzooError, match=r"missing\.txt: no such file"):
        tokenize_files(tmp_path / "missing.txt", tok, cache_dir=tmp_path / "c")
    f = tmp_path / "a.txt"
    f.write_text("the cat")
    tf = tokenize_files(f, tok, cache_dir=tmp_path / "c")
    with open(tf.path.with_suffix(".bin"), "ab") as fh:
        fh.write(b"\0\0")
    with pytest.raises(LmzooError, match=r"\.bin: .* bytes, expected"):
        TokenFile.open(tf.path)


def test_cache_files_follow_the_umask(tok, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        tf = tokenize_texts(["x y", "z"], tok, cache_dir=tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tf.path.parent.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes  # mkstemp alone would leave 0600
