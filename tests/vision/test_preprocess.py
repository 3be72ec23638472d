"""Image preprocessing against transformers' processors (their PIL backends) on generated images.

Tolerance: PIL resizes uint8 images with 22-bit fixed-point filter coefficients and rounds after each
of its two passes; lmzoo does the same passes in float32 and rounds the same way, so a pixel can land
one level (1/255) away where the exact value sits next to a rounding boundary. After normalisation one
level is 1/(255·std) (0.0157 for std 0.25). The tests allow exactly that, and for at most 2% of the
values (measured: under 0.05% for bicubic, under 1.5% for bilinear); everything else is equal.
"""

import numpy as np
import pytest
import torch

from lmzoo.vision.preprocess import (CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD, PROCESSORS, center_crop,
                                     output_size, read_image, resize, to_tensor)

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL")
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil  # noqa: E402

PILLOW_13 = int(PIL.__version__.split(".")[0]) >= 13


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: smooth colour waves plus noise, saturating in places (what makes bicubic overshoot)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([127 + 110 * np.sin(x / 7.0 + c) * np.cos(y / 11.0) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def _compare(ours: torch.Tensor, ref: np.ndarray, std) -> tuple[float, float]:
    levels = (ours - torch.from_numpy(ref)).abs() * torch.tensor(std)[None, :, None, None] * 255
    return levels.max().item(), (levels > 0.5).float().mean().item()


# (h, w): landscape and portrait, down- and up-scaling, already 224, height shrinking faster than width
SIZES = [(300, 400), (400, 300), (180, 150), (100, 90), (224, 224), (640, 480), (30, 500)]


@pytest.mark.parametrize("h,w", SIZES)
def test_clip_and_vit_processors_match_transformers(h, w):
    if not PILLOW_13 and h - output_size(h, w, 224)[0] > 2 * (w - output_size(h, w, 224)[1]):
        pytest.skip("Pillow < 13 resizes horizontally first whatever the shape")
    im = _image(h, w)
    for name, ref, std in (("clip", CLIPImageProcessorPil(), CLIP_STD), ("vit", ViTImageProcessorPil(), HALF)):
        ours = PROCESSORS[name](im)
        theirs = ref(images=[im], return_tensors="np")["pixel_values"]
        assert ours.shape == theirs.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
        worst, share = _compare(ours, theirs, std)
        assert worst <= 1.0 + 1e-4 and share <= 0.02, (name, worst, share)


def test_imagenet_statistics_and_crop_match_transformers():
    """ImageNet mean/std after a 256 resize and a 224 centre crop: the CLIP processor class with those numbers."""
    ref = CLIPImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                                resample=PIL.Image.BILINEAR)
    for h, w in [(300, 450), (512, 256)]:
        im = _image(h, w, seed=1)
        worst, share = _compare(PROCESSORS["imagenet"](im), ref(images=[im], return_tensors="np")["pixel_values"],
                                IMAGENET_STD)
        assert worst <= 1.0 + 1e-4 and share <= 0.02


def test_shortest_side_and_centre_crop():
    assert output_size(300, 400, 224) == (224, 298) and output_size(400, 300, 224) == (298, 224)
    assert output_size(10, 20, (7, 9)) == (7, 9)
    from transformers.image_transforms import center_crop as hf_center_crop

    x = torch.arange(3 * 5 * 7, dtype=torch.uint8).reshape(3, 5, 7)
    for size in [(3, 3), (4, 6), (8, 10), (5, 9)]:  # smaller, and larger than the image (zero-padded)
        ref = hf_center_crop(x.numpy(), size, data_format="channels_first", input_data_format="channels_first")
        assert torch.equal(center_crop(x, size), torch.from_numpy(np.ascontiguousarray(ref))), size


def test_files_arrays_and_tensors_agree(tmp_path):
    im = _image(60, 80)
    PIL.Image.fromarray(im).save(tmp_path / "x.png")
    from_file = read_image(tmp_path / "x.png")
    assert from_file.shape == (3, 60, 80) and from_file.dtype == torch.uint8
    assert torch.equal(from_file, to_tensor(im)) and torch.equal(to_tensor(PIL.Image.fromarray(im)), from_file)
    proc = PROCESSORS["clip"]
    assert torch.equal(proc(from_file), proc(im)) and proc([im, im]).shape == (2, 3, 224, 224)
    grey = im[..., 0]  # (H, W): one channel, repeated to RGB
    assert torch.equal(proc(grey), proc(np.stack([grey] * 3, -1)))


def test_float_images_resize_without_rounding():
    x = torch.rand(3, 40, 50)
    y = resize(x, 20)
    assert y.dtype == torch.float32 and y.shape == (3, 20, 25)
    assert not torch.equal(y, y.mul(255).round().div(255))  # not quantised to levels


def test_processors_are_the_family_records_plus_imagenet():
    from lmzoo.models.registry import families

    own = {n for n, f in families().items() if f.image_processor is not None}
    assert own == {"vit", "clip"} and set(PROCESSORS) == own | {"imagenet"}
    assert all(PROCESSORS[n] is families()[n].image_processor for n in own)
    assert (PROCESSORS["vit"].size, PROCESSORS["vit"].crop, PROCESSORS["vit"].mean) == ((224, 224), None, HALF)
    assert PROCESSORS["clip"].std == CLIP_STD and PROCESSORS["imagenet"].mean == IMAGENET_MEAN
    with pytest.raises(KeyError, match="known: "):
        PROCESSORS["bert"]
    assert PROCESSORS.get("bert") is None and "clip" in PROCESSORS
