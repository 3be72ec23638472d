r"""Preference data for reward modelling, DPO and its relatives: a prompt, a chosen and a rejected reply.

    files --read_pairs--> PreferencePair(prompt, chosen, rejected) --encode_pairs--> PairExamples (+ counts)
          --PairBatches--> {chosen_input_ids, chosen_labels, chosen_attention_mask, rejected_...}

The format is detected from each record's keys (the first that fits, in this order):

| format | keys | prompt |
|---|---|---|
| ``sharegpt`` | ``conversations``, ``chosen: {from, value}``, ``rejected``, ``system`` | the conversation |
| ``trl`` | ``prompt``, ``chosen``, ``rejected``: strings or message lists | a string: one user turn |
| ``alpaca`` | ``instruction``, ``input``, ``chosen``, ``rejected``, ``system`` | instruction + "\n" + input |
| ``hh`` | ``chosen``, ``rejected`` only: two full transcripts | their shared turns |

(``sharegpt`` and ``alpaca`` are LLaMA-Factory's ranking formats, ``data/dpo_en_demo.json`` the first.)

``hh`` takes Anthropic HH-RLHF's transcripts (``"\n\nHuman: ... \n\nAssistant: ..."``) or two message
lists (TRL's "implicit prompt" format), and splits them at the last assistant turn: the turns both
share are the prompt, and each one's last assistant turn is its response. Transcripts that differ
anywhere else (a different question, an extra round) are an error, as is a record that fits no
format (``pairs.json: record 7: fits no preference format: it has keys [...]``).

Each response is one assistant turn, so a pair keeps it as text; the prompt is a conversation
ending with a user turn. Encoding renders ``prompt + [response]`` with the chat template of
``lmzoo sft`` (a template without a system turn gets the system prompt folded into the first
question, as SFT does) and labels the last assistant turn only, as SFT labels an answer: its tokens
and its end-of-turn token; the prompt, earlier assistant turns and the template's headers are -100.
Template text after the end-of-turn token (ChatML's "\n") is cut off, so the last token of a row is
the one a reward model reads.

**Too long.** A pair whose prompt plus longer response exceeds ``max_len`` is dropped
(``overflow="drop"``) or truncated as TRL does: the prompt first, keeping its *end* (the question
just before the reply and the template's assistant header), down to what the longer response leaves
but never below ``max_prompt_len`` tokens (default ``max_len // 2``); then each response keeps its
first tokens (its end-of-turn token is lost). Both sequences of a pair lose the same prompt tokens.

**What is an error and what is skipped.** A missing field, a wrong type, an empty response or a
prompt not ending with a user turn is an ``LmzooError`` naming the file, the record and the field:
a record that cannot be trained on is never silently left out. A pair whose chosen and rejected
token ids are identical (the same reply twice, or replies that differ only past ``max_len``) is a
valid record with nothing to learn: its DPO loss is a constant log 2 with zero gradient, so it is
skipped and counted (``identical``), never turned into a NaN.

**Batches.** ``PairBatches`` is ``sampler.Batches`` (seeded shuffle, ``state_dict`` /
``load_state_dict``) over pairs: each batch holds (B, T) ``chosen_*`` and ``rejected_*`` tensors,
right-padded to one T (the longest of either), so ``concatenated(batch)`` gives the (2B, T) rows of
one forward (chosen first, TRL's layout).

**Unpaired (KTO).** ``read_unpaired`` reads ``{prompt, completion, label: bool}`` records
(TRL's unpaired format) and ``encode_unpaired`` encodes them the same way, with a ``desirable`` flag.

**Built-in data** (no ``--data``) lives in ``lmzoo.data.builtin_preference``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from lmzoo.data.conversations import Message, _from_sharegpt, _list, _string, check_conversation, read_records
from lmzoo.data.sampler import Batches
from lmzoo.data.sft import IGNORE, OVERFLOW, _pad_id
from lmzoo.errors import ConfigError, LmzooError


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[Message]  # ends with a user turn
    chosen: str  # the preferred assistant reply
    rejected: str

    def conversation(self, which: str) -> list[Message]:
        """``prompt`` + the ``"chosen"`` or ``"rejected"`` reply as an assistant turn."""
        return self.prompt + [{"role": "assistant", "content": getattr(self, which)}]


def _user(text, fld: str) -> list[Message]:
    return [{"role": "user", "content": _string(text, fld)}]


def _messages(value, fld: str) -> list[Message]:
    out = []
    for k, m in enumerate(_list(value, fld)):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LmzooError(f"{fld}[{k}] is not a {{role, content}} object")
        out.append({"role": m["role"], "content": _string(m["content"], f"{fld}[{k}].content")})
    return out


def _reply(value, fld: str) -> str:
    """A response: a string, or a list of exactly one assistant message."""
    if isinstance(value, str):
        return value
    msgs = _messages(value, fld)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise LmzooError(f"{fld} holds {[m['role'] for m in msgs]}; a response is one assistant message")
    return msgs[0]["content"]


def _from_sharegpt_pair(r: dict):
    prompt = _from_sharegpt(r)
    replies = []
    for name in ("chosen", "rejected"):
        m = r[name]
        if not isinstance(m, dict) or "value" not in m:
            raise LmzooError(f"{name} holds {type(m).__name__}, expected a {{from, value}} object")
        if m.get("from", "gpt") not in ("gpt", "assistant"):
            raise LmzooError(f"{name}.from is {m['from']!r}; a response comes from 'gpt' (or 'assistant')")
        replies.append(_string(m["value"], f"{name}.value"))
    return prompt, *replies


def _from_trl(r: dict):
    prompt = _user(r["prompt"], "prompt") if isinstance(r["prompt"], str) else _messages(r["prompt"], "prompt")
    return prompt, _reply(r["chosen"], "chosen"), _reply(r["rejected"], "rejected")


def _from_alpaca_pair(r: dict):
    system = [{"role": "system", "content": _string(r["system"], "system")}] if r.get("system") else []
    query = [_string(r.get(f) or "", f) for f in ("instruction", "input")]
    return (system + [{"role": "user", "content": "\n".join(q for q in query if q)}],
            _string(r["chosen"], "chosen"), _string(r["rejected"], "rejected"))


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def parse_hh(text: str, fld: str = "transcript") -> list[Message]:
    """An Anthropic HH transcript ``"\\n\\nHuman: q\\n\\nAssistant: a ..."`` -> messages (contents stripped)."""
    parts = _HH_TURN.split(_string(text, fld))
    if parts[0].strip() or len(parts) < 3:
        raise LmzooError(f"{fld} is not an HH transcript: it must start with '\\n\\nHuman:' and hold "
                         "'\\n\\nAssistant:' turns")
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def split_transcripts(chosen: list[Message], rejected: list[Message]):
    """(prompt, chosen reply, rejected reply) of two transcripts that differ only in their last assistant turn."""
    if not chosen or not rejected:
        raise LmzooError(f"{'chosen' if not chosen else 'rejected'} is an empty transcript")
    if chosen == rejected:  # the same transcript twice: a valid record, skipped (and counted) when encoded
        if chosen[-1]["role"] != "assistant":
            raise LmzooError("chosen does not end with an assistant turn")
        return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    last = k == len(chosen) - 1 == len(rejected) - 1
    if not (last and chosen[k]["role"] == rejected[k]["role"] == "assistant"):
        raise LmzooError(f"chosen and rejected differ at turn {k} (of {len(chosen)} and {len(rejected)}), not only "
                         "in their last assistant turn, so no shared prompt can be split off")
    return chosen[:k], chosen[k]["content"], rejected[k]["content"]


def _from_hh(r: dict):
    c, rj = r["chosen"], r["rejected"]
    if isinstance(c, str) and isinstance(rj, str):
        return split_transcripts(parse_hh(c, "chosen"), parse_hh(rj, "rejected"))
    if isinstance(c, list) and isinstance(rj, list):
        return split_transcripts(_messages(c, "chosen"), _messages(rj, "rejected"))
    raise LmzooError(f"chosen and rejected hold {type(c).__name__} and {type(rj).__name__}; without a prompt they "
                     "must be two HH transcripts (strings) or two message lists")


PAIR_FORMATS = {
    "sharegpt": (lambda r: "conversations" in r and "chosen" in r and "rejected" in r, _from_sharegpt_pair),
    "trl": (lambda r: "prompt" in r and "chosen" in r and "rejected" in r, _from_trl),
    "alpaca": (lambda r: "instruction" in r and "chosen" in r and "rejected" in r, _from_alpaca_pair),
    "hh": (lambda r: "chosen" in r and "rejected" in r, _from_hh),
}
_EXPECTED = ("conversations + chosen + rejected (LLaMA-Factory), prompt + chosen + rejected (TRL), "
             "instruction + chosen + rejected, or chosen + rejected transcripts (HH)")


def detect_pair_format(record) -> str:
    if not isinstance(record, dict):
        raise LmzooError(f"a {type(record).__name__}, not an object with {_EXPECTED}")
    for name, (fits, _) in PAIR_FORMATS.items():
        if fits(record):
            return name
    hint = (" (prompt + completion + label is unpaired KTO data: read it with read_unpaired)"
            if {"prompt", "completion", "label"} <= set(record) else "")
    raise LmzooError(f"fits no preference format: it has keys {sorted(record)}, expected {_EXPECTED}{hint}")


def to_pair(record, fmt: str | None = None) -> PreferencePair:
    """One record -> a checked ``PreferencePair`` (``fmt`` forces a name from ``PAIR_FORMATS``)."""
    if isinstance(record, dict):
        record = {k: v for k, v in record.items() if v is not None}  # Parquet's nulls
    if fmt is None:
        fmt = detect_pair_format(record)
    elif fmt not in PAIR_FORMATS:
        raise LmzooError(f"unknown preference format {fmt!r}; known: {sorted(PAIR_FORMATS)}")
    elif not isinstance(record, dict) or not PAIR_FORMATS[fmt][0](record):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise LmzooError(f"not in the {fmt} preference format (it has keys {keys})")
    prompt, chosen, rejected = PAIR_FORMATS[fmt][1](record)
    pair = PreferencePair(prompt, chosen, rejected)
    for which in ("chosen", "rejected"):
        try:
            check_conversation(pair.conversation(which))
        except LmzooError as e:
            raise LmzooError(f"prompt + {which}: {e}") from None
    return pair


def _read(path, split: str, convert) -> list:
    out = []
    for where, record in read_records(path, split):
        try:
            out.append(convert(record))
        except LmzooError as e:
            raise LmzooError(f"{path}: {where}: {e}") from None
    if not out:
        raise LmzooError(f"{path}: holds no records")
    return out


def read_pairs(path, fmt: str | None = None, split: str = "train") -> list[PreferencePair]:
    """Every record of ``path`` (.json, .jsonl, .parquet, a ``save_to_disk`` folder) as a checked pair."""
    return _read(path, split, lambda r: to_pair(r, fmt))


# -- encoding --------------------------------------------------------------------------------


def encode_response(tok, prompt: list[Message], response: str, template: str | None = None):
    """(ids, labels, start) of ``prompt + [response]``: labels -100 off the response's tokens (and its
    end-of-turn token); ``start`` is the response's first token; template text after it is cut."""
    from lmzoo.tokenizers.chat import render, token_mask

    text, spans = render(tok, prompt + [{"role": "assistant", "content": response}], template=template)
    ids, offsets = tok.encode_with_offsets(text)
    mask = token_mask(offsets, spans[-1:])  # the last assistant turn only: earlier ones belong to the prompt
    trained = [k for k, m in enumerate(mask) if m]
    if not trained:
        raise LmzooError("no token of the response is trained (the template marks no assistant text)")
    if trained[0] == 0:
        raise LmzooError("the template puts no prompt token before the response")
    end = trained[-1] + 1
    return ids[:end], [i if m else IGNORE for i, m in zip(ids[:end], mask)], trained[0]


