"""Crash-safe directories: write into a hidden temp directory, fsync, checksum, rename, fsync the parent.

A checkpoint is complete exactly when its directory exists under its final name: the rename is
atomic, and it happens only after every file and the manifest (each file's size and SHA-256) are
on disk. A process killed at any instant leaves either the previous state or the new one, plus at
most a ``.tmp-*`` or ``.trash-*`` directory that the next run removes. Loading re-hashes every file
against the manifest, so a directory damaged afterwards (a bad disk, a hand edit) is rejected too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from lmzoo.errors import CheckpointError
from lmzoo.interop.safetensors_io import umask

MANIFEST = "manifest.json"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms without directory fds (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path, text: str) -> Path:
    """``text`` (UTF-8) into ``path`` whole or not at all: written beside it as ``NAME.tmp``, fsynced, then
    renamed over it, so a reader (or a run resumed after a kill) sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n")


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def seal(tmp: Path, final: Path, meta: dict) -> Path:
    """Checksum every file of ``tmp`` into its manifest, then move ``tmp`` to ``final`` atomically."""
    files, mask = {}, umask()
    for p in _files(tmp):
        os.chmod(p, 0o666 & ~mask)  # safetensors writes 0600: every file gets the mode the umask gives
        fsync_file(p)
        files[str(p.relative_to(tmp))] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    for d in sorted({p.parent for p in _files(tmp)} | {tmp}, reverse=True):
        os.chmod(d, 0o777 & ~mask)
        fsync_dir(d)
    write_json(tmp / MANIFEST, {**meta, "files": files})
    fsync_dir(tmp)
    if final.exists():  # the same step saved again (a resumed run re-reaching it): replace it whole
        trash = final.with_name(f".trash-{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def verify(directory: Path) -> dict:
    """The manifest of a complete, undamaged directory; ``CheckpointError`` naming the bad file otherwise."""
    directory = Path(directory)
    if not (directory / MANIFEST).exists():
        raise CheckpointError(f"{directory}: no {MANIFEST} (an incomplete checkpoint)")
    manifest = read_json(directory / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{directory / MANIFEST}: expected an object with a 'files' table")
    for rel, info in manifest["files"].items():
        p = directory / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in the manifest but missing")
        if p.stat().st_size != info.get("bytes"):
            raise CheckpointError(f"{p}: {p.stat().st_size} bytes, the manifest says {info.get('bytes')} (truncated?)")
        if sha256_file(p) != info.get("sha256"):
            raise CheckpointError(f"{p}: SHA-256 does not match the manifest (the file is corrupt)")
    return manifest


def remove(directory: Path) -> None:
    """Delete a directory so that a crash midway never leaves something that looks like it."""
    if not directory.exists():
        return
    trash = directory.with_name(f".trash-{directory.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(directory, trash)
    fsync_dir(directory.parent)
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(root: Path) -> list[Path]:
    """Remove the ``.tmp-*`` / ``.trash-*`` directories an interrupted run left behind."""
    gone = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".trash-")):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone
