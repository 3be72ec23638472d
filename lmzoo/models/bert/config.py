"""BERT configuration (transformers' ``BertConfig`` field names) and published sizes as presets.

Which heads a model has is part of the config: ``mlm_head`` (masked-LM), ``nsp_head`` (next sentence
prediction) and ``pooler`` (tanh layer over [CLS], which NSP reads). config.json cannot say it
reliably (bert-base-uncased ships a BertForPreTraining checkpoint under "BertForMaskedLM"), so
``lmzoo.load`` sets them from the keys the checkpoint holds (``resolve`` in ``__init__.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmzoo.errors import ConfigError
from lmzoo.interop.hf_config import require
from lmzoo.models.config_base import DecoderConfig
from lmzoo.nn.mlp import ACTIVATIONS

_KNOWN = {"model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
          "tie_word_embeddings", "position_embedding_type", "is_decoder", "add_cross_attention", "bos_token_id",
          "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "hidden_dropout_prob",
          "attention_probs_dropout_prob"}

# architectures -> (mlm_head, nsp_head, pooler), for configs built without a checkpoint
_HEADS = {"BertForPreTraining": (True, True, True), "BertForMaskedLM": (True, False, False),
          "BertForNextSentencePrediction": (False, True, True), "BertModel": (False, False, True)}


@dataclass
class BertConfig(DecoderConfig):
    family = "bert"
    vocab_size: int = 30522
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    max_positions: int = 512
    norm_eps: float = 1e-12
    tie_embeddings: bool = True  # the MLM decoder is the word embedding
    pad_token_id: int | None = 0
    type_vocab_size: int = 2  # segments A and B
    act: str = "gelu"  # exact (erf) GeLU, in the layers and the MLM transform
    mlm_head: bool = True
    nsp_head: bool = True
    pooler: bool = True
    # transformers' BERT (training only): hidden_dropout_prob on the normed embeddings and on each
    # attention / MLP output before its Add & Norm; attention_probs_dropout_prob on the attention
    # probabilities. A config.json without them reads as BertConfig's 0.1; lmzoo's own default to none.
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.n_kv_heads != self.n_heads or self.head_dim * self.n_heads != self.d_model:
            raise ConfigError(f"bert: n_heads ({self.n_heads}) must split d_model ({self.d_model}) into full "
                              "heads, with as many K/V heads")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"bert: hidden_act '{self.act}' is not supported; known: {sorted(ACTIVATIONS)}")
        if self.nsp_head and not self.pooler:
            raise ConfigError("bert: the next-sentence head reads the pooler; nsp_head needs pooler")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size <= 0:
            raise ConfigError(f"bert: type_vocab_size must be a positive integer, got {self.type_vocab_size!r}")

    @property
    def hf_architecture(self) -> str:
        for name, heads in _HEADS.items():
            if heads == (self.mlm_head, self.nsp_head, self.pooler):
                return name
        return "BertForPreTraining" if self.nsp_head else ("BertForMaskedLM" if self.mlm_head else "BertModel")

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "BertConfig":
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ConfigError(f"{source}: position_embedding_type '{pos}' is not supported; lmzoo's bert has "
                              "learned absolute positions only")
        for flag in ("is_decoder", "add_cross_attention"):
            if hf.get(flag):
                raise ConfigError(f"{source}: '{flag}' is true; lmzoo's bert is the bidirectional encoder")
        act = hf.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act '{act}' is not supported; known: {sorted(ACTIVATIONS)}")
        arch = (hf.get("architectures") or ["BertForPreTraining"])[0]
        mlm, nsp, pooler = _HEADS.get(arch, (False, False, True))
        return cls(vocab_size=require(hf, "vocab_size", source), d_model=require(hf, "hidden_size", source),
                   n_layers=require(hf, "num_hidden_layers", source), n_heads=require(hf, "num_attention_heads", source),
                   d_ff=require(hf, "intermediate_size", source), max_positions=hf.get("max_position_embeddings", 512),
                   norm_eps=hf.get("layer_norm_eps", 1e-12), type_vocab_size=hf.get("type_vocab_size", 2), act=act,
                   tie_embeddings=hf.get("tie_word_embeddings", True) is not False, mlm_head=mlm, nsp_head=nsp,
                   pooler=pooler, hf_extra={k: v for k, v in hf.items() if k not in _KNOWN},
                   hidden_dropout=float(hf.get("hidden_dropout_prob", 0.1)),
                   attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
                   **{"pad_token_id": 0, **cls.common_from_hf(hf)})

    def to_hf(self) -> dict:
        return {**self.hf_extra, "model_type": "bert", "architectures": [self.hf_architecture],
                "vocab_size": self.vocab_size, "hidden_size": self.d_model, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "intermediate_size": self.d_ff, "hidden_act": self.act,
                "max_position_embeddings": self.max_positions, "type_vocab_size": self.type_vocab_size,
                "layer_norm_eps": self.norm_eps, "position_embedding_type": "absolute",
                "hidden_dropout_prob": self.hidden_dropout, "attention_probs_dropout_prob": self.attention_dropout,
                "tie_word_embeddings": self.tie_embeddings, **self.special_tokens_hf(), "dtype": self.dtype}


def _bert(d: int, layers: int, heads: int, d_ff: int, *, heads_on: bool = True) -> BertConfig:
    return BertConfig(vocab_size=30522, d_model=d, n_layers=layers, n_heads=heads, d_ff=d_ff, max_positions=512,
                      mlm_head=heads_on, nsp_head=heads_on, pooler=True, dtype="float32",
                      hidden_dropout=0.1, attention_dropout=0.1)  # the published dropouts


PRESETS = {
    "bert-base-uncased": _bert(768, 12, 12, 3072),  # 110M with the pretraining heads
    "bert-large-uncased": _bert(1024, 24, 16, 4096),  # 336M
    "all-minilm-l6-v2": _bert(384, 6, 12, 1536, heads_on=False),  # 22.7M, sentence embeddings, no heads
}
