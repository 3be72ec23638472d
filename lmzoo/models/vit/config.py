"""ViT configuration (transformers' ``ViTConfig`` field names) and the published size as a preset.

Which heads a model has is part of the config, as for BERT: ``pooler`` (dense + tanh over the [CLS]
state; ``ViTModel`` has it, ``ViTForImageClassification`` does not) and ``num_labels`` (the linear
classifier over the final [CLS] state; 0 = none). config.json writes ``id2label`` for every ViT,
with or without a classifier, so ``lmzoo.load`` settles both from the checkpoint's keys
(``resolve`` in ``__init__.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from lmzoo.errors import ConfigError
from lmzoo.interop.hf_config import require
from lmzoo.nn.mlp import ACTIVATIONS

_KNOWN = {"model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "intermediate_size", "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_channels",
          "qkv_bias", "pooler_output_size", "pooler_act", "id2label", "label2id", "num_labels", "torch_dtype", "dtype",
          "hidden_dropout_prob", "attention_probs_dropout_prob"}


def check_positive(family: str, cfg, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{family}: config field '{name}' must be a positive integer, got {v!r}")


def check_square(family: str, hf: dict, source: str) -> None:
    """lmzoo's patch grids are square: one int for image_size and for patch_size."""
    for key in ("image_size", "patch_size"):
        v = hf.get(key)
        if isinstance(v, (list, tuple)):
            if len(v) != 2 or v[0] != v[1]:
                raise ConfigError(f"{source}: '{key}' {v} is not square; lmzoo's {family} supports square "
                                  "images and patches only")
            hf[key] = v[0]


@dataclass
class ViTConfig:
    family: ClassVar[str] = "vit"

    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    image_size: int = 224  # the trained resolution; other sizes interpolate the position table
    patch_size: int = 16
    num_channels: int = 3
    norm_eps: float = 1e-12
    act: str = "gelu"  # exact (erf) GeLU
    qkv_bias: bool = True
    pooler: bool = True
    pooler_dim: int | None = None  # pooler_output_size; None: d_model
    pooler_act: str = "tanh"
    num_labels: int = 0  # classifier outputs; 0: no classifier
    labels: list[str] | None = None  # id2label, in id order
    attn_kernel: str = "sdpa"
    # transformers' ViT (training only): hidden_dropout_prob on the patch + position embeddings and on
    # each attention / MLP output before the residual; attention_probs_dropout_prob on the probabilities.
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: str = "float32"
    hf_extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.pooler_dim is None:
            self.pooler_dim = self.d_model
        check_positive("vit", self, ("d_model", "n_layers", "n_heads", "d_ff", "image_size", "patch_size",
                                     "num_channels", "pooler_dim"))
        if self.d_model % self.n_heads:
            raise ConfigError(f"vit: d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads})")
        if self.image_size < self.patch_size:
            raise ConfigError(f"vit: image_size ({self.image_size}) is smaller than patch_size ({self.patch_size})")
        for name in ("act", "pooler_act"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ConfigError(f"vit: {name} '{getattr(self, name)}' is not supported; known: {sorted(ACTIVATIONS)}")
        if not isinstance(self.num_labels, int) or self.num_labels < 0:
            raise ConfigError(f"vit: num_labels must be a non-negative integer, got {self.num_labels!r}")
        if self.labels is not None and self.num_labels and len(self.labels) != self.num_labels:
            raise ConfigError(f"vit: {len(self.labels)} labels given for a classifier of {self.num_labels} outputs")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def hf_architecture(self) -> str:
        return "ViTForImageClassification" if self.num_labels else "ViTModel"

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ViTConfig":
        hf = dict(hf)
        check_square("vit", hf, source)
        for key in ("hidden_act", "pooler_act"):
            if hf.get(key, "gelu") not in ACTIVATIONS:
                raise ConfigError(f"{source}: {key} '{hf[key]}' is not supported; known: {sorted(ACTIVATIONS)}")
        id2label = hf.get("id2label") or {}
        labels = [id2label[k] for k in sorted(id2label, key=int)] if id2label else None
        arch = (hf.get("architectures") or ["ViTModel"])[0]
        classify = arch == "ViTForImageClassification"
        n_labels = (len(labels) if labels else hf.get("num_labels", 2)) if classify else 0
        return cls(d_model=require(hf, "hidden_size", source), n_layers=require(hf, "num_hidden_layers", source),
                   n_heads=require(hf, "num_attention_heads", source), d_ff=require(hf, "intermediate_size", source),
                   image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 16),
                   num_channels=hf.get("num_channels", 3), norm_eps=hf.get("layer_norm_eps", 1e-12),
                   act=hf.get("hidden_act", "gelu"), qkv_bias=hf.get("qkv_bias", True), pooler=not classify,
                   pooler_dim=hf.get("pooler_output_size"), pooler_act=hf.get("pooler_act", "tanh"),
                   num_labels=n_labels, labels=labels,
                   hidden_dropout=float(hf.get("hidden_dropout_prob", 0.0)),
                   attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.0)),
                   dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
                   hf_extra={k: v for k, v in hf.items() if k not in _KNOWN})

    def to_hf(self) -> dict:
        labels = self.labels or [f"LABEL_{i}" for i in range(self.num_labels or 2)]
        return {**self.hf_extra, "model_type": "vit", "architectures": [self.hf_architecture],
                "hidden_size": self.d_model, "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "intermediate_size": self.d_ff, "hidden_act": self.act, "layer_norm_eps": self.norm_eps,
                "image_size": self.image_size, "patch_size": self.patch_size, "num_channels": self.num_channels,
                "qkv_bias": self.qkv_bias, "pooler_output_size": self.pooler_dim, "pooler_act": self.pooler_act,
                "id2label": {str(i): name for i, name in enumerate(labels)},
                "label2id": {name: i for i, name in enumerate(labels)}, "hidden_dropout_prob": self.hidden_dropout,
                "attention_probs_dropout_prob": self.attention_dropout, "dtype": self.dtype}


PRESETS = {
    # google/vit-base-patch16-224: ViT-B/16 fine-tuned on ImageNet-1k, 1000 classes, no pooler; 86.6M
    "vit-base-patch16-224": ViTConfig(d_model=768, n_layers=12, n_heads=12, d_ff=3072, image_size=224, patch_size=16,
                                      pooler=False, num_labels=1000),
}
