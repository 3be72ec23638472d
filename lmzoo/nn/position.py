"""Position encodings: learned absolute, RoPE (partial, half-split or interleaved, scaled), ALiBi.

Every encoding here is computed once per forward at the model level and handed to the layers:
RoPE gives ``(cos, sin)`` tables that attention applies to q and k, ALiBi gives an additive
attention bias, learned positions are added to the token embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lmzoo.errors import ConfigError


class LearnedPositions(nn.Module):
    """Absolute positions as a lookup table (GPT-2, BERT): ``x + P[position_ids]``."""

    def __init__(self, max_positions: int, d_model: int):
        super().__init__()
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.empty(max_positions, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if position_ids.numel() and int(position_ids.max()) >= self.max_positions:
            raise ValueError(
                f"position {int(position_ids.max())} is past the {self.max_positions} learned positions "
                "of this model: the input is longer than its context"
            )
        return self.weight[position_ids]  # (B, T, D)


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------


@dataclass
class RopeConfig:
    """Everything that decides RoPE's frequencies. ``scaling`` holds the type's own fields."""

    theta: float = 10000.0
    rotary_fraction: float = 1.0  # partial RoPE: only the first fraction of each head rotates
    interleaved: bool = False  # pairs (0,1),(2,3).. (GPT-J/ChatGLM) instead of halves (0,d/2)..
    scaling_type: str = "default"
    scaling: dict = field(default_factory=dict)
    max_positions: int = 2048  # the model's max_position_embeddings (dynamic NTK and yarn read it)


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


# Each scaling type: (config, rotary_dim, seq_len) -> (inv_freq, attention_factor)
ROPE_SCALINGS: dict[str, Callable[[RopeConfig, int, int], tuple[torch.Tensor, float]]] = {}


def register_rope_scaling(name: str):
    def deco(fn):
        ROPE_SCALINGS[name] = fn
        return fn

    return deco


def _need(cfg: RopeConfig, key: str):
    if key not in cfg.scaling or cfg.scaling[key] is None:
        raise ConfigError(f"rope scaling '{cfg.scaling_type}' needs the field '{key}'")
    return cfg.scaling[key]


@register_rope_scaling("default")
def _rope_default(cfg: RopeConfig, dim: int, seq_len: int):
    return _base_inv_freq(cfg.theta, dim), 1.0


@register_rope_scaling("linear")
def _rope_linear(cfg: RopeConfig, dim: int, seq_len: int):
    # Position interpolation (Chen et al. 2023): positions divided by `factor`.
    return _base_inv_freq(cfg.theta, dim) / float(_need(cfg, "factor")), 1.0


@register_rope_scaling("dynamic")
def _rope_dynamic_ntk(cfg: RopeConfig, dim: int, seq_len: int):
    # Dynamic NTK: grow the base once the sequence passes the trained context.
    factor = float(_need(cfg, "factor"))
    L = max(seq_len, cfg.max_positions)
    base = cfg.theta * ((factor * L / cfg.max_positions) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim), 1.0


@register_rope_scaling("llama3")
def _rope_llama3(cfg: RopeConfig, dim: int, seq_len: int):
    # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    inv = _base_inv_freq(cfg.theta, dim)
    factor = float(_need(cfg, "factor"))
    lo, hi = float(_need(cfg, "low_freq_factor")), float(_need(cfg, "high_freq_factor"))
    old_len = float(_need(cfg, "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1·m·ln(s) + 1 (Peng et al. 2023, eq. 22)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@register_rope_scaling("yarn")
def _rope_yarn(cfg: RopeConfig, dim: int, seq_len: int):
    s = cfg.scaling
    orig = float(_need(cfg, "original_max_position_embeddings"))
    factor = s.get("factor") or cfg.max_positions / orig
    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if (m and m_all) else yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(n_rot):  # the dimension whose wavelength makes n_rot turns over `orig`
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(cfg.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = cfg.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # 1 where the frequency is high enough to keep as is
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(attn)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021): rotate pairs of q/k channels by position·frequency.

    ``forward(position_ids)`` builds the (cos, sin) tables once per model forward;
    ``rotate(x, cos, sin)`` applies them to a (B, H, T, head_dim) tensor inside attention.
    """

    def __init__(self, head_dim: int, cfg: RopeConfig):
        super().__init__()
        if cfg.scaling_type not in ROPE_SCALINGS:
            raise ConfigError(
                f"unknown rope scaling type '{cfg.scaling_type}'; known: {sorted(ROPE_SCALINGS)}"
            )
        self.cfg = cfg
        self.rotary_dim = int(head_dim * cfg.rotary_fraction)
        if self.rotary_dim % 2 or self.rotary_dim <= 0:
            raise ConfigError(f"rotary_fraction {cfg.rotary_fraction} of head_dim {head_dim} is not a positive even width")
        inv, self.attention_factor = ROPE_SCALINGS[cfg.scaling_type](cfg, self.rotary_dim, cfg.max_positions)
        self.register_buffer("inv_freq", inv, persistent=False)

    def _inv_freq(self, seq_len: int) -> torch.Tensor:
        if self.cfg.scaling_type == "dynamic" and seq_len > self.cfg.max_positions:
            inv, _ = ROPE_SCALINGS["dynamic"](self.cfg, self.rotary_dim, seq_len)
            return inv.to(self.inv_freq.device)
        return self.inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = int(position_ids.max()) + 1 if self.cfg.scaling_type == "dynamic" else 0
        inv = self._inv_freq(seq_len)
        freqs = position_ids[..., None].float() * inv.float()  # (B, T, rotary_dim/2)
        if self.cfg.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)  # (B, T, rotary_dim): f0 f0 f1 f1 ..
        else:
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rotary_dim): f0 f1 .. f0 f1 ..
        cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return cos[:, None].to(dtype), sin[:, None].to(dtype)  # (B, 1, T, rotary_dim)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dim
        x_rot, x_pass = (x[..., :r], x[..., r:]) if r < x.shape[-1] else (x, None)
        if self.cfg.interleaved:
            x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
            rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        else:
            x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
            rotated = torch.cat((-x2, x1), dim=-1)
        out = x_rot * cos + rotated * sin
        return out if x_pass is None else torch.cat((out, x_pass), dim=-1)


# --------------------------------------------------------------------------------------------
# ALiBi
# --------------------------------------------------------------------------------------------


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Head slopes of ALiBi (Press et al. 2022, section 3).

    For a power of two n the slopes are 2^(-8/n), 2^(-16/n), ... For other n, take the n' = largest
    power of two below n, then fill up with every other slope of the 2n' sequence.
    """
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != n_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        n_extra = min(closest, n_heads - closest)
        slopes += [extra ** (i + 1) for i in range(0, 2 * n_extra, 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(nn.Module):
    """Attention with linear biases: score(i, j) += -slope_h · (pos_i - pos_j)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        dist = (q_pos[:, :, None] - k_pos[:, None, :]).float()  # (B, Tq, Tk)
        return -self.slopes[None, :, None, None] * dist[:, None]  # (B, H, Tq, Tk)
