"""Text out of the files people train and measure tokenizers on: plain text, JSON, JSON lines.

JSON (and each JSON line) gives its strings: the ``paragraphs`` lists when records have them (the
chinese-poetry collections), otherwise every string value except ids and the like.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmzoo.data.readers import read_utf8, text_lines
from lmzoo.errors import LmzooError

_SKIP_KEYS = {"id", "_id", "uuid", "url", "tags", "author", "title", "chapter", "rhythmic", "source"}


def _strings(obj, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, list):
        for x in obj:
            _strings(x, out)
    elif isinstance(obj, dict):
        if "paragraphs" in obj:
            _strings(obj["paragraphs"], out)
            return
        for k, v in obj.items():
            if k not in _SKIP_KEYS:
                _strings(v, out)


def read_texts(path) -> list[str]:
    """The non-empty lines (or JSON strings) of a file; lines end at "\\n" only, so a U+2028 inside a
    line stays in it (lmzoo.data.readers says why)."""
    path = Path(path)
    raw = read_utf8(path)
    out: list[str] = []
    if path.suffix == ".json":
        try:
            _strings(json.loads(raw), out)
        except ValueError as e:
            raise LmzooError(f"{path}: not valid JSON ({e})") from e
    elif path.suffix == ".jsonl":
        for n, line in enumerate(text_lines(raw), 1):
            if line.strip():
                try:
                    _strings(json.loads(line), out)
                except ValueError as e:
                    raise LmzooError(f"{path}: line {n} is not valid JSON ({e})") from e
    else:
        out = text_lines(raw)
    return [t for t in out if t.strip()]


def sample_texts(texts: list[str], max_chars: int | None) -> list[str]:
    """The first texts up to ``max_chars`` characters in total (all when None)."""
    if max_chars is None:
        return list(texts)
    out, n = [], 0
    for t in texts:
        if n >= max_chars:
            break
        out.append(t[: max_chars - n])
        n += len(out[-1])
    return out