def _fold(prompt: list[Message], template: str | None, tok) -> list[Message]:
    from lmzoo.tokenizers.chat import TEMPLATE_INFO, builtin_name, fold_system

    info = TEMPLATE_INFO.get(builtin_name(template or tok.chat_template or "") or "")
    return fold_system(prompt) if info and not info.system else prompt


def _check_template(tok, template: str | None) -> None:
    from lmzoo.tokenizers.chat import builtin_name, missing_tokens

    lacking = missing_tokens(tok, template or tok.chat_template or "")
    if lacking:
        raise ConfigError(f"chat template {builtin_name(template or tok.chat_template)!r} writes {lacking}, which "
                          f"{tok.name} does not have as special tokens; choose another template")


def _fit(seqs, max_len: int, max_prompt_len: int):
    """Cut every (ids, labels, start) to ``max_len``: the prompt from the left first (the same number of
    tokens for each), down to ``max_prompt_len`` or what the longest response leaves, then responses."""
    longest = max(len(ids) - start for ids, _, start in seqs)
    start = max(s for _, _, s in seqs)
    keep = min(start, max(max_len - longest, max_prompt_len))
    out = []
    for ids, labels, s in seqs:
        cut = max(0, s - keep)
        out.append((ids[cut:cut + max_len], labels[cut:cut + max_len]))
    return out


