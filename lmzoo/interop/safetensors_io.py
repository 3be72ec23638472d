"""Safetensors files and sharded directories, read lazily and written atomically.

Never unpickles: ``.bin``/``.pt`` checkpoints are refused with a message that says so. What is
written gets the modes the user's umask gives (``mkdtemp`` alone makes the directory 0700, and
safetensors writes its files 0600).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmzoo.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class LazyState:
    """A read-only mapping key -> tensor over one or several safetensors files."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        self.directory = d
        self.where: dict[str, Path] = {}
        if (d / INDEX).exists():
            try:
                weight_map = json.loads((d / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{d / INDEX}: not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (d / f).exists():
                    raise CheckpointError(f"{d / INDEX} names shard '{f}', which is missing from {d}")
            self.where = {k: d / f for k, f in weight_map.items()}
        elif (d / SINGLE).exists():
            files = [SINGLE]
        else:
            found = sorted(p.name for p in d.glob("*.safetensors"))
            if not found:
                pickled = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
                hint = f" (found {pickled}: lmzoo never unpickles; convert them to safetensors)" if pickled else ""
                raise CheckpointError(f"{d}: no model.safetensors, no {INDEX} and no *.safetensors{hint}")
            files = found
        self._handles = {}
        for f in files:
            h = self._open(d / f)
            if not (d / INDEX).exists():
                self.where.update({k: d / f for k in h.keys()})
        for k, path in self.where.items():
            if k not in self._handles[path].keys():
                raise CheckpointError(f"{path}: the index lists tensor '{k}' but the file does not hold it")

    def _open(self, path: Path):
        try:
            h = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for truncation/garbage
            raise CheckpointError(f"{path}: cannot read safetensors file ({e}); is it truncated or corrupt?") from e
        self._handles[path] = h
        return h

    def keys(self):
        return self.where.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def __getitem__(self, key: str) -> torch.Tensor:
        path = self.where[key]
        try:
            return self._handles[path].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor '{key}' ({e}); is the file truncated?") from e

    def file_of(self, key: str) -> Path:
        return self.where[key]


def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += n
    if cur or not shards:
        shards.append(cur)
    return shards


def umask() -> int:
    """The process's umask (read without changing it where /proc says; else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` (a fresh name, no race), then the mode a plain ``mkdir`` would have given."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def write_directory(directory: str | Path, state: dict[str, torch.Tensor], extra_files: dict[str, str],
                    max_shard_bytes: int = 5 * 2**30, fill: Callable[[Path], object] | None = None) -> Path:
    """Write tensors (sharded past ``max_shard_bytes``) and text files into ``directory``; ``fill``
    (given the directory being written) adds more, e.g. the tokenizer's files.

    Everything goes to a temporary sibling first; the directory appears under its name only once
    complete, so an interrupted save never leaves a directory that looks whole.
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(final.parent, f".{final.name}.tmp-")
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        shards = _shard(state, max_shard_bytes)
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE), metadata=meta)
        else:
            n = len(shards)
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{n:05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=meta)
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if fill is not None:
            fill(tmp)
        for name, text in extra_files.items():  # after fill: our config.json is the one that counts
            (tmp / name).write_text(text)
        mask = umask()
        for p in tmp.rglob("*"):  # safetensors writes its files 0600: give every file the mode open() would
            os.chmod(p, (0o666 if p.is_file() else 0o777) & ~mask)
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
