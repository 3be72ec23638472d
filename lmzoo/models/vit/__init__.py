"""ViT: pre-LayerNorm bidirectional encoder over image patches, [CLS] pooling, classifier head."""

from lmzoo.models.registry import Family
from lmzoo.models.vit.config import PRESETS, ViTConfig
from lmzoo.models.vit.convert import keymap
from lmzoo.models.vit.model import ViT, ViTOutput, build
from lmzoo.vision.preprocess import HALF, ImageProcessor


def resolve(cfg: ViTConfig, keys: set) -> ViTConfig:
    """The heads are the ones the checkpoint holds: every ViT config.json carries ``id2label``, so only
    a ``classifier`` key says there is a classifier; a pooler may sit beside it (google/vit-base-patch16-224)."""
    classify = "classifier.weight" in keys
    n_labels = (len(cfg.labels) if cfg.labels else 2) if classify else 0
    pooler = any(k.removeprefix("vit.") == "pooler.dense.weight" for k in keys)
    return cfg.replace(num_labels=n_labels, pooler=pooler)


FAMILY = Family(
    name="vit", shape="encoder", config_cls=ViTConfig, build=build, keymap=keymap,
    claims=lambda hf: hf.get("model_type") == "vit", hf_architecture="ViTForImageClassification", presets=PRESETS,
    pretrain_objective="classification", width_fields=("d_ff",), cache_free_fields={},  # an encoder keeps no cache
    description="patch embedding + [CLS] + learned 2D positions, pre-LayerNorm encoder, GeLU MLP, classifier",
    tokenizer="none: each 16x16-pixel patch is projected to a token (a stride-16 convolution)",
    objective="supervised image classification (ImageNet-21k, then fine-tuned on ImageNet-1k)",
    inputs="patch embeddings + [CLS] + learned 2D position embeddings (interpolated for other sizes)",
    resolve=resolve,
    # ViTImageProcessor: both sides to 224 (bilinear), no crop, mean = std = 0.5 (maps [0, 1] to [-1, 1])
    image_processor=ImageProcessor(size=(224, 224), crop=None, resample="bilinear", mean=HALF, std=HALF),
)

__all__ = ["FAMILY", "ViT", "ViTConfig", "ViTOutput"]
