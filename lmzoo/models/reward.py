"""Reward model = any decoder + a scalar head read at the last non-pad token.

On disk it is transformers' ``<Arch>ForSequenceClassification`` with ``num_labels: 1``
(``LlamaForSequenceClassification``, ``GPT2ForSequenceClassification``, ``BloomForSequenceClassification``,
``GlmForSequenceClassification``, ``DeepseekV2ForSequenceClassification``): the family's causal-LM keys
without ``lm_head`` plus ``score.weight`` (1, D). The family record names that class
(``Family.hf_sequence_classifier``); families without one (encoders, encoder-decoders) have no
reward-model layout and are refused.

What transformers does, and so what this does:
- ``score = Linear(D, 1, bias=False)`` on the final normed hidden states, initialised N(0, initializer_range²);
- the reward of a row is the score at the *rightmost token that is not pad_token_id* (left or right
  padding alike; a real token equal to the pad id, e.g. GPT-2's EOS used as pad, is skipped too);
- no pad_token_id: only a batch of one row can be scored (its last token).
diff from transformers: a left-padded row counts its positions from its first real token (the decoder
derives them from ``attention_mask``), so its reward equals the unpadded row's; transformers'
ForSequenceClassification gives pads positions 0..k-1 unless it is given ``position_ids`` (pass
``position_ids=torch.arange(T)[None]`` to forward() to reproduce that).

ChatGLM-6B (the GLM prefix decoder) has no such class anywhere: transformers has no ``chatglm`` model,
and THUDM's remote code for it (modeling_chatglm.py) has only ChatGLMModel and
ChatGLMForConditionalGeneration. Its reward model is written the same way as the others: the release's
keys (``transformer.*``) without ``lm_head``, plus ``score.weight``, with ``architectures:
["ChatGLMForSequenceClassification"]`` (the release's ``ChatGLM`` prefix, transformers' suffix; the name
``lmzoo.load`` reads as a reward model). ChatGLM2/3's remote code has a class of that name with another
head (``classifier_head`` with a bias, read at the last position whatever the padding) over another
decoder layout; it does not read these files, and ``model_type: chatglm`` with ``position_encoding_2d``
says which model they are. With no reference class, tests/models/test_reward_model.py checks the rewards
against a direct computation: the causal model's final hidden states at the last real token times
``score.weight``. Its rows must carry [gMASK] <sop> (the prompt's end) as every ChatGLM-6B input does.
A reward checkpoint's ``auto_map`` keeps no ``AutoModel*`` entry: those name the causal-LM class,
which would read the file as a language model with a missing head.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.interop.convert import KeyMap, Rule, rename
from lmzoo.models.registry import Family, families, family_of
from lmzoo.nn.transformer import DecoderLM

# config.json fields that describe the head; the decoder's config does not carry them
_HEAD_FIELDS = ("id2label", "label2id", "num_labels")
# the shapes whose last token has read the whole row (causally, or the prompt bidirectionally)
_DECODERS = ("causal decoder", "prefix decoder")


@dataclass
class RewardOutput:
    rewards: torch.Tensor  # (B,), the score at each row's last non-pad token
    hidden_states: torch.Tensor  # final (normed) hidden states, (B, T, D)
    aux_loss: torch.Tensor | None = None  # the decoder's MoE balance loss (training forwards only)


class NoHead(nn.Module):
    """Stands in for the decoder's LM head: a reward model computes no logits and stores no head."""

    def forward(self, h: torch.Tensor) -> None:
        return None


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(B,) index of each row's rightmost token that is not ``pad_token_id``, as transformers finds it
    (a row of pads only gives 0); without a pad id, the last position, for a single row only."""
    B, T = input_ids.shape
    if pad_token_id is None:
        if B != 1:
            raise ValueError(f"a reward model without pad_token_id scores one row at a time, got a batch of {B}: "
                             "set model.config.pad_token_id (e.g. to the tokenizer's pad or EOS id)")
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    non_pad = (input_ids != pad_token_id).to(torch.int32)  # (B, T)
    idx = torch.arange(T, device=input_ids.device, dtype=torch.int32)
    return (idx * non_pad).argmax(-1)  # (B,)


def _reward_family(config) -> Family:
    fam = family_of(config)
    if fam.shape not in _DECODERS or not fam.hf_sequence_classifier:
        able = sorted(f.name for f in families().values() if f.hf_sequence_classifier)
        raise ConfigError(f"family '{fam.name}' ({fam.shape}) has no reward-model layout: a reward model is a "
                          f"decoder (causal or prefix) with a score head; families that have one: {able}")
    return fam


class RewardModel(nn.Module):
    """decoder (its LM head dropped) -> final hidden states -> score at the last non-pad token.

    ``RewardModel(decoder)`` takes the decoder over (its ``lm_head`` becomes ``NoHead``); use
    ``reward_model(model)`` to wrap a copy and leave the language model as it is."""

    def __init__(self, decoder: DecoderLM):
        super().__init__()
        _reward_family(getattr(decoder, "config", None))
        if not isinstance(decoder, DecoderLM):
            raise ConfigError(f"a reward model wraps a decoder (DecoderLM), got {type(decoder).__name__}")
        self.decoder = decoder
        self.decoder.lm_head = NoHead()  # transformers' ForSequenceClassification has no LM head either
        self.config = decoder.config
        w = decoder.embed.weight  # the head on the decoder's device (meta while loading) and dtype
        self.score = nn.Linear(w.shape[1], 1, bias=False, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.score.weight, std=float(self.config.hf_extra.get("initializer_range", 0.02)))

    @property
    def pad_token_id(self) -> int | None:
        return self.config.pad_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> RewardOutput:
        """``attention_mask`` masks the pads as keys (left padding needs it; with none given, as in
        transformers, pads are attended); the reward is read at the rightmost non-pad token."""
        out = self.decoder(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        h = out.hidden_states  # (B, T, D)
        last = last_token_index(input_ids, self.pad_token_id).to(h.device)  # (B,)
        rows = torch.arange(h.shape[0], device=h.device)
        rewards = self.score(h[rows, last]).squeeze(-1)  # (B, D) -> (B,)
        return RewardOutput(rewards=rewards, hidden_states=h, aux_loss=out.aux_loss)

    # -- the checkpoint layout (lmzoo.save / lmzoo.load call these) -------------------------------
    def hf_keymap(self, base: KeyMap) -> KeyMap:
        return reward_keymap(base)

    def hf_config(self, hf: dict) -> dict:
        """The decoder's config.json as ``<Arch>ForSequenceClassification`` with one label (and no
        ``auto_map`` entry naming the causal-LM class)."""
        fam = _reward_family(self.config)
        hf = {k: v for k, v in hf.items() if k not in _HEAD_FIELDS}
        hf = {**hf, "architectures": [fam.hf_sequence_classifier], "num_labels": 1, "id2label": {"0": "LABEL_0"},
              "label2id": {"LABEL_0": 0}}
        auto = {k: v for k, v in (hf.pop("auto_map", None) or {}).items() if not k.startswith("AutoModel")}
        if auto:
            hf["auto_map"] = auto
        if self.pad_token_id is not None:
            hf["pad_token_id"] = self.pad_token_id
        return hf

    @classmethod
    def for_checkpoint(cls, decoder: DecoderLM, keymap: KeyMap, hf: dict, source: str = "config.json"):
        """(reward model around ``decoder``, the key map of its checkpoint) for a config.json that names a
        ForSequenceClassification class; ``decoder`` may be on the meta device (the head then is too)."""
        fam = _reward_family(decoder.config)
        archs = hf.get("architectures") or []
        if fam.hf_sequence_classifier not in archs:
            raise CheckpointError(f"{source}: architectures {archs} name no layout lmzoo reads; a {fam.name} "
                                  f"reward model is saved as {fam.hf_sequence_classifier}")
        n_labels = hf.get("num_labels", len(hf.get("id2label") or {0: ""}))
        if n_labels != 1:
            raise CheckpointError(f"{source}: a reward model has one label (num_labels: 1); this classifier has "
                                  f"{n_labels}")
        cfg = decoder.config
        cfg.hf_extra = {k: v for k, v in cfg.hf_extra.items() if k not in _HEAD_FIELDS}
        return cls(decoder), reward_keymap(keymap)


def is_reward_checkpoint(hf: dict) -> bool:
    """Does this config.json describe a sequence classifier (a reward model) rather than a causal LM?"""
    return any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def _prefixed(rule: Rule, prefix: str) -> Rule:
    return replace(rule, ours=[prefix + k for k in rule.ours],
                   alternatives=[_prefixed(a, prefix) for a in rule.alternatives])


def reward_keymap(base: KeyMap) -> KeyMap:
    """The family's causal-LM key map, less the LM head, with the decoder under ``decoder.`` and the
    score head under transformers' name for it."""
    rules = [_prefixed(r, "decoder.") for r in base.rules if not any(k.startswith("lm_head.") for k in r.ours)]
    return replace(base, rules=rules + [rename("score.weight", "score.weight")])


