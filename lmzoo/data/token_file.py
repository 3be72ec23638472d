"""Tokenise once into a memory-mapped token file, cached by the content hash of data + tokenizer.

A token file is three files next to each other:

    <key>.bin       every document's ids, back to back (uint16 when the vocabulary fits, else uint32)
    <key>.idx.npy   document offsets into .bin, (n_docs + 1,) int64: document i is bin[off[i]:off[i+1]]
    <key>.json      what it was made from (sources, tokenizer fingerprint, counts); written last

``key`` is a SHA-256 over the bytes of every source file, how each is read (field, split), the
tokenizer (the bytes of the files ``Tokenizer.save`` writes) and the separator ids, so changing any
of them makes a new file and an unchanged input is never tokenised twice. Each file is written
under a temporary name, fsynced and renamed, and the .json goes last: a file set without its .json
is an interrupted write and is made again. ``np.memmap`` reads the ids without loading them, so a
corpus larger than memory costs only its pages in use.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lmzoo.data.readers import read_documents
from lmzoo.errors import LmzooError
from lmzoo.interop.safetensors_io import umask

FORMAT_VERSION = 1
CHUNK_DOCS = 512  # documents per encode_batch call (the tokenizers backend encodes a batch in parallel)


def default_cache_dir() -> Path:
    """``$LMZOO_CACHE/tokens``, else ``~/.cache/lmzoo/tokens``."""
    root = os.environ.get("LMZOO_CACHE") or Path.home() / ".cache" / "lmzoo"
    return Path(root) / "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class TokenFile:
    """A tokenised corpus on disk: ``tokens`` (memmap) and document ``offsets``."""

    path: Path  # without suffix
    tokens: np.ndarray
    offsets: np.ndarray
    meta: dict = dc_field(default_factory=dict)

    @classmethod
    def open(cls, path) -> "TokenFile":
        path = Path(path)
        meta_file = path.with_suffix(".json")
        if not meta_file.is_file():
            raise LmzooError(f"{meta_file}: no token file here (or its write was interrupted)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise LmzooError(f"{meta_file}: token file format {meta.get('format')}, expected {FORMAT_VERSION}")
        dtype = np.dtype(meta["dtype"])
        bin_file = path.with_suffix(".bin")
        size = bin_file.stat().st_size if bin_file.is_file() else -1
        if size != meta["n_tokens"] * dtype.itemsize:
            raise LmzooError(f"{bin_file}: {size} bytes, expected {meta['n_tokens']} tokens x {dtype.itemsize} bytes")
        tokens = np.memmap(bin_file, dtype=dtype, mode="r", shape=(meta["n_tokens"],)) if meta["n_tokens"] else \
            np.zeros(0, dtype)
        offsets = np.load(path.with_suffix(".idx.npy"))
        if offsets.shape != (meta["n_docs"] + 1,) or int(offsets[-1]) != meta["n_tokens"]:
            raise LmzooError(f"{path.with_suffix('.idx.npy')}: offsets do not match {meta_file}")
        return cls(path, tokens, offsets, meta)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]])


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; the cache follows the user's umask like any file
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _encode_chunks(docs: Iterable[str], tokenizer) -> Iterator[list[int]]:
    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == CHUNK_DOCS:
            yield from tokenizer.encode_batch(chunk, padding=False, split_special=False)["input_ids"]
            chunk = []
    if chunk:
        yield from tokenizer.encode_batch(chunk, padding=False, split_special=False)["input_ids"]


def separator_ids(tokenizer, bos: bool, eos: bool) -> tuple[list[int], list[int]]:
    """([bos], [eos]) around every document: eos falls back to sep (BERT vocabularies have no eos)."""
    head, tail = [], []
    if bos:
        if tokenizer.bos_id is None:
            raise LmzooError(f"{tokenizer.name}: bos=True but the tokenizer names no bos token")
        head = [tokenizer.bos_id]
    if eos:
        end = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
        if end is None:
            raise LmzooError(f"{tokenizer.name}: eos=True but the tokenizer names no eos (or sep) token")
        tail = [end]
    return head, tail


def write_token_file(docs: Iterable[str], tokenizer, path, *, bos: bool = False, eos: bool = True,
                     meta: dict | None = None, progress: bool = False) -> TokenFile:
    """Tokenise ``docs`` into ``path``.bin/.idx.npy/.json (see the module docstring); returns it opened."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head, tail = separator_ids(tokenizer, bos, eos)
    dtype = token_dtype(tokenizer.vocab_size)
    offsets = [0]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="tokenising", unit=" docs", leave=False)

    def write_bin(f):
        for ids in _encode_chunks(docs, tokenizer):
            ids = head + ids + tail
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            offsets.append(offsets[-1] + len(ids))
            if bar is not None:
                bar.update(1)

    _atomic_write(path.with_suffix(".bin"), write_bin)
    if bar is not None:
        bar.close()
    if offsets[-1] == 0:
        path.with_suffix(".bin").unlink()
        raise LmzooError(f"no tokens to write to {path}.bin: the documents are empty")
    _atomic_write(path.with_suffix(".idx.npy"), lambda f: np.save(f, np.asarray(offsets, dtype=np.int64)))
    info = {"format": FORMAT_VERSION, "dtype": dtype.name, "n_docs": len(offsets) - 1, "n_tokens": offsets[-1],
            "vocab_size": tokenizer.vocab_size, "bos": head, "eos": tail, **(meta or {})}
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(info, ensure_ascii=False, indent=1).encode()))
    return TokenFile.open(path)


