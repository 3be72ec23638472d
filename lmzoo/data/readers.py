r"""Documents out of the files people pretrain on: one reader per format, chosen by the path.

| source | reader | a document is |
|---|---|---|
| ``.txt``, ``.md``, any other text file | ``read_text`` | the whole file (``split="blank"``: each blank-line-separated block; ``"line"``: each line) |
| ``.jsonl`` | ``read_jsonl`` | the ``field`` of each line (default ``text``) |
| ``.json`` | ``read_json`` | the ``field`` of each record of a list (lists of strings are joined by newlines) |
| ``.parquet`` | ``read_parquet`` | the ``field`` column of each row (needs ``pyarrow``: ``pip install lmzoo[parquet]``) |
| a folder written by ``datasets``' ``save_to_disk`` | ``read_hf_disk`` | the ``field`` column of each row of ``split`` |

The Hugging Face folder is read with ``pyarrow`` straight from its Arrow files (``state.json`` lists
them; a ``DatasetDict`` has ``dataset_dict.json`` and one folder per split), so the ``datasets``
package itself is not needed to read what it wrote. Every failure is an ``LmzooError`` that names
the file: missing, unreadable, not UTF-8, a record without the field, or no text at all.

A line is what ends at ``\n`` (``\r\n`` and ``\r`` are read as ``\n``, Python's universal newlines,
as ``open()`` and the ``datasets`` text loader split). Not ``str.splitlines()``: it also splits at
U+2028, U+2029, U+0085, ``\x0b``, ``\x0c`` and ``\x1c``-``\x1e``, which are ordinary characters
inside a line of a corpus, a vocab.txt or a JSON-lines file. Every text file lmzoo reads (corpora,
tokenizer training text, vocab.txt, merges.txt, calibration text) goes through ``read_utf8`` and
``text_lines`` (or ``utf8_lines``, which streams a large JSON-lines file).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

from lmzoo.errors import LmzooError

TEXT_SPLITS = ("file", "blank", "line")


def _need_pyarrow(path: Path, what: str):
    try:
        import pyarrow  # noqa: F401
    except ImportError as e:
        raise LmzooError(f"{path}: reading {what} needs pyarrow, which is not installed; "
                         "install it with `pip install lmzoo[parquet]` (or `pip install pyarrow`)") from e
    return pyarrow


def _as_text(value, path: Path, where: str, field: str) -> str:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)  # e.g. the chinese-poetry records' "paragraphs"
    if not isinstance(value, str):
        raise LmzooError(f"{path}: {where}: field '{field}' holds {type(value).__name__}, expected a string "
                         "(or a list of strings)")
    return value


def read_utf8(path) -> str:
    r"""The text of the file ``path``, newlines read as ``\n``; an ``LmzooError`` naming the file when
    it is missing, a folder, unreadable or not UTF-8 ("PATH: not UTF-8 text (invalid start byte at
    byte 0)"): the one way lmzoo reads a text file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise LmzooError(f"{path}: no such file") from e
    except IsADirectoryError as e:
        raise LmzooError(f"{path}: is a folder, expected a text file") from e
    except OSError as e:
        raise LmzooError(f"{path}: cannot be read ({e.strerror or e})") from e
    try:
        text = data.decode("utf-8")  # decoded in one piece, so e.start is the byte offset in the file
    except UnicodeDecodeError as e:
        raise LmzooError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return text.replace("\r\n", "\n").replace("\r", "\n")  # what open()'s universal newlines do


