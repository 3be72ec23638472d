"""BERT: post-LayerNorm bidirectional encoder with segment embeddings, MLM and NSP heads, pooler."""

from lmzoo.models.bert.config import PRESETS, BertConfig
from lmzoo.models.bert.convert import keymap
from lmzoo.models.bert.model import Bert, BertOutput, build, mean_pool
from lmzoo.models.registry import Family


def resolve(cfg: BertConfig, keys: set) -> BertConfig:
    """The heads are the ones the checkpoint holds (config.json's ``architectures`` is not reliable)."""
    bare = {k.removeprefix("bert.") for k in keys}
    return cfg.replace(mlm_head=any(k.startswith("cls.predictions.") for k in keys),
                       nsp_head="cls.seq_relationship.weight" in keys, pooler="pooler.dense.weight" in bare)


FAMILY = Family(
    name="bert", shape="encoder", config_cls=BertConfig, build=build, keymap=keymap,
    claims=lambda hf: hf.get("model_type") == "bert", hf_architecture="BertForPreTraining", presets=PRESETS,
    pretrain_objective="masked_lm", width_fields=("d_ff",), cache_free_fields={},  # an encoder keeps no cache
    description="learned positions + segments, post-LayerNorm encoder, GeLU MLP, MLM + NSP heads",
    tokenizer="WordPiece (30,522 tokens, uncased)",
    objective="masked-LM (15% of tokens) + next-sentence prediction",
    inputs="token + segment + learned position embeddings, LayerNorm",
    resolve=resolve,
)

__all__ = ["FAMILY", "Bert", "BertConfig", "BertOutput", "mean_pool"]
