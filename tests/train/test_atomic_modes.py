"""Sealed checkpoint directories get the modes the user's umask gives (issue 11: safetensors wrote 0600)."""

import os
import stat

from safetensors.torch import save_file
import torch

from lmzoo.train import atomic


def test_sealed_directory_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        tmp = tmp_path / ".tmp-step_00000001"
        (tmp / "sub").mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(tmp / "rank_00000.safetensors"))  # written 0600 by safetensors
        (tmp / "sub" / "state.json").write_text("{}")
        os.chmod(tmp / "sub" / "state.json", 0o600)
        d = atomic.seal(tmp, tmp_path / "step_00000001", {"format": "lmzoo-train-checkpoint"})
    finally:
        os.umask(old)
    assert {str(p.relative_to(d)): oct(stat.S_IMODE(p.stat().st_mode)) for p in [d, *sorted(d.rglob("*"))]} == {
        ".": "0o755", "sub": "0o755", "sub/state.json": "0o644", "rank_00000.safetensors": "0o644",
        "manifest.json": "0o644"}
    atomic.verify(d)  # the modes are not part of what the manifest checks
