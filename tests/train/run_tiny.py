"""A real training process for the crash tests: ``python -m tests.train.run_tiny OUT [--resume] ...``.

It trains the tiny model of ``tiny.py`` with a checkpoint every step and writes the final weights
to OUT/final.safetensors. One thread, so every process computes exactly the same floats.
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import save_file

from lmzoo.train import TrainConfig, Trainer
from tests.train.tiny import ProgressionBatches, causal_step, tiny_model


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--save-every", type=int, default=1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--resume-or-start", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=args.steps, lr=1e-2, warmup_steps=3, grad_accum=2, log_every=1, save_every=args.save_every,
                      keep_last=2, progress=False, plot=False)
    trainer = Trainer(tiny_model(seed=1), ProgressionBatches(batch_size=4), causal_step, cfg, args.out)
    trainer.fit(resume=args.resume or args.resume_or_start, start_if_missing=args.resume_or_start)
    save_file(trainer.full_state_dict(), f"{args.out}/final.safetensors")


if __name__ == "__main__":
    main()
