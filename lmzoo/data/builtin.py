"""The built-in corpus: real text on every machine with Python, no download, nothing copied in.

Two parts, mixed in a seeded order:

- **English prose from the Python documentation** that CPython's standard library carries in
  ``pydoc_data/topics.py`` (the text ``help("if")`` prints: the language reference's sections on
  statements, expressions, data model...). 79 topics, about 465,000 characters on Python 3.11.
  It is read from the installed interpreter at run time; none of it is stored in this repository.
  Each topic is one document.
- **Bilingual English/Chinese documents** from ``lmzoo.data.bilingual`` (generated here).

``builtin_corpus(scale)`` returns plain strings; ``lmzoo speedrun`` trains a tokenizer and a model on
them. ``scale`` (0 < scale <= 1) keeps that share of both parts, for quick tests.
"""

from __future__ import annotations

import random

from lmzoo.data.bilingual import bilingual_documents
from lmzoo.errors import LmzooError

DEFAULT_BILINGUAL_DOCS = 3000  # about 1.4 M characters: roughly three times the pydoc prose


def pydoc_documents() -> list[str]:
    """The Python documentation topics shipped with the interpreter, in sorted topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions split pydoc_data into a separate package
        raise LmzooError("the built-in corpus reads pydoc_data.topics from the standard library, which this "
                         "Python lacks (install your distribution's full python3 package)") from e
    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def builtin_corpus(scale: float = 1.0, seed: int = 0, bilingual_docs: int = DEFAULT_BILINGUAL_DOCS) -> list[str]:
    """Pydoc prose + bilingual documents, shuffled together with ``seed``; ``scale`` keeps a share of each."""
    if not 0.0 < scale <= 1.0:
        raise LmzooError(f"scale must be in (0, 1], got {scale}")
    docs = pydoc_documents()
    if scale < 1.0:
        docs = random.Random(seed).sample(docs, max(1, round(scale * len(docs))))
    docs += bilingual_documents(max(1, round(scale * bilingual_docs)), seed=seed)
    random.Random(seed + 1).shuffle(docs)
    return docs


def describe_corpus(docs: list[str]) -> dict:
    """Counts for reports: documents, characters, and the share of CJK characters."""
    chars = sum(len(d) for d in docs)
    cjk = sum(1 for d in docs for c in d if "\u4e00" <= c <= "\u9fff" or c == "〇")
    return {"documents": len(docs), "characters": chars, "cjk_share": cjk / max(chars, 1)}
