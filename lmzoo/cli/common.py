"""Helpers shared by the subcommands: resolving ``--model`` (a preset name or a checkpoint directory)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import lmzoo
from lmzoo.errors import LmzooError
from lmzoo.models.registry import presets


def add_model_argument(p, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="a checkpoint directory (Hugging Face layout) or a preset name "
                        f"({', '.join(sorted(presets()))}); a preset gets random weights")


def resolve_model(spec: str, dtype: str | None = None, seed: int = 0, device: str = "cpu"):
    if Path(spec).is_dir():
        return lmzoo.load(spec, dtype=dtype, device=device)
    if spec in presets():
        print(f"note: '{spec}' is a preset: its weights are random (seed {seed})", file=sys.stderr)
        torch.manual_seed(seed)
        return lmzoo.build(spec, device=device, dtype=dtype).eval()
    raise LmzooError(f"--model '{spec}' is neither a directory nor a preset; presets: {sorted(presets())}")
