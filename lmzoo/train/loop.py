"""The training loop: the same for every family, objective and stage (the seam: ``lmzoo/train/__init__.py``).

One optimizer step = ``grad_accum`` micro-batches, each forward under autocast and backward with
its loss divided by ``grad_accum`` (so gradients are the mean over the step's batches), then
unscale (fp16) -> global grad norm and clipping -> a finiteness check -> AdamW -> schedule.
Under DDP the gradient all-reduce happens only on the last micro-batch (``no_sync`` before it);
under FSDP2 the reduce-scatter likewise.

Resume guarantee: a run resumed from checkpoint k computes steps k+1.. from the same weights,
optimizer moments, schedule position, RNG states and data position as the uninterrupted run, so on
the CPU (same thread count) its final weights are bitwise equal (``tests/train/test_resume.py``).

Ctrl-C (SIGINT): the step in progress finishes, a checkpoint of it is written (atomically, as
every checkpoint) and ``fit`` raises ``TrainingInterrupted`` (a ``KeyboardInterrupt``) naming it;
a second Ctrl-C stops at once. Under DDP/FSDP the ranks agree on stopping through the step's own
all-reduce, so a signal that reaches one rank first cannot leave the others waiting.

Non-finite loss or gradient norm: ``nan_policy: stop`` raises ``TrainingError`` before anything is
written, so the newest checkpoint stays the last good one; ``skip`` drops that update (the data and
the schedule still advance) and stops after ``max_skipped_steps`` in a row. Weights that are not
finite are never saved.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from lmzoo.errors import CheckpointError, ConfigError, LmzooError
from lmzoo.train import atomic, checkpoint
from lmzoo.train.config import TrainConfig
from lmzoo.train.distributed import (DistEnv, all_reduce, find_blocks, full_value, is_fsdp, materialize, setup,
                                     skeleton, unwrap, wrap)
from lmzoo.train.evaluate import count_tokens, evaluate, forked_rng, to_device
from lmzoo.train.metrics import MetricsLog, plot_loss_curve
from lmzoo.train.optim import build_optimizer, build_scheduler
from lmzoo.train.precision import Precision


class TrainingError(LmzooError):
    """The run cannot go on: a non-finite loss or gradient (nan_policy stop), or the data ran out."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: the run stopped after a whole step and saved it; ``checkpoint`` is where (None: not saved)."""

    def __init__(self, step: int, checkpoint: Path | None):
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint written"
        super().__init__(f"interrupted at step {step}; {where}")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class TrainResult:
    step: int
    out_dir: Path
    loss: float | None = None  # the last logged training loss
    eval: dict = field(default_factory=dict)  # the last evaluation
    checkpoint: Path | None = None
    resumed_from: Path | None = None
    skipped_steps: int = 0
    history: list[dict] = field(default_factory=list)  # this process's logged train records
    initial_eval: dict = field(default_factory=dict)  # the eval hooks' metrics before the first step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute every transformer block in backward instead of keeping its activations.

    The block's forward is wrapped in place, so parameter names (and checkpoints) do not change."""
    from torch.utils.checkpoint import checkpoint as recompute

    blocks = find_blocks(model)
    for block in blocks:
        block.forward = functools.partial(recompute, block.forward, use_reentrant=False)
    return len(blocks)


