"""CLIP configuration: one config per tower plus the shared projection (transformers' ``CLIPConfig``,
``text_config`` / ``vision_config`` field names), and the published size as a preset.

config.json nests the towers; old files spell them ``text_config_dict`` / ``vision_config_dict`` and
may list only the fields that differ from transformers' defaults, so missing fields take those
defaults (below). A tower's own ``projection_dim`` is carried through untouched: the model's
projection size is the top-level one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from lmzoo.errors import ConfigError
from lmzoo.models.vit.config import check_positive, check_square
from lmzoo.nn.mlp import ACTIVATIONS

_TEXT_KNOWN = {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id",
               "eos_token_id", "pad_token_id", "attention_dropout"}
_VISION_KNOWN = {"model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout"}
_KNOWN = {"model_type", "architectures", "text_config", "vision_config", "text_config_dict", "vision_config_dict",
          "projection_dim", "logit_scale_init_value", "torch_dtype", "dtype"}


def _check_tower(name: str, t, sizes: tuple[str, ...]) -> None:
    check_positive(f"clip {name}", t, ("d_model", "n_layers", "n_heads", "d_ff") + sizes)
    if t.d_model % t.n_heads:
        raise ConfigError(f"clip {name}: d_model ({t.d_model}) is not divisible by n_heads ({t.n_heads})")
    if t.act not in ACTIVATIONS:
        raise ConfigError(f"clip {name}: hidden_act '{t.act}' is not supported; known: {sorted(ACTIVATIONS)}")


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    d_model: int = 512
    n_layers: int = 12
    n_heads: int = 8
    d_ff: int = 2048
    max_positions: int = 77
    norm_eps: float = 1e-5
    act: str = "quick_gelu"
    attention_dropout: float = 0.0  # on the attention probabilities: transformers' CLIP has no other dropout
    # The EOS id decides where the text is read (model.py, ``eos_positions``); 2 is the value old configs
    # carry, for which transformers reads the highest id of each row instead.
    eos_token_id: int = 49407
    bos_token_id: int | None = 49406
    pad_token_id: int | None = 1
    hf_extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        _check_tower("text", self, ("vocab_size", "max_positions"))
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ConfigError(f"clip text: eos_token_id must be one integer (the text is read there), "
                              f"got {self.eos_token_id!r}")

    @classmethod
    def from_hf(cls, hf: dict) -> "CLIPTextConfig":
        d = cls()
        return cls(vocab_size=hf.get("vocab_size", d.vocab_size), d_model=hf.get("hidden_size", d.d_model),
                   n_layers=hf.get("num_hidden_layers", d.n_layers), n_heads=hf.get("num_attention_heads", d.n_heads),
                   d_ff=hf.get("intermediate_size", d.d_ff), max_positions=hf.get("max_position_embeddings", 77),
                   norm_eps=hf.get("layer_norm_eps", 1e-5), act=hf.get("hidden_act", "quick_gelu"),
                   eos_token_id=hf.get("eos_token_id", d.eos_token_id), bos_token_id=hf.get("bos_token_id", d.bos_token_id),
                   pad_token_id=hf.get("pad_token_id", d.pad_token_id),
                   attention_dropout=float(hf.get("attention_dropout", 0.0)),
                   hf_extra={k: v for k, v in hf.items() if k not in _TEXT_KNOWN})

    def to_hf(self) -> dict:
        return {**self.hf_extra, "model_type": "clip_text_model", "vocab_size": self.vocab_size,
                "hidden_size": self.d_model, "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "intermediate_size": self.d_ff, "max_position_embeddings": self.max_positions,
                "hidden_act": self.act, "layer_norm_eps": self.norm_eps, "eos_token_id": self.eos_token_id,
                "attention_dropout": self.attention_dropout,
                **{k: getattr(self, k) for k in ("bos_token_id", "pad_token_id") if getattr(self, k) is not None}}


@dataclass
class CLIPVisionConfig:
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    norm_eps: float = 1e-5
    act: str = "quick_gelu"
    attention_dropout: float = 0.0  # on the attention probabilities: transformers' CLIP has no other dropout
    hf_extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        _check_tower("vision", self, ("image_size", "patch_size", "num_channels"))
        if self.image_size < self.patch_size:
            raise ConfigError(f"clip vision: image_size ({self.image_size}) is smaller than patch_size ({self.patch_size})")

    @classmethod
    def from_hf(cls, hf: dict) -> "CLIPVisionConfig":
        d = cls()
        return cls(d_model=hf.get("hidden_size", d.d_model), n_layers=hf.get("num_hidden_layers", d.n_layers),
                   n_heads=hf.get("num_attention_heads", d.n_heads), d_ff=hf.get("intermediate_size", d.d_ff),
                   image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 32),
                   num_channels=hf.get("num_channels", 3), norm_eps=hf.get("layer_norm_eps", 1e-5),
                   act=hf.get("hidden_act", "quick_gelu"), attention_dropout=float(hf.get("attention_dropout", 0.0)),
                   hf_extra={k: v for k, v in hf.items() if k not in _VISION_KNOWN})

    def to_hf(self) -> dict:
        return {**self.hf_extra, "model_type": "clip_vision_model", "hidden_size": self.d_model,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "intermediate_size": self.d_ff, "image_size": self.image_size, "patch_size": self.patch_size,
                "num_channels": self.num_channels, "hidden_act": self.act, "layer_norm_eps": self.norm_eps,
                "attention_dropout": self.attention_dropout}


@dataclass
class CLIPConfig:
    family: ClassVar[str] = "clip"

    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init: float = 2.6592  # log(1/0.07): the temperature τ = 0.07 of the paper's initialisation
    attn_kernel: str = "sdpa"
    dtype: str = "float32"
    hf_extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        check_positive("clip", self, ("projection_dim",))

    # What the zoo table and ``lmzoo zoo --compare`` read off every config: the text tower's vocabulary,
    # and both towers' widths.
    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def d_model(self) -> str:
        return f"{self.text.d_model} text / {self.vision.d_model} vision"

    @property
    def d_ff(self) -> str:
        return f"{self.text.d_ff} text / {self.vision.d_ff} vision"

    @property
    def hf_architecture(self) -> str:
        return "CLIPModel"

    def replace(self, **changes) -> "CLIPConfig":
        """Top-level fields by name; ``n_layers`` / ``vocab_size`` shrink the towers (small copies of a model)."""
        tower = {k: changes.pop(k) for k in ("n_layers", "vocab_size") if k in changes}
        cfg = dataclasses.replace(self, **changes)
        if tower:
            cfg.text = dataclasses.replace(cfg.text, **tower)
            if "n_layers" in tower:
                cfg.vision = dataclasses.replace(cfg.vision, n_layers=tower["n_layers"])
        return cfg

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "CLIPConfig":
        text = {**(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
        vision = {**(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
        check_square("clip", vision, source)
        for name, tower in (("text_config", text), ("vision_config", vision)):
            act = tower.get("hidden_act", "quick_gelu")
            if act not in ACTIVATIONS:
                raise ConfigError(f"{source}: {name}.hidden_act '{act}' is not supported; known: {sorted(ACTIVATIONS)}")
        try:
            return cls(text=CLIPTextConfig.from_hf(text), vision=CLIPVisionConfig.from_hf(vision),
                       projection_dim=hf.get("projection_dim", 512),
                       logit_scale_init=hf.get("logit_scale_init_value", 2.6592),
                       dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
                       hf_extra={k: v for k, v in hf.items() if k not in _KNOWN})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from e

    def to_hf(self) -> dict:
        return {**self.hf_extra, "model_type": "clip", "architectures": ["CLIPModel"],
                "text_config": self.text.to_hf(), "vision_config": self.vision.to_hf(),
                "projection_dim": self.projection_dim, "logit_scale_init_value": self.logit_scale_init,
                "dtype": self.dtype}


PRESETS = {
    # openai/clip-vit-base-patch32: ViT-B/32 image tower, 12-layer 512-wide text tower, 512-d joint space; 151.3M
    "clip-vit-base-patch32": CLIPConfig(
        text=CLIPTextConfig(vocab_size=49408, d_model=512, n_layers=12, n_heads=8, d_ff=2048, max_positions=77),
        vision=CLIPVisionConfig(d_model=768, n_layers=12, n_heads=12, d_ff=3072, image_size=224, patch_size=32),
        projection_dim=512),
}
