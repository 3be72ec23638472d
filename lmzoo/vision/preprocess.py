"""Image preprocessing with torch operations: resize, centre crop, rescale, normalise.

    pixels (uint8, 0..255) -> resize -> centre crop -> ÷255 -> (x - mean) / std -> (B, 3, H, W) float32

Nothing here names a model family; a model's processor is a named set of numbers, kept in its family's
registry record (``Family.image_processor``) and looked up by name in ``PROCESSORS``:

    clip      shortest side to 224 (bicubic), centre crop 224, CLIP's mean/std    (CLIPImageProcessor)
    vit       both sides to 224 (bilinear), no crop, mean = std = 0.5             (ViTImageProcessor)
    imagenet  shortest side to 256 (bilinear), centre crop 224, ImageNet mean/std (torchvision's; FAMILY_FREE below)

Resizing follows PIL, which transformers' processors call: downscaling filters with a kernel widened
by the scale factor (antialiasing; ``F.interpolate(antialias=True)`` implements PIL's filters, bicubic
with a = -0.5), one axis at a time, and a uint8 image comes back as uint8, rounded after each pass. So
the outputs equal transformers' up to PIL's fixed-point coefficients: a pixel now and then one level
(1/255) apart (tests/vision/test_preprocess.py measures how many).
The shortest-side size is computed as transformers does it: long = int(size · long / short).

Pillow is needed only to read files (``read_image``); everything else takes tensors or arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lmzoo.errors import LmzooError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's, over CLIP's training images
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # over ImageNet-1k's training set (torchvision, timm)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # google/vit-*: maps [0, 1] to [-1, 1] ("IMAGENET_STANDARD" in transformers)

RESAMPLE = {"bicubic", "bilinear", "nearest"}


def to_tensor(image) -> torch.Tensor:
    """A PIL image, an (H, W[, C]) array or a (C, H, W) tensor -> (C, H, W) tensor, dtype kept (uint8 stays uint8)."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL.Image, without importing Pillow
        image = np.array(image.convert("RGB"))  # a writable copy
    if isinstance(image, np.ndarray):
        arr = image[..., None] if image.ndim == 2 else image
        if arr.ndim != 3:
            raise ValueError(f"an image array must be (H, W) or (H, W, C), got shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # (C, H, W)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3:
            raise ValueError(f"an image tensor must be (C, H, W), got shape {tuple(image.shape)}")
        return image
    raise TypeError(f"cannot read an image from {type(image).__name__}")


def read_image(path: str | Path) -> torch.Tensor:
    """An image file -> (3, H, W) uint8 RGB tensor (needs Pillow: ``pip install 'lmzoo[vision]'``)."""
    try:
        from PIL import Image
    except ImportError as e:
        raise LmzooError("reading image files needs Pillow: pip install 'lmzoo[vision]'") from e
    try:
        with Image.open(path) as im:
            return to_tensor(im)
    except (OSError, ValueError) as e:
        raise LmzooError(f"{path}: cannot read the image ({e})") from e


def output_size(height: int, width: int, size: int | Sequence[int]) -> tuple[int, int]:
    """(h, w) after resizing: an int is the shortest side (aspect kept), a pair is the exact size."""
    if not isinstance(size, int):
        h, w = size
        return int(h), int(w)
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _pass(x: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    if resample == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=resample, antialias=True, align_corners=False)


def resize(image: torch.Tensor, size: int | Sequence[int], resample: str = "bicubic") -> torch.Tensor:
    """(C, H, W) or (B, C, H, W) -> resized. uint8 in, uint8 out, the way PIL computes it: two separable
    passes, each rounded (half up) and clipped to 0..255; the vertical pass goes first when the height
    shrinks, by more than twice as many pixels as the width does (Pillow 13's order, found by testing it;
    older Pillow always starts with the horizontal one, which moves a few pixels by one level). Float
    images: one pass in float, no rounding."""
    if resample not in RESAMPLE:
        raise ValueError(f"resample '{resample}' is unknown; known: {sorted(RESAMPLE)}")
    batched = image.ndim == 4
    x = image if batched else image[None]  # (B, C, H, W)
    H, W = x.shape[-2:]
    h, w = output_size(H, W, size)
    if (h, w) == (H, W):
        return image
    if image.dtype != torch.uint8:
        y = _pass(x.float(), (h, w), resample)
    else:
        y = x.float()
        vertical_first = h < H and H - h > 2 * (W - w)
        order = [(h, W), (h, w)] if vertical_first else [(H, w), (h, w)]
        for step in order:
            if step != tuple(y.shape[-2:]):
                y = torch.floor(_pass(y, step, resample) + 0.5).clamp_(0, 255)
        y = y.to(torch.uint8)
    return y if batched else y[0]


def center_crop(image: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """The central (h, w) window; an image smaller than the window is zero-padded around (as transformers does)."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    H, W = image.shape[-2:]
    if H < h or W < w:  # pad to at least (h, w), the image centred (ceil of half the margin on top/left)
        ph, pw = max(h - H, 0), max(w - W, 0)
        top, left = math.ceil(ph / 2), math.ceil(pw / 2)
        image = F.pad(image, (left, pw - left, top, ph - top))
        H, W = image.shape[-2:]
    top, left = (H - h) // 2, (W - w) // 2
    return image[..., top:top + h, left:left + w]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel; x (C, H, W) or (B, C, H, W) in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - m) / s


def rescale(image: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1 (float images are taken as already in [0, 1])."""
    return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()


@dataclass(frozen=True)
class ImageProcessor:
    """One model's preprocessing as numbers; call it on one image or a list of them -> (B, 3, H, W)."""

    size: int | tuple[int, int] = 224  # int: shortest side; (h, w): exact
    crop: int | tuple[int, int] | None = 224
    resample: str = "bicubic"
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def one(self, image) -> torch.Tensor:
        x = to_tensor(image)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)  # grey -> RGB
        elif x.shape[0] == 4:
            x = x[:3]  # drop alpha
        if x.shape[0] != 3:
            raise ValueError(f"expected 1, 3 or 4 channels, got {x.shape[0]}")
        x = resize(x, self.size, self.resample)
        if self.crop is not None:
            x = center_crop(x, self.crop)
        return normalize(rescale(x), self.mean, self.std)

    def __call__(self, images) -> torch.Tensor:
        if isinstance(images, (list, tuple)):
            return torch.stack([self.one(im) for im in images])
        return self.one(images)[None]


# Recipes that belong to no model family; each image family's own is its registry record's ``image_processor``.
FAMILY_FREE = {
    "imagenet": ImageProcessor(size=256, crop=224, resample="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD),
}


class Processors(Mapping):
    """``PROCESSORS[name]``: every registered family's ``Family.image_processor`` (clip, vit), then
    ``FAMILY_FREE`` (imagenet). Read from the registry on first use, not at import: the family packages
    import this module for ``ImageProcessor``."""

    def __init__(self):
        self._table: dict[str, ImageProcessor] | None = None

    def _all(self) -> dict[str, ImageProcessor]:
        if self._table is None:
            from lmzoo.models.registry import families

            own = {n: f.image_processor for n, f in families().items() if f.image_processor is not None}
            self._table = {**own, **FAMILY_FREE}
        return self._table

    def __getitem__(self, name: str) -> ImageProcessor:
        table = self._all()
        if name not in table:
            raise KeyError(f"no image processor '{name}'; known: {sorted(table)}")
        return table[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return f"PROCESSORS({self._all()!r})"


PROCESSORS = Processors()