class Trainer:
    def __init__(self, model: torch.nn.Module, batches: Iterator[dict], step_fn: Callable, cfg: TrainConfig,
                 out_dir: str | Path, *, eval_batches: Callable[[], Iterable[dict]] | None = None,
                 bytes_per_token: float | None = None, env: DistEnv | None = None,
                 eval_hooks: Iterable[Callable[[torch.nn.Module], dict]] = ()):
        for name in ("state_dict", "load_state_dict"):
            if not callable(getattr(batches, name, None)):
                raise ConfigError(f"the batch iterator ({type(batches).__name__}) has no {name}(); the loop needs "
                                  "it to save and restore the exact data position")
        self.cfg, self.batches, self.step_fn = cfg, batches, step_fn
        self.eval_batches, self.bytes_per_token = eval_batches, bytes_per_token
        # Evaluations a stage adds to the held-out loss (SFT's exact-match accuracy of greedy answers): each
        # gets the unwrapped model in eval mode under no_grad and a forked RNG, and returns metrics to log.
        # Every rank runs every hook and rank 0 logs its numbers, so under DDP/FSDP a hook goes over all of
        # its examples on every rank (FSDP: the same forward calls everywhere, or the gathers wait forever).
        self.eval_hooks = list(eval_hooks)
        self.env = env or setup(cfg.parallel, cfg.device)
        self.precision = Precision(cfg.precision, self.env.device)
        model.to(self.env.device)
        if cfg.activation_checkpointing and not enable_activation_checkpointing(model):
            raise ConfigError("train: activation_checkpointing found no transformer blocks to checkpoint")
        self._skeleton = skeleton(model) if self.env.parallel == "fsdp" else None  # for trained_model()
        self.model = wrap(model, self.env, cfg.find_unused_parameters)
        if cfg.compile:
            self.model.compile()
        self.optimizer = build_optimizer(self.model, cfg, self.env.device)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.out_dir = Path(out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.log = MetricsLog(self.out_dir, enabled=self.env.is_main, tensorboard=cfg.tensorboard)
        self.step, self.tokens_seen, self.skipped, self.skipped_in_a_row = 0, 0, 0, 0
        self._sigint, self._stop_agreed = False, False

    # -- the run ---------------------------------------------------------------------------------
    def fit(self, resume: bool = False, *, start_if_missing: bool = False) -> TrainResult:
        """Train to ``cfg.steps``; with ``resume``, from the newest valid checkpoint, and finding none
        is an error unless ``start_if_missing`` (then it starts from scratch)."""
        with _deterministic(self.cfg.deterministic, self.env.device), self._sigint_deferred():
            return self._fit(resume, start_if_missing)

    @contextlib.contextmanager
    def _sigint_deferred(self):
        """The first Ctrl-C only sets a flag that the loop reads after a whole step; the second is
        the usual ``KeyboardInterrupt``. Only where Python's own handler is in place (main thread)."""
        self._sigint = False
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            yield
            return

        def handler(signum, frame):
            self._sigint = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # (no print here: not reentrant-safe)

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _stop_requested(self) -> bool:
        # distributed: the flag all ranks summed in the step's all-reduce; one process: the flag itself
        return self._stop_agreed or (not self.env.distributed and self._sigint)

    def _fit(self, resume: bool, start_if_missing: bool = False) -> TrainResult:
        cfg, env = self.cfg, self.env
        result = TrainResult(step=0, out_dir=self.out_dir)
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic.clean_leftovers(self.ckpt_root)
        result.resumed_from = self._resume(start_if_missing) if resume else self._fresh_start()
        if self.eval_hooks and self.step == 0:  # the starting point, so a stage shows what training changed
            result.initial_eval = self.run_eval_hooks()
            self.log.write({"split": "eval", "step": 0, **result.initial_eval})
        if env.is_main:
            atomic.write_json(self.out_dir / "run.json", {"train": cfg.to_dict(), "world_size": env.world_size,
                                                          "resumed_from": str(result.resumed_from or "")})
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=not (cfg.progress and env.is_main))
        t_start = t_log = time.perf_counter()
        tokens_start = tokens_log = self.tokens_seen
        last_eval_step = -1
        last_save_step = self.step if result.resumed_from else -1
        while self.step < cfg.steps:
            rec = self._train_step()
            self.step += 1
            bar.update(1)
            tok_s = (self.tokens_seen - tokens_start) / max(time.perf_counter() - t_start, 1e-9)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tok_s:.0f}", refresh=False)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                rec.update(tokens=self.tokens_seen, tokens_per_s=(self.tokens_seen - tokens_log) / max(now - t_log, 1e-9),
                           elapsed_s=now - t_start)
                t_log, tokens_log = now, self.tokens_seen
                self.log.write(rec)
                result.history.append(rec)
                result.loss = rec["loss"]
            if self._evaluates and cfg.eval_every and self.step % cfg.eval_every == 0:
                result.eval, last_eval_step = self._evaluate(bar), self.step
            if cfg.save_every and self.step % cfg.save_every == 0:
                result.checkpoint, last_save_step = self.save(), self.step
            if self._stop_requested() and self.step < cfg.steps:
                bar.close()
                if last_save_step != self.step:
                    result.checkpoint = self.save()
                self.log.close()
                raise TrainingInterrupted(self.step, result.checkpoint)
        bar.close()
        if self._evaluates and last_eval_step != self.step:
            result.eval = self._evaluate(None)
        if last_save_step != self.step:
            result.checkpoint = self.save()
        self.log.close()
        if cfg.plot and env.is_main:
            plot_loss_curve(self.log.path, self.out_dir / "loss.png")
        result.step, result.skipped_steps = self.step, self.skipped
        return result

    def _fresh_start(self) -> None:
        if checkpoint.list_checkpoints(self.ckpt_root):
            raise ConfigError(f"{self.ckpt_root} already holds checkpoints: resume them (--resume) or choose "
                              "another output directory")
        self.log.truncate_after(-1)
        seed_everything(self.cfg.seed + self.env.rank)
        return None

    def _resume(self, start_if_missing: bool) -> Path | None:
        path = checkpoint.latest_valid(self.ckpt_root) if self.env.is_main else None
        if self.env.distributed:
            box = [str(path) if path else None]
            torch.distributed.broadcast_object_list(box, src=0)
            path = Path(box[0]) if box[0] else None
        if path is None:
            if not start_if_missing:
                found = len(checkpoint.list_checkpoints(self.ckpt_root))
                why = f"none of its {found} checkpoint(s) verifies" if found else "it holds no checkpoint"
                raise CheckpointError(f"resume: nothing to resume in {self.ckpt_root} ({why}); start a new run "
                                      "instead, or allow a fresh start when there is none (fit(start_if_missing="
                                      "True), lmzoo pretrain --resume-or-start)")
            if self.env.is_main:
                print(f"nothing to resume in {self.ckpt_root}: starting from scratch", file=sys.stderr)
            self.log.truncate_after(-1)
            seed_everything(self.cfg.seed + self.env.rank)
            return None
        state, data_state = checkpoint.load(path, model=self.model, optimizer=self.optimizer,
                                            scheduler=self.scheduler, precision=self.precision, env=self.env)
        self.batches.load_state_dict(data_state)
        self.step, self.tokens_seen, self.skipped = state["step"], state["tokens_seen"], state["skipped"]
        self.log.truncate_after(self.step)
        if self.env.is_main:
            print(f"resumed from {path} (step {self.step})", file=sys.stderr)
        return path

    # -- one optimizer step ----------------------------------------------------------------------
    def _next_batch(self, micro: int) -> dict:
        try:
            return next(self.batches)
        except StopIteration:
            raise TrainingError(f"the data ran out at step {self.step + 1} (micro-batch {micro + 1}); the batch "
                                f"iterator must yield steps x grad_accum = {self.cfg.steps * self.cfg.grad_accum} "
                                "batches (let it loop over epochs) or train fewer steps") from None

    def _sync_context(self, sync: bool):
        if sync:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):  # DDP
            return self.model.no_sync()
        if is_fsdp(self.model):
            return _fsdp_no_sync(self.model)
        return contextlib.nullcontext()

    def _train_step(self) -> dict:
        cfg, dev = self.cfg, self.env.device
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        tokens, extras = 0.0, {}
        for micro in range(cfg.grad_accum):
            batch = to_device(self._next_batch(micro), dev)
            with self._sync_context(micro == cfg.grad_accum - 1):
                with self.precision.autocast():
                    loss, metrics = self.step_fn(self.model, batch)
                self.precision.backward(loss / cfg.grad_accum)
            loss_sum += loss.detach().double()
            tokens += count_tokens(metrics, batch)
            for k, v in metrics.items():
                if k not in ("n_tokens", "n_bytes"):
                    extras[k] = extras.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / cfg.grad_accum
        # the interrupt flag rides on the step's all-reduce: every rank learns whether any rank got Ctrl-C;
        # so do the extra metrics (the same keys on every rank), logged as their mean over ranks like the loss
        keys = sorted(extras)
        totals = all_reduce(torch.stack([loss_sum / cfg.grad_accum, loss_sum.new_tensor(tokens),
                                         loss_sum.new_tensor(float(self._sigint)),
                                         *(loss_sum.new_tensor(extras[k]) for k in keys)]))
        step_loss, step_tokens = totals[0].item() / self.env.world_size, int(totals[1].item())
        self._stop_agreed = totals[2].item() > 0
        extras = {k: v / self.env.world_size for k, v in zip(keys, totals[3:].tolist())}
        self.precision.unscale(self.optimizer)
        max_norm = cfg.clip_grad if cfg.clip_grad else math.inf
        norm = float(full_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)))
        rec = {"split": "train", "step": self.step + 1, "loss": step_loss, "lr": lr, "grad_norm": norm}
        overflow_allowed = self.precision.scaler is not None  # fp16: the scaler skips and backs off
        if not math.isfinite(step_loss) or (not math.isfinite(norm) and not overflow_allowed):
            self._non_finite(step_loss, norm)
            if self.precision.scaler is not None:
                self.precision.step(self.optimizer)  # sees the inf, skips, resets its per-step state
            rec["skipped"] = True
        else:
            self.skipped_in_a_row = 0
            if not self.precision.step(self.optimizer):
                rec["overflow"] = True
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first update makes LambdaLR warn about the call order
            warnings.filterwarnings("ignore", "Detected call of", UserWarning)
            self.scheduler.step()
        self.tokens_seen += step_tokens
        return {**rec, **extras}

    def _non_finite(self, loss: float, norm: float) -> None:
        what = f"step {self.step + 1}: loss {loss}, gradient norm {norm}"
        if self.cfg.nan_policy == "stop":
            latest = checkpoint.list_checkpoints(self.ckpt_root)
            where = f"the newest checkpoint, {latest[0][1]}, is untouched" if latest else "no checkpoint was written"
            raise TrainingError(f"{what} is not finite; stopping (nan_policy: stop); {where}. Lower the lr, set "
                                "clip_grad, prefer bf16 to fp16, or set nan_policy: skip")
        self.skipped += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row > self.cfg.max_skipped_steps:
            raise TrainingError(f"{what}: {self.skipped_in_a_row} non-finite steps in a row (max_skipped_steps: "
                                f"{self.cfg.max_skipped_steps}); stopping")
        if self.env.is_main:
            print(f"warning: {what} is not finite; update skipped (nan_policy: skip)", file=sys.stderr)

    # -- evaluation and checkpoints --------------------------------------------------------------
    def _evaluate(self, bar) -> dict:
        out = {}
        if self.eval_batches is not None:
            out = evaluate(self.model, self.eval_batches(), self.step_fn, device=self.env.device,
                           autocast=self.precision.autocast, bytes_per_token=self.bytes_per_token)
        out.update(self.run_eval_hooks())
        if out:
            self.log.write({"split": "eval", "step": self.step, **out})
            if bar is not None and self.env.is_main and self.cfg.progress:
                shown = [f"eval loss {out['loss']:.4f}, ppl {out['ppl']:.2f}"] if "loss" in out else []
                shown += [f"{out['bpb']:.3f} bits/byte"] if "bpb" in out else []
                shown += [f"{k} {v:.4g}" for k, v in out.items() if k not in ("loss", "ppl", "bpb", "tokens")
                          and isinstance(v, (int, float))]
                bar.write(f"step {self.step}: " + ", ".join(shown))
        return out

    @property
    def _evaluates(self) -> bool:
        return self.eval_batches is not None or bool(self.eval_hooks)

    def run_eval_hooks(self) -> dict:
        """Every eval hook's metrics, on the model as it is now (also callable before training starts)."""
        if not self.eval_hooks:
            return {}
        model = getattr(self.model, "module", self.model)  # DDP wraps; hooks call the model itself
        was_training = model.training
        model.eval()
        out = {}
        with forked_rng(self.env.device), torch.no_grad(), self.precision.autocast():
            for hook in self.eval_hooks:
                out.update(hook(model))
        model.train(was_training)
        return out

    def weights_finite(self) -> bool:
        ok = all(bool(torch.isfinite(full_local(p)).all()) for p in self.model.parameters())
        flag = all_reduce(torch.tensor([0.0 if ok else 1.0], device=self.env.device), "max")
        return flag.item() == 0.0

    def save(self) -> Path:
        if not self.weights_finite():
            raise TrainingError(f"step {self.step}: the weights are not finite; refusing to write a checkpoint "
                                f"(the ones in {self.ckpt_root} are kept)")
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "skipped": self.skipped,
                 "train": self.cfg.to_dict()}
        return checkpoint.save(self.ckpt_root, self.step, model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler, precision=self.precision,
                               data_state=_json_safe(self.batches.state_dict()), trainer_state=state, env=self.env,
                               keep_last=self.cfg.keep_last)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on the CPU on rank 0 (gathered under FSDP); None on other ranks."""
        if is_fsdp(self.model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return sd if self.env.is_main else None
        return {k: v.detach().cpu() for k, v in unwrap(self.model).state_dict().items()} if self.env.is_main else None

    def trained_model(self) -> torch.nn.Module | None:
        """The model as a plain module (no DDP wrapper, no FSDP shards) on rank 0, for a stage to save or
        hand on; None on other ranks. Under FSDP a collective (every rank calls it) that returns a CPU copy
        holding the gathered weights; otherwise the trained module itself."""
        if not is_fsdp(self.model):
            return unwrap(self.model) if self.env.is_main else None
        state = self.full_state_dict()
        return materialize(self._skeleton, state) if self.env.is_main else None


@contextlib.contextmanager
def _deterministic(on: bool, device: torch.device):
    """Deterministic kernels for the run only (e.g. the CPU embedding backward with repeated indices
    accumulates in thread order otherwise); the process's previous setting is restored after."""
    before, before_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if on:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


def full_local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _json_safe(state: dict) -> dict:
    try:
        return json.loads(json.dumps(state))
    except TypeError as e:
        raise ConfigError(f"the batch iterator's state_dict() must hold JSON types only ({e})") from e


class _fsdp_no_sync:
    """FSDP2: accumulate unsharded gradients locally; the last micro-batch reduce-scatters them."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)
        return False