def text_lines(text: str) -> list[str]:
    r"""The lines of ``text`` split at ``\n`` only (see the module docstring for why not
    ``splitlines``); a final ``\n`` ends the last line rather than starting an empty one."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def utf8_lines(path) -> Iterator[str]:
    r"""The lines of a file too large to hold at once, streamed, split at ``\n`` and without their
    ``\n`` / ``\r\n`` (a lone ``\r`` stays: JSON reads it as whitespace); a line that is not UTF-8
    is the same ``LmzooError`` as in ``read_utf8``, at its byte in the file."""
    path = Path(path)
    offset = 0
    with open(path, "rb") as f:
        for raw in f:  # a binary file splits at b"\n" only
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LmzooError(f"{path}: not UTF-8 text ({e.reason} at byte {offset + e.start})") from e
            offset += len(raw)
            line = line[:-1] if line.endswith("\n") else line
            yield line[:-1] if line.endswith("\r") else line


def read_text(path: Path, field: str | None = None, split: str = "file") -> Iterator[str]:
    if split not in TEXT_SPLITS:
        raise LmzooError(f"{path}: text split must be one of {TEXT_SPLITS}, got '{split}'")
    raw = read_utf8(path)
    if split == "file":
        yield raw
    elif split == "line":
        yield from text_lines(raw)
    else:
        yield from re.split(r"\n\s*\n", raw)


def read_jsonl(path: Path, field: str | None = None, split: str = "file") -> Iterator[str]:
    field = field or "text"
    for n, line in enumerate(utf8_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise LmzooError(f"{path}: line {n} is not valid JSON ({e})") from e
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise LmzooError(f"{path}: line {n} has no field '{field}' (it has {keys}); choose one with field=")
        yield _as_text(record[field], path, f"line {n}", field)


def read_json(path: Path, field: str | None = None, split: str = "file") -> Iterator[str]:
    raw = read_utf8(path)
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise LmzooError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise LmzooError(f"{path}: expected a JSON list of records or strings, got {type(data).__name__}")
    for n, record in enumerate(data):
        if isinstance(record, str) and field is None:
            yield record
            continue
        f = field or "text"
        if not isinstance(record, dict) or f not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise LmzooError(f"{path}: record {n} has no field '{f}' (it has {keys}); choose one with field=")
        yield _as_text(record[f], path, f"record {n}", f)


def _column(table, path: Path, field: str):
    if field not in table.column_names:
        raise LmzooError(f"{path}: no column '{field}' (columns: {table.column_names}); choose one with field=")
    for n, value in enumerate(table.column(field).to_pylist()):
        yield _as_text(value, path, f"row {n}", field)


def read_parquet(path: Path, field: str | None = None, split: str = "file") -> Iterator[str]:
    _need_pyarrow(path, "Parquet")
    import pyarrow.parquet as pq

    field = field or "text"
    try:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[field] if field in names else None)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on damaged files
        raise LmzooError(f"{path}: not a readable Parquet file ({e})") from e
    yield from _column(table, path, field)


def read_hf_disk(path: Path, field: str | None = None, split: str = "train") -> Iterator[str]:
    """A ``datasets`` ``save_to_disk`` folder (``Dataset`` or ``DatasetDict``); ``split`` picks the split."""
    pa = _need_pyarrow(path, "a Hugging Face dataset folder")
    if (path / "dataset_dict.json").is_file():
        splits = json.loads(read_utf8(path / "dataset_dict.json"))["splits"]
        if split not in splits:
            raise LmzooError(f"{path}: no split '{split}' (splits: {splits})")
        path = path / split
    state_file = path / "state.json"
    if not state_file.is_file():
        raise LmzooError(f"{path}: not a dataset folder written by save_to_disk (no state.json or dataset_dict.json)")
    for entry in json.loads(read_utf8(state_file))["_data_files"]:
        arrow = path / entry["filename"]
        try:
            with pa.memory_map(str(arrow), "r") as source:
                table = pa.ipc.open_stream(source).read_all()  # datasets writes the Arrow stream format
        except Exception as e:
            raise LmzooError(f"{arrow}: not a readable Arrow file ({e})") from e
        yield from _column(table, arrow, field or "text")


READERS: dict[str, Callable[..., Iterator[str]]] = {
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".parquet": read_parquet,
}


def reader_for(path: Path) -> Callable[..., Iterator[str]]:
    if path.is_dir():
        return read_hf_disk
    return READERS.get(path.suffix.lower(), read_text)


def read_documents(path, field: str | None = None, split: str | None = None) -> Iterator[str]:
    """The non-empty documents of ``path`` (see the module docstring for what a document is).

    ``field`` picks the JSON key or column (default ``text``); ``split`` is the text split
    (``file``/``blank``/``line``) for text files and the dataset split (default ``train``) for a
    Hugging Face folder. Raises ``LmzooError`` naming the file when it holds no text at all.
    """
    path = Path(path)
    if not path.exists():
        raise LmzooError(f"{path}: no such file or folder")
    reader = reader_for(path)
    split = split or ("train" if reader is read_hf_disk else "file")
    n = 0
    try:
        for doc in reader(path, field=field, split=split):
            if doc.strip():
                n += 1
                yield doc
    except OSError as e:
        raise LmzooError(f"{path}: cannot be read ({e.strerror or e})") from e
    if n == 0:
        raise LmzooError(f"{path}: holds no text (empty, or every document is blank)")