@dataclass
class PairExamples:
    """Encoded pairs and what became of the rest: ``kept`` whole, ``truncated``, ``dropped`` (too long),
    ``identical`` (skipped: chosen and rejected the same tokens)."""

    chosen_ids: list[list[int]]
    chosen_labels: list[list[int]]
    rejected_ids: list[list[int]]
    rejected_labels: list[list[int]]
    max_len: int
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    identical: int = 0
    dropped_index: list[int] = field(default_factory=list)
    identical_index: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.chosen_ids)

    @property
    def counts(self) -> dict[str, int]:
        return {"kept": self.kept, "truncated": self.truncated, "dropped": self.dropped, "identical": self.identical}

    def summary(self) -> str:
        n = self.kept + self.truncated + self.dropped + self.identical
        return (f"{n} pairs: {self.kept} kept, {self.truncated} truncated to {self.max_len} tokens, "
                f"{self.dropped} dropped (longer than {self.max_len} tokens), {self.identical} skipped (chosen and "
                f"rejected identical); {len(self)} pairs to train on")


def _encode_all(tok, prompts_and_replies, template, max_len, overflow, max_prompt_len, what: str):
    """Yield (k, [(ids, labels)] or None when dropped, truncated?) for each item's list of replies."""
    if overflow not in OVERFLOW:
        raise LmzooError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    if max_len < 2:
        raise LmzooError(f"max_len must be at least 2, got {max_len}")
    max_prompt_len = max_len // 2 if max_prompt_len is None else max_prompt_len
    if not 1 <= max_prompt_len < max_len:
        raise LmzooError(f"max_prompt_len must be in [1, max_len={max_len}), got {max_prompt_len}")
    _check_template(tok, template)
    for k, (prompt, replies) in enumerate(prompts_and_replies):
        try:
            prompt = _fold(prompt, template, tok)
            seqs = [encode_response(tok, prompt, reply, template) for reply in replies]
        except LmzooError as e:
            raise LmzooError(f"{what} {k}: {e}") from None
        long = max(len(ids) for ids, _, _ in seqs) > max_len
        if long and overflow == "drop":
            yield k, None, True
        else:
            yield k, _fit(seqs, max_len, max_prompt_len) if long else [(i, y) for i, y, _ in seqs], long


