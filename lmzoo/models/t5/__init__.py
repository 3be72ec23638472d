"""T5 (v1.0 and v1.1): encoder-decoder, RMS norm, bucketed relative position bias, ReLU or GeGLU."""

from lmzoo.models.registry import Family
from lmzoo.models.t5.config import PRESETS, T5Config
from lmzoo.models.t5.convert import keymap
from lmzoo.models.t5.model import build


def resolve(cfg: T5Config, keys: set) -> T5Config:
    """transformers 5 writes ``tie_word_embeddings: true`` even for untied (v1.1) models and saves their
    ``lm_head.weight``: a head in the file is the model's own head."""
    if cfg.tie_embeddings and "lm_head.weight" in keys:
        return cfg.replace(tie_embeddings=False)
    return cfg


FAMILY = Family(
    name="t5", shape="encoder-decoder", config_cls=T5Config, build=build, keymap=keymap,
    claims=lambda hf: hf.get("model_type") == "t5", hf_architecture="T5ForConditionalGeneration", presets=PRESETS,
    pretrain_objective="span_corruption", width_fields=("d_ff",), cache_free_fields={"d_ff": 32},
    description="relative position bias, RMSNorm (pre-norm), ReLU or GeGLU MLP, encoder-decoder",
    tokenizer="SentencePiece unigram (32k, 100 sentinel tokens)",
    objective="span corruption: sentinels replace spans in the input, the decoder writes the spans",
    inputs="token embeddings only; positions enter as a bucketed relative bias on the attention scores",
    resolve=resolve,
    gguf="lmzoo.models.t5.gguf",
)
