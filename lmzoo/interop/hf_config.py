"""Reading and writing the fields of a Hugging Face ``config.json`` that several families share.

Rope settings come in two generations: older checkpoints write ``rope_theta`` and
``rope_scaling`` ({"type"|"rope_type": ..., "factor": ...}); transformers 5 writes one
``rope_parameters`` dict that holds ``rope_type`` and ``rope_theta`` together. Both read the same.
"""

from __future__ import annotations

from lmzoo.errors import ConfigError
from lmzoo.nn.position import ROPE_SCALINGS, RopeConfig


def require(hf: dict, key: str, source: str = "config.json"):
    if key not in hf or hf[key] is None:
        raise ConfigError(f"{source}: required field '{key}' is missing")
    return hf[key]


def read_rope(hf: dict, *, default_theta: float = 10000.0, rotary_fraction: float | None = None,
              interleaved: bool = False, max_positions: int | None = None, source: str = "config.json") -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    merged = {**legacy, **params}
    theta = merged.pop("rope_theta", None) or hf.get("rope_theta") or default_theta
    kind = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"{source}: rope type '{kind}' is not supported; known: {sorted(ROPE_SCALINGS)}")
    frac = merged.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor") or rotary_fraction or 1.0
    return RopeConfig(theta=float(theta), rotary_fraction=float(frac), interleaved=interleaved,
                      scaling_type=kind, scaling=merged,
                      max_positions=int(max_positions or hf.get("max_position_embeddings") or 2048))


def write_rope(rope: RopeConfig, *, with_fraction: bool = False) -> dict:
    """The ``rope_parameters`` block (current transformers) plus the legacy mirror fields."""
    params = {"rope_type": rope.scaling_type, "rope_theta": rope.theta, **rope.scaling}
    if with_fraction:
        params["partial_rotary_factor"] = rope.rotary_fraction
    out = {"rope_parameters": params, "rope_theta": rope.theta}
    if rope.scaling_type != "default":
        out["rope_scaling"] = {"rope_type": rope.scaling_type, **rope.scaling}
    return out