def encode_pairs(tok, pairs, template: str | None = None, max_len: int = 512, overflow: str = "truncate",
                 max_prompt_len: int | None = None) -> PairExamples:
    """Encode every pair under ``template`` (a built-in name or Jinja; None: the tokenizer's own);
    over-long pairs are truncated or dropped and counted, identical ones skipped and counted."""
    out = PairExamples([], [], [], [], max_len)
    items = ((p.prompt, (p.chosen, p.rejected)) for p in pairs)
    for k, seqs, long in _encode_all(tok, items, template, max_len, overflow, max_prompt_len, "pair"):
        if seqs is None:
            out.dropped += 1
            out.dropped_index.append(k)
            continue
        (c, cl), (r, rl) = seqs
        if c == r:
            out.identical += 1
            out.identical_index.append(k)
            continue
        for name, value in (("chosen_ids", c), ("chosen_labels", cl), ("rejected_ids", r), ("rejected_labels", rl)):
            getattr(out, name).append(value)
        if long:
            out.truncated += 1
        else:
            out.kept += 1
    if not out.chosen_ids:
        raise LmzooError(f"no preference pair is left: {out.summary()}")
    return out


def _pad(seqs: list[list[int]], T: int, value: int) -> torch.Tensor:
    out = torch.full((len(seqs), T), value, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class PaddedPairs:
    """Rows for ``Batches``: ``batch(rows)`` gives (B, T) ``chosen_`` and ``rejected_`` ``input_ids``,
    ``labels`` (-100 on padding) and ``attention_mask``, right-padded to the longest of both."""

    def __init__(self, examples: PairExamples, pad_id: int = 0):
        self.examples, self.pad_id = examples, pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, rows) -> dict[str, torch.Tensor]:
        ex, idx = self.examples, [int(r) for r in rows]
        T = max(max(len(ex.chosen_ids[i]), len(ex.rejected_ids[i])) for i in idx)
        out = {}
        for side in ("chosen", "rejected"):
            ids = [getattr(ex, f"{side}_ids")[i] for i in idx]
            out[f"{side}_input_ids"] = _pad(ids, T, self.pad_id)
            out[f"{side}_labels"] = _pad([getattr(ex, f"{side}_labels")[i] for i in idx], T, IGNORE)
            out[f"{side}_attention_mask"] = _pad([[1] * len(x) for x in ids], T, 0)
        return out