def reward_model(model_or_dir, *, pad_token_id: int | None = None, dtype=None, device=None) -> RewardModel:
    """A reward model from a ForSequenceClassification directory (as saved), or a new score head on a
    causal LM (a directory such as an SFT run's ``final/``, or a loaded model, which is copied, not
    changed). ``pad_token_id`` overrides the config's (the token the reward skips back over)."""
    if isinstance(model_or_dir, (str, Path)):
        from lmzoo.interop.checkpoint import load  # checkpoint.py imports this module

        model = load(model_or_dir, dtype=dtype, device=device)
        rm = model if isinstance(model, RewardModel) else RewardModel(model)
        rm.source_directory = str(model_or_dir)  # lmzoo.save carries its tokenizer along
    elif isinstance(model_or_dir, RewardModel):
        rm = model_or_dir
    elif isinstance(model_or_dir, nn.Module):
        _reward_family(getattr(model_or_dir, "config", None))  # refuse before copying
        rm = RewardModel(copy.deepcopy(model_or_dir))
        if getattr(model_or_dir, "source_directory", None):
            rm.source_directory = model_or_dir.source_directory
    else:
        raise ConfigError(f"reward_model takes a directory or a model, got {type(model_or_dir).__name__}")
    if pad_token_id is not None:
        rm.config.pad_token_id = pad_token_id
    return rm


