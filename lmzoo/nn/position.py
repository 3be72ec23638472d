"""Position encodings: learned absolute, RoPE (partial, half-split or interleaved, scaled), ALiBi,
GLM's 2D RoPE, T5's bucketed relative bias.

Every encoding here is computed once per forward at the model level and handed to the layers:
RoPE gives ``(cos, sin)`` tables that attention applies to q and k, ALiBi gives an additive
attention bias, learned positions are added to the token embeddings. The three are also
``CausalPositions`` parts (``layout.py``): handed to ``DecoderLM`` as its ``positions``, each builds
a causal decoder's attention inputs (``encode``, ``embed``) and names itself (``describe``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lmzoo.errors import ConfigError
from lmzoo.nn.layout import CausalPositions
from lmzoo.nn.masks import to_additive


class LearnedPositions(CausalPositions, nn.Module):
    """Absolute positions as a lookup table (GPT-2, BERT): ``x + P[position_ids]``. As a decoder's
    position part it caps the context at the table's size (``max_positions``)."""

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

    def embed(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return x + self(position_ids.expand(x.shape[0], x.shape[1]))

    def describe(self) -> str:
        return "learned absolute"


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


class KeepFloat32(nn.Module):
    """Computed tables (RoPE frequencies, ALiBi slopes) stay float32 when the model is cast to
    bf16/fp16: rounding them would shift every position's angle. Device moves still apply."""

    def _apply(self, fn, recurse=True):
        before = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for n, b in before.items():
            if self._buffers[n].dtype != b.dtype:
                self._buffers[n] = b.to(self._buffers[n].device)
        return self


class RotaryEmbedding(CausalPositions, KeepFloat32):
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

    def encode(self, inp, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> None:
        inp.rope = self(q_pos, dtype)  # keys are rotated as they enter the cache, at their own positions

    def describe(self) -> str:
        c = self.cfg
        return ("RoPE" + (f" {c.rotary_fraction:g} of head" if c.rotary_fraction != 1 else "")
                + (" interleaved" if c.interleaved else "") + (f" +{c.scaling_type}" if c.scaling_type != "default" else ""))


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


class ALiBi(CausalPositions, KeepFloat32):
    """Attention with linear biases: score(i, j) += -slope_h · (pos_i - pos_j)."""

    needs_mask = True  # the bias lives in the mask, so there always is one

    def __init__(self, n_heads: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        dist = (q_pos[:, :, None] - k_pos[:, None, :]).float()  # (B, Tq, Tk)
        return -self.slopes[None, :, None, None] * dist[:, None]  # (B, H, Tq, Tk)

    def encode(self, inp, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> None:
        bias = self(q_pos, k_pos)  # (B|1, H, Tq, Tk), float32
        inp.mask = (to_additive(inp.mask, torch.float32) + bias).to(dtype)

    def describe(self) -> str:
        return "ALiBi"


# --------------------------------------------------------------------------------------------
# 2D RoPE (GLM, ChatGLM-6B)
# --------------------------------------------------------------------------------------------


class Rotary2D(nn.Module):
    """GLM's 2D positions (Du et al. 2022, section 2.2): two position ids per token, each rotating
    half of every head with ordinary RoPE of width head_dim / 2.

        q = [q1 | q2]  ->  [RoPE(q1, position_ids) | RoPE(q2, block_position_ids)]

    ``forward`` takes position ids shaped (B, 2, T) (row 0 positions, row 1 block positions) and
    returns (cos, sin) tables of the full head width; ``rotate`` applies each half's table to its
    half. diff from ``RotaryEmbedding``: two ids per token instead of one, and every channel rotates.
    Inside each half the pairs are (i, i + d/4) (half-split, as ChatGLM-6B's ``rotate_half``).
    """

    def __init__(self, head_dim: int, cfg: RopeConfig | None = None):
        super().__init__()
        if head_dim % 4:
            raise ConfigError(f"2D RoPE splits each head in two rotated halves: head_dim {head_dim} "
                              "must be a multiple of 4")
        self.cfg = cfg or RopeConfig()
        self.rotary_dim = head_dim
        self.per_half = RotaryEmbedding(head_dim // 2, self.cfg)

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.per_half.inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.ndim != 3 or position_ids.shape[1] != 2:
            raise ValueError(f"2D RoPE takes position ids shaped (B, 2, T), got {tuple(position_ids.shape)}")
        cos1, sin1 = self.per_half(position_ids[:, 0], dtype)  # (B, 1, T, head_dim/2)
        cos2, sin2 = self.per_half(position_ids[:, 1], dtype)
        return torch.cat((cos1, cos2), -1), torch.cat((sin1, sin2), -1)  # (B, 1, T, head_dim)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = self.rotary_dim // 2
        x1, x2 = x[..., :h], x[..., h:]
        return torch.cat((self.per_half.rotate(x1, cos[..., :h], sin[..., :h]),
                          self.per_half.rotate(x2, cos[..., h:], sin[..., h:])), dim=-1)

    def describe(self) -> str:
        return "2D RoPE (position + block)"


# --------------------------------------------------------------------------------------------
# Bucketed relative position bias (T5)
# --------------------------------------------------------------------------------------------


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Map key-minus-query distances to ``num_buckets`` ids (Raffel et al. 2020, section 2.1).

    Half of the buckets hold the exact distances 0 .. max_exact-1; the other half cover
    max_exact .. max_distance on a log scale, and every longer distance shares the last bucket.
    Bidirectional (encoder): the buckets are split in two, one half for keys after the query.
    Causal (decoder): only keys at or before the query get distinct buckets.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # keys after the query all fall in bucket 0
    max_exact = num_buckets // 2
    # the same float ops, in the same order, as Mesh TensorFlow, so the bucket edges agree exactly
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, far)


class RelativePositionBias(nn.Module):
    """T5's learned scalar per (bucket, head), added to the attention scores: (1, H, Tq, Tk).

    There are no position embeddings at all; this bias is the only position signal. It is
    computed once per stack forward and shared by every layer (the checkpoint keeps it in the first
    layer). With a cache, the Tq queries sit at positions past .. past+Tq-1.
    """

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
        super().__init__()
        self.n_heads, self.num_buckets, self.max_distance = n_heads, num_buckets, max_distance
        self.bidirectional = bidirectional
        self.weight = nn.Parameter(torch.empty(num_buckets, n_heads))
        nn.init.normal_(self.weight, std=n_heads ** -0.5)

    def forward(self, q_len: int, k_len: int, past: int = 0) -> torch.Tensor:
        device = self.weight.device
        q_pos = torch.arange(past, past + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(k_pos - q_pos, self.bidirectional, self.num_buckets,
                                           self.max_distance)  # (Tq, Tk)
        return self.weight[buckets].permute(2, 0, 1)[None]  # (1, H, Tq, Tk)

    def extra_repr(self) -> str:
        kind = "bidirectional" if self.bidirectional else "causal"
        return f"{self.num_buckets} buckets, max_distance={self.max_distance}, {kind}"
