import json

import numpy as np
import pytest

import lmzoo

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "二〇二一年三月五日是星期五。", "one two three four five"] * 5


@pytest.fixture(scope="session")
def tok():
    return lmzoo.train_tokenizer("bpe", texts=TEXTS, vocab_size=300)


def make_token_file(path, doc_lengths, start=10):
    """A token file written by hand (the documented layout): document i holds consecutive ids."""
    from lmzoo.data.token_file import TokenFile

    tokens = np.arange(start, start + sum(doc_lengths), dtype=np.uint16)
    path.with_suffix(".bin").write_bytes(tokens.tobytes())
    np.save(path.with_suffix(".idx.npy"), np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64))
    path.with_suffix(".json").write_text(json.dumps({"format": 1, "dtype": "uint16", "n_docs": len(doc_lengths),
                                                     "n_tokens": int(sum(doc_lengths))}))
    return TokenFile.open(path)
