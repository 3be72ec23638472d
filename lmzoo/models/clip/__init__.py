"""CLIP: a ViT image tower and a causal text tower, projected to one space and trained contrastively."""

from lmzoo.models.clip.config import PRESETS, CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from lmzoo.models.clip.convert import keymap
from lmzoo.models.clip.model import CLIP, CLIPOutput, build, eos_positions
from lmzoo.models.registry import Family
from lmzoo.vision.preprocess import CLIP_MEAN, CLIP_STD, ImageProcessor

FAMILY = Family(
    name="clip", shape="dual encoder", config_cls=CLIPConfig, build=build, keymap=keymap,
    claims=lambda hf: hf.get("model_type") == "clip", hf_architecture="CLIPModel", presets=PRESETS,
    pretrain_objective="contrastive", width_fields=(), cache_free_fields={},  # two towers, no cache
    description="ViT image tower (pre-LN + post-LN) and causal text tower read at EOS, projected, contrastive",
    tokenizer="byte-level BPE (49,408 tokens, lower-cased) for the text; 32x32-pixel patches for the image",
    objective="contrastive (symmetric InfoNCE) over image-text pairs in a batch",
    inputs="text: token + learned position embeddings; image: patch embeddings + [CLS] + learned 2D positions",
    # CLIPImageProcessor: shortest side to 224 (bicubic), centre crop 224, OpenAI's mean/std
    image_processor=ImageProcessor(size=224, crop=224, resample="bicubic", mean=CLIP_MEAN, std=CLIP_STD),
)

__all__ = ["FAMILY", "CLIP", "CLIPConfig", "CLIPOutput", "CLIPTextConfig", "CLIPVisionConfig", "eos_positions"]