def score(model, texts_or_ids, tokenizer=None, *, batch_size: int = 8, add_special_tokens: bool = True) -> list[float]:
    """Rewards of texts (tokenized with ``tokenizer``, by default the one in the model's directory) or of
    token-id lists, one float each, in order. Rows are right-padded with the model's pad_token_id."""
    if isinstance(model, (str, Path)):
        model = reward_model(model)
    if not isinstance(model, RewardModel):
        raise ConfigError(f"score needs a reward model (lmzoo.reward_model(...)), got {type(model).__name__}")
    items = [texts_or_ids] if isinstance(texts_or_ids, str) else list(texts_or_ids)
    if any(isinstance(x, str) for x in items) and (tokenizer is None or isinstance(tokenizer, (str, Path))):
        tokenizer = _tokenizer(tokenizer, model)
    rows = [_ids(x, tokenizer, add_special_tokens) for x in items]
    pad = model.pad_token_id
    if pad is None and batch_size > 1 and len(rows) > 1:
        raise ConfigError("the reward model has no pad_token_id, so rows cannot be batched: set "
                          "model.config.pad_token_id (or reward_model(..., pad_token_id=...)) or pass batch_size=1")
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda k: len(rows[k]))  # similar lengths together: less padding
    out = [0.0] * len(rows)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                T = max(len(rows[k]) for k in chunk)
                ids = torch.tensor([rows[k] + [pad] * (T - len(rows[k])) for k in chunk], device=device)  # (b, T)
                mask = torch.tensor([[1] * len(rows[k]) + [0] * (T - len(rows[k])) for k in chunk], device=device)
                rewards = model(ids, attention_mask=mask).rewards.float().tolist()
                for k, r in zip(chunk, rewards):
                    out[k] = r
    finally:
        model.train(was_training)
    return out


def _ids(x, tokenizer, add_special_tokens: bool) -> list[int]:
    if isinstance(x, str):
        ids = list(tokenizer.encode(x, add_special_tokens=add_special_tokens))
    else:
        ids = x.tolist() if hasattr(x, "tolist") else list(x)
    if not ids:
        raise ConfigError("score: an empty row has no last token to read the reward at")
    return [int(i) for i in ids]


def _tokenizer(path, model: RewardModel):
    from lmzoo.tokenizers import find_tokenizer, load_tokenizer

    src = path or getattr(model, "source_directory", None)
    if src is None or find_tokenizer(src) is None:
        raise ConfigError("score: texts need a tokenizer; pass tokenizer= (or token ids), or load the reward model "
                          "from a directory that holds one")
    return load_tokenizer(src)
