"""Mixed precision: which autocast context the forward runs in and whether the loss is scaled.

fp32:  no autocast.
bf16:  autocast to bfloat16 on CPU or GPU; bf16 has fp32's exponent range, so no loss scaling.
fp16:  autocast to float16 plus a dynamic loss scaler (``torch.amp.GradScaler``): the loss is
       multiplied before backward so small gradients do not underflow, gradients are unscaled before
       clipping, and a step whose gradients overflowed is skipped while the scale halves (it doubles
       after 2000 clean steps). Meant for GPUs; it runs on the CPU too (torch >= 2.3), slower than
       bf16 there, which is how the tests check it.
Parameters and optimizer state stay float32 in every mode.
"""

from __future__ import annotations

import contextlib

import torch

from lmzoo.errors import ConfigError

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, precision: str, device: torch.device):
        if precision not in AUTOCAST_DTYPES:
            raise ConfigError(f"train: 'precision' must be one of {sorted(AUTOCAST_DTYPES)}, got {precision!r}")
        if precision == "fp16" and device.type not in ("cuda", "cpu"):
            raise ConfigError(f"train: precision 'fp16' (loss scaling) runs on CUDA GPUs and the CPU; the device "
                              f"is '{device}'. Use 'bf16'.")
        self.name, self.device = precision, device
        self.dtype = AUTOCAST_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """Apply the update; False when the loss scaler skipped it because of an overflow."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # the scale backs off exactly when the step was skipped

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
