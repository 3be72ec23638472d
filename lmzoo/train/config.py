"""``TrainConfig``: every knob of the loop, checked once, with a message that names the field.

It describes how to train, never what: no family, objective or data field lives here (those are the
caller's, e.g. the ``model:`` and ``data:`` sections of a ``lmzoo pretrain`` YAML file).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lmzoo.errors import ConfigError
from lmzoo.models.config_base import check_integer_fields

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
PARALLEL = ("none", "ddp", "fsdp")
NAN_POLICIES = ("stop", "skip")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "loop")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    # AdamW
    lr: float = 3e-4
    min_lr: float = 0.0  # where the cosine / linear decay ends, at ``steps``
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    schedule: str = "cosine"
    weight_decay: float = 0.1  # on matrices only; biases, norms and 1-d parameters get none
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    optimizer_impl: str = "auto"  # auto: fused where torch has it for the device, else foreach
    clip_grad: float | None = 1.0  # max global grad norm; None or 0: no clipping (the norm is still logged)
    # numerics and speed
    precision: str = "fp32"  # bf16: autocast (CPU and GPU); fp16: autocast + loss scaling (for GPUs; runs on the CPU)
    compile: bool = False  # torch.compile (nn.Module.compile: parameter names stay the same)
    activation_checkpointing: bool = False  # recompute each transformer block in backward
    seed: int = 0
    deterministic: bool = True  # deterministic kernels during fit (bitwise-repeatable runs; off: faster on GPUs)
    device: str = "auto"  # auto: cuda:<local rank> when there is a GPU, else cpu
    # distributed (torchrun sets the world; this says how to use it)
    parallel: str = "none"
    find_unused_parameters: bool = False  # DDP: needed when some parameters get no gradient (MoE)
    # bookkeeping
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    save_every: int = 0  # 0: one checkpoint at the end
    keep_last: int = 3  # checkpoints kept; older ones are removed after a newer one is complete
    nan_policy: str = "stop"  # a NaN/inf loss or gradient: stop with a message, or skip the update
    max_skipped_steps: int = 5  # consecutive skipped steps before the run stops anyway
    progress: bool = True
    tensorboard: bool = False
    plot: bool = True  # loss.png at the end (needs matplotlib; skipped with a note when it is missing)
    extra: dict = field(default_factory=dict, repr=False)  # caller's notes, copied into run.json

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("steps", "grad_accum", "log_every", "keep_last"):
            _positive_int(self, name)
        for name in ("warmup_steps", "eval_every", "save_every", "seed", "max_skipped_steps"):
            _int_at_least(self, name, 0)
        check_integer_fields(self, "train")  # the rule for every integer field (lmzoo/models/config_base.py)
        for f in dataclasses.fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                v = getattr(self, f.name)
                raise ConfigError(f"train.{f.name} must be true or false, got {v!r} ({type(v).__name__})")
        for name, allowed in (("schedule", SCHEDULES), ("precision", PRECISIONS), ("parallel", PARALLEL),
                              ("nan_policy", NAN_POLICIES), ("optimizer_impl", OPTIMIZER_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train: '{name}' must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"train: 'lr' must be a positive number, got {self.lr!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train: 'min_lr' must be between 0 and lr ({self.lr}), got {self.min_lr!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train: 'betas' must be two numbers in [0, 1), got {list(self.betas)}")
        if self.clip_grad is not None and self.clip_grad < 0:
            raise ConfigError(f"train: 'clip_grad' must be >= 0 or null, got {self.clip_grad!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"train: 'weight_decay' must be >= 0, got {self.weight_decay!r}")

    @classmethod
    def from_dict(cls, d: dict | None, source: str = "train") -> "TrainConfig":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown training option(s) {unknown}; known: {sorted(known)}")
        for k in ("lr", "min_lr", "eps", "weight_decay", "clip_grad"):  # YAML reads 3e-4 as a string
            if isinstance(d.get(k), str):
                try:
                    d[k] = float(d[k])
                except ValueError as e:
                    raise ConfigError(f"{source}: '{k}' must be a number, got {d[k]!r}") from e
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def _positive_int(cfg, name):
    _int_at_least(cfg, name, 1)


def _int_at_least(cfg, name, low):
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ConfigError(f"train.{name} must be an integer >= {low}, got {v!r} ({type(v).__name__})")