# --------------------------------------------------------------------------------------------
# Content hashes and the cache
# --------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the files ``tokenizer.save`` writes (vocabulary, merges, config)."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def file_fingerprint(path) -> str:
    """SHA-256 of a file's bytes, or of every file under a folder (relative names included)."""
    path = Path(path)
    if not path.exists():
        raise LmzooError(f"{path}: no such file or folder")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    try:
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else "").encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    except OSError as e:
        raise LmzooError(f"{f}: cannot be read ({e.strerror or e})") from e
    return h.hexdigest()


def _cached(key_parts: dict, docs, tokenizer, cache_dir, bos, eos, progress) -> TokenFile:
    key_parts = {"format": FORMAT_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer), "bos": bos, "eos": eos,
                 **key_parts}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    path = Path(cache_dir or default_cache_dir()) / key[:24]
    try:
        return TokenFile.open(path)
    except (LmzooError, OSError, ValueError, KeyError):
        pass  # absent or incomplete: make it
    return write_token_file(docs(), tokenizer, path, bos=bos, eos=eos,
                            meta={"key": key, "sources": key_parts.get("sources", "texts")}, progress=progress)


def tokenize_files(paths, tokenizer, *, field: str | None = None, split: str | None = None, bos: bool = False,
                   eos: bool = True, cache_dir=None, progress: bool = False) -> TokenFile:
    """Every document of ``paths`` (any format ``read_documents`` reads), tokenised once and cached."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise LmzooError("no data files given")
    sources = [{"name": p.name, "sha256": file_fingerprint(p), "field": field, "split": split} for p in paths]

    def docs():
        for p in paths:
            yield from read_documents(p, field=field, split=split)

    return _cached({"sources": sources}, docs, tokenizer, cache_dir, bos, eos, progress)


def tokenize_texts(texts: list[str], tokenizer, *, bos: bool = False, eos: bool = True, cache_dir=None,
                   progress: bool = False) -> TokenFile:
    """In-memory documents (the built-in corpus), tokenised once and cached by their content."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    docs = [t for t in texts if t.strip()]
    if not docs:
        raise LmzooError("tokenize_texts: every text is empty")
    return _cached({"texts": h.hexdigest()}, lambda: iter(docs), tokenizer, cache_dir, bos, eos, progress)
