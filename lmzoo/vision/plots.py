"""The two pictures a vision demo run leaves behind: the loss curve and a grid of predictions.

matplotlib is a dependency of lmzoo; should it not import anyway, these raise a ``LmzooError`` that says
what to install (``--no-plot`` skips them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmzoo.errors import LmzooError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise LmzooError("the PNG plots need matplotlib, a dependency of lmzoo that does not import here: pip install matplotlib (or pass --no-plot)") from e
    return plt


def loss_curve(losses: list[float], path: str | Path, title: str, ylabel: str = "loss") -> Path:
    """Per-step loss (thin) and its 20-step running mean (thick), against the step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, lw=0.6, alpha=0.5, color="tab:blue")
    k = 20
    if len(losses) >= k:
        t = torch.tensor(losses)
        smooth = torch.nn.functional.avg_pool1d(t[None, None], k, stride=1)[0, 0].tolist()
        ax.plot(steps[k - 1:], smooth, lw=1.8, color="tab:blue", label=f"{k}-step mean")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def prediction_grid(images: torch.Tensor, titles: list[str], correct: list[bool], path: str | Path,
                    suptitle: str, cols: int = 6) -> Path:
    """(N, 3, H, W) uint8 images, each titled with its prediction, green when right and red when wrong."""
    plt = _pyplot()
    n = images.shape[0]
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.3 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")  # (H, W, 3)
            ax.set_title(titles[i], fontsize=7, color="tab:green" if correct[i] else "tab:red")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
