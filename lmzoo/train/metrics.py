"""What a run reports: ``metrics.jsonl``, optional TensorBoard, and ``loss.png`` at the end.

``metrics.jsonl`` holds one JSON object per line: ``{"split": "train", "step", "loss", "lr",
"grad_norm", "tokens", "tokens_per_s", ...}`` for every logged step and ``{"split": "eval", "step",
"loss", "ppl", "bpb"}`` for every evaluation. ``step`` counts completed optimizer steps. A resumed
run first drops the lines past the checkpoint it continues from (they belong to work that is being
redone), so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from lmzoo.errors import ConfigError


def read_metrics(path: Path) -> list[dict]:
    """Every complete record; a line cut short by a crash is ignored."""
    rows = []
    if Path(path).exists():
        # lines end at "\n" only: splitlines() would also cut a record holding a raw U+2028 (valid JSON)
        # in two and drop both halves; a torn last line may end inside a character, hence "replace"
        for line in Path(path).read_bytes().decode("utf-8", errors="replace").split("\n"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


class MetricsLog:
    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("train: 'tensorboard: true' needs the tensorboard package "
                                  "(pip install tensorboard)") from e
            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")  # ensure_ascii (the default): the file stays ASCII
        if self._tb is not None:
            split = record.get("split", "train")
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str = "") -> Path | None:
    """Train (and eval) loss against step; None, with a note, when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no loss curve (pip install matplotlib)", file=sys.stderr)
        return None
    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for split, style in (("train", "-"), ("eval", "o-")):
        pts = [(r["step"], r["loss"]) for r in rows if r.get("split") == split and math.isfinite(r.get("loss", math.nan))]
        if pts:
            ax.plot(*zip(*pts), style, label=f"{split} loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
