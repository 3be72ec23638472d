"""CLIP: a ViT image tower and a causal text tower, projected to one space and trained contrastively."""

from lmzoo.models.clip.config import PRESETS, CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from lmzoo.models.clip.convert import keymap
from lmzoo.models.clip.model import CLIP, CLIPOutput, build, eos_positions
from lmzoo.models.registry import Family

FAMILY = Family(
    name="clip", shape="dual encoder", config_cls=CLIPConfig, build=build, keymap=keymap,
    claims=lambda hf: hf.get("model_type") == "clip", hf_architecture="CLIPModel", presets=PRESETS,
    description="ViT image tower (pre-LN + post-LN) and causal text tower read at EOS, projected, contrastive",
    tokenizer="byte-level BPE (49,408 tokens, lower-cased) for the text; 32x32-pixel patches for the image",
    objective="contrastive (symmetric InfoNCE) over image-text pairs in a batch",
    inputs="text: token + learned position embeddings; image: patch embeddings + [CLS] + learned 2D positions",
)

__all__ = ["FAMILY", "CLIP", "CLIPConfig", "CLIPOutput", "CLIPTextConfig", "CLIPVisionConfig", "eos_positions"]
