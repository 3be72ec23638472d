"""Stages of a model's life: pretrain, sft, reward, dpo (and kto), grpo, ppo. Each wires data, a model,
an objective and the shared training loop (``lmzoo.train``), and nothing more."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmzoo.train import TrainResult


@dataclass
class StageResult:
    """What a finetuning stage (reward, dpo, kto, grpo, ppo) returns."""

    train: TrainResult  # the loop's result: steps, history, evaluations
    final_dir: Path | None  # final/ (None on ranks other than 0)
    adapter_dir: Path | None  # adapter/ with LoRA
    before: dict  # the held-out evaluation before the first step (the stage's metrics)
    after: dict  # the same after the last
    data_summary: str