class PairBatches(Batches):
    """``Batches`` over encoded pairs (seeded shuffle, resumable with ``state_dict`` / ``load_state_dict``)."""

    def __init__(self, examples: PairExamples, batch_size: int, *, pad_id: int = 0, **kwargs):
        super().__init__(PaddedPairs(examples, pad_id), batch_size, **kwargs)


def concatenated(batch: dict) -> dict[str, torch.Tensor]:
    """(2B, T) ``input_ids``, ``labels``, ``attention_mask``: the chosen rows, then the rejected ones."""
    return {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("input_ids", "labels",
                                                                                 "attention_mask")}


def pair_batches(tok, pairs, max_len: int, batch_size: int, *, template: str | None = None,
                 overflow: str = "truncate", max_prompt_len: int | None = None, **kwargs):
    """(PairBatches, PairExamples): encode ``pairs`` and batch them (``kwargs`` go to ``Batches``)."""
    examples = encode_pairs(tok, pairs, template, max_len, overflow, max_prompt_len)
    return PairBatches(examples, batch_size, pad_id=_pad_id(tok), **kwargs), examples


# -- unpaired (KTO) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UnpairedExample:
    prompt: list[Message]
    completion: str
    desirable: bool  # TRL's label: True for a good completion


def to_unpaired(record) -> UnpairedExample:
    if not isinstance(record, dict) or not {"prompt", "completion", "label"} <= set(record):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise LmzooError(f"unpaired data needs prompt, completion and label; it has keys {keys}")
    if not isinstance(record["label"], bool):
        raise LmzooError(f"label holds {record['label']!r}, expected true or false")
    p = record["prompt"]
    prompt = _user(p, "prompt") if isinstance(p, str) else _messages(p, "prompt")
    ex = UnpairedExample(prompt, _reply(record["completion"], "completion"), record["label"])
    check_conversation(prompt + [{"role": "assistant", "content": ex.completion}])
    return ex


def read_unpaired(path, split: str = "train") -> list[UnpairedExample]:
    """Every ``{prompt, completion, label}`` record of ``path`` as a checked ``UnpairedExample``."""
    return _read(path, split, to_unpaired)


@dataclass
class UnpairedExamples:
    input_ids: list[list[int]]
    labels: list[list[int]]
    desirable: list[bool]
    max_len: int
    pad_id: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def summary(self) -> str:
        return (f"{self.kept + self.truncated + self.dropped} completions ({sum(self.desirable)} desirable kept): "
                f"{self.kept} kept, {self.truncated} truncated to {self.max_len} tokens, {self.dropped} dropped")

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """(B, T) ``input_ids``, ``labels``, ``attention_mask`` (right padding) and (B,) ``desirable``."""
        idx = [int(r) for r in rows]
        T = max(len(self.input_ids[i]) for i in idx)
        ids = [self.input_ids[i] for i in idx]
        return {"input_ids": _pad(ids, T, self.pad_id), "labels": _pad([self.labels[i] for i in idx], T, IGNORE),
                "attention_mask": _pad([[1] * len(x) for x in ids], T, 0),
                "desirable": torch.tensor([self.desirable[i] for i in idx])}


def encode_unpaired(tok, examples, template: str | None = None, max_len: int = 512, overflow: str = "truncate",
                    max_prompt_len: int | None = None) -> UnpairedExamples:
    """As ``encode_pairs``, for one completion each; the result is itself the rows ``Batches`` takes."""
    out = UnpairedExamples([], [], [], max_len, pad_id=_pad_id(tok))
    examples = list(examples)
    items = ((e.prompt, (e.completion,)) for e in examples)
    for k, seqs, long in _encode_all(tok, items, template, max_len, overflow, max_prompt_len, "example"):
        if seqs is None:
            out.dropped += 1
            continue
        out.input_ids.append(seqs[0][0])
        out.labels.append(seqs[0][1])
        out.desirable.append(examples[k].desirable)
        if long:
            out.truncated += 1
        else:
            out.kept += 1
    if not out.input_ids:
        raise LmzooError(f"no example is left: {out.summary()}")
    return out
