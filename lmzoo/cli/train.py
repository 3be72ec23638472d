"""Train a tiny vision model from scratch on the built-in shapes, on the CPU, in a few minutes.

  lmzoo train vit                      # 50-way colour/shape classifier; accuracy on new images
  lmzoo train clip                     # contrastive; zero-shot accuracy on held-out colour/shape pairs
  lmzoo train clip --steps 300 --out runs/clip-short --no-plot

The images (coloured shapes at places, with captions such as "a red circle on the left") are drawn on
the fly from the seed (lmzoo/vision/shapes.py). The run folder gets model/ (lmzoo.save: transformers'
ViTForImageClassification / CLIPModel layout), metrics.json, and loss.png + predictions.png (drawn
with matplotlib; --no-plot skips them); CLIP also writes vocab.json, its word-level vocabulary.
See docs/vit.md and docs/clip.md.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

HELP = "train a tiny ViT classifier or CLIP on built-in synthetic shapes (CPU, minutes)"

# What the flags override in lmzoo.vision.demo.DemoConfig; None keeps the model's default.
_FLAGS = {"steps": int, "batch_size": int, "lr": float, "seed": int, "image_size": int, "patch_size": int,
          "d_model": int, "n_layers": int, "n_heads": int, "eval_images": int}


def add_arguments(p) -> None:
    p.add_argument("model", choices=["vit", "clip"], help="what to train")  # lmzoo.vision.demo.RUNS
    for name, kind in _FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"(default: {_default(name)})")
    p.add_argument("--out", default=None, help="the run folder (default: runs/<model>)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: for models this small, more threads cost more than they give)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs (no matplotlib needed)")


def _default(name: str):
    from lmzoo.vision.demo import DemoConfig

    return {f.name: f.default for f in fields(DemoConfig)}[name]


def run(args) -> int:
    from lmzoo.vision.demo import RUNS, DemoConfig

    cfg = DemoConfig(**{k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None})
    out = args.out or f"runs/{args.model}"
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        RUNS[args.model](cfg, out=out, plot=not args.no_plot)
    finally:
        torch.set_num_threads(before)
    written = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(out).iterdir())
    print(f"wrote {out}/: {', '.join(written)}")  # what the run wrote (CLIP adds its vocab.json)
    return 0
