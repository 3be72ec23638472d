"""Supervised fine-tuning data: conversations -> (input_ids, labels) -> packed or padded batches.

    files --read_conversations--> conversations --encode_conversations--> SFTExamples (+ counts)
          --PackedConversations | PaddedConversations--> rows --Batches--> {input_ids, labels, ...}

Labels are the input ids where the model is trained and -100 elsewhere. By default only the
assistant's tokens are trained (the chat template's ``{% generation %}`` text: every assistant turn
of a multi-turn conversation, each with its end-of-turn token); the system prompt, the user turns
and the template's role headers are -100. ``train_on_prompt=True`` trains every token. The first
token of a conversation is never a label: nothing before it belongs to the conversation.

Packing (the default) puts whole conversations side by side in rows of at most ``seq_len`` tokens
(best-fit decreasing: longest first, each into the fullest row it still fits) and gives each its
``doc_ids``: ``DecoderLM(..., doc_ids=...)`` lets a token attend only inside its own conversation,
with positions restarting at 0, so a packed row gives the same per-token losses as each
conversation run alone. The loss shifts labels inside the row (logits at t predict labels at
t + 1), so the last token of one conversation would predict the first of the next; that label is
-100 (the rule above), and so are the pad tokens filling a row's end (a document of their own).
``PaddedConversations`` is the plain alternative: one conversation per row, right padding and an
``attention_mask``.

A conversation longer than ``max_len`` is truncated (its first ``max_len`` tokens kept) or dropped,
as ``overflow`` says; one whose first ``max_len`` tokens hold no assistant token is dropped. Every
one is counted (``SFTExamples.kept / truncated / dropped``, ``summary()`` for the log): nothing
silently vanishes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from lmzoo.data.sampler import Batches
from lmzoo.errors import ConfigError, LmzooError
from lmzoo.tokenizers.chat import builtin_name, missing_tokens

IGNORE = -100
OVERFLOW = ("truncate", "drop")


def encode_conversation(tok, messages, template: str | None = None, max_len: int | None = None,
                        train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation under ``template`` (a built-in name or Jinja; None: the
    tokenizer's own); labels are -100 off the assistant's tokens (everywhere but the first token with
    ``train_on_prompt``). ``max_len`` keeps the first ``max_len`` tokens."""
    enc = tok.apply_chat_template(messages, template=template)
    ids = list(enc.ids)
    labels = list(ids) if train_on_prompt else [i if m else IGNORE for i, m in zip(ids, enc.assistant_mask)]
    if labels:
        labels[0] = IGNORE  # never predicted from inside the conversation; in a packed row, from the one before
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels


@dataclass
class SFTExamples:
    """Encoded conversations and what became of the rest: ``kept`` whole, ``truncated``, ``dropped``."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    max_len: int
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_index: list[int] = field(default_factory=list)  # which input conversations were dropped

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def counts(self) -> dict[str, int]:
        return {"kept": self.kept, "truncated": self.truncated, "dropped": self.dropped}

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    @property
    def n_trained(self) -> int:
        """Tokens with a label (the loss's denominator over one epoch)."""
        return sum(sum(y != IGNORE for y in ys) for ys in self.labels)

    def summary(self) -> str:
        n = self.kept + self.truncated + self.dropped
        return (f"{n} conversations: {self.kept} kept, {self.truncated} truncated to {self.max_len} tokens, "
                f"{self.dropped} dropped (longer than {self.max_len} tokens, or no answer token within them); "
                f"{self.n_tokens} tokens, {self.n_trained} trained")


def encode_conversations(tok, conversations, max_len: int, template: str | None = None,
                         overflow: str = "truncate", train_on_prompt: bool = False) -> SFTExamples:
    """Encode every conversation (see ``encode_conversation``); one longer than ``max_len`` is cut to
    its first ``max_len`` tokens (``overflow="truncate"``) or left out (``"drop"``), and counted."""
    if overflow not in OVERFLOW:
        raise LmzooError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    if max_len < 2:
        raise LmzooError(f"max_len must be at least 2, got {max_len}")
    lacking = missing_tokens(tok, template or tok.chat_template or "")
    if lacking:  # else they would be spelled out as text, and a generated reply could never end
        raise ConfigError(f"chat template {builtin_name(template or tok.chat_template)!r} writes {lacking}, which "
                          f"{tok.name} does not have as special tokens; train the tokenizer with them "
                          "(special_tokens=[...]) or choose another template")
    out = SFTExamples([], [], max_len)
    for k, messages in enumerate(conversations):
        try:
            ids, labels = encode_conversation(tok, messages, template, train_on_prompt=train_on_prompt)
        except LmzooError as e:
            raise LmzooError(f"conversation {k}: {e}") from None
        if not any(y != IGNORE for y in labels):
            raise LmzooError(f"conversation {k}: no token is trained (the template marks no assistant text)")
        long = len(ids) > max_len
        if long and overflow == "truncate":
            ids, labels = ids[:max_len], labels[:max_len]
        if (long and overflow == "drop") or not any(y != IGNORE for y in labels):
            out.dropped += 1
            out.dropped_index.append(k)
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
        if long:
            out.truncated += 1
        else:
            out.kept += 1
    if not out.input_ids:
        raise LmzooError(f"no conversation is left: {out.summary()}")
    return out


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices with total length <= ``capacity``: the longest item first, each into the
    bin with the least room that still holds it (a new bin when none does). Deterministic."""
    room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room[c]: bins with exactly c free
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise LmzooError(f"item {i} has {n} tokens, more than a row of {capacity}")
        c = next((c for c in range(n, capacity + 1) if room[c]), None)
        if c is None:
            bins.append([])
            b, c = len(bins) - 1, capacity
        else:
            b = room[c].pop()
        bins[b].append(i)
        room[c - n].append(b)
    return bins


def _pad_id(tok) -> int:
    for i in (tok.pad_id, tok.eos_id):
        if i is not None:
            return i
    return 0


class PackedConversations:
    """Rows of whole conversations, at most ``seq_len`` tokens each; ``batch(rows)`` gives (B, T)
    ``input_ids``, ``labels`` and ``doc_ids`` (T: the batch's longest row; the rest is padding, a
    document of its own with labels -100)."""

    def __init__(self, examples: SFTExamples, seq_len: int, pad_id: int = 0):
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        self.rows = best_fit_decreasing([len(x) for x in examples.input_ids], seq_len)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, rows) -> dict[str, torch.Tensor]:
        chosen = [self.rows[int(r)] for r in rows]
        T = max(sum(len(self.examples.input_ids[i]) for i in row) for row in chosen)
        ids = torch.full((len(chosen), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(chosen), T), IGNORE, dtype=torch.long)
        docs = torch.zeros((len(chosen), T), dtype=torch.long)
        for b, row in enumerate(chosen):
            t = 0
            for d, i in enumerate(row):
                x, y = self.examples.input_ids[i], self.examples.labels[i]
                ids[b, t:t + len(x)] = torch.tensor(x)
                labels[b, t:t + len(y)] = torch.tensor(y)
                docs[b, t:t + len(x)] = d
                t += len(x)
            docs[b, t:] = len(row)  # the padding: a document nobody else sees
        return {"input_ids": ids, "labels": labels, "doc_ids": docs}


class PaddedConversations:
    """One conversation per row, right-padded to the batch's longest: (B, T) ``input_ids``,
    ``labels`` (-100 on padding) and ``attention_mask`` (1 = real token)."""

    def __init__(self, examples: SFTExamples, pad_id: int = 0):
        self.examples, self.pad_id = examples, pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, rows) -> dict[str, torch.Tensor]:
        chosen = [int(r) for r in rows]
        T = max(len(self.examples.input_ids[i]) for i in chosen)
        ids = torch.full((len(chosen), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(chosen), T), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chosen), T), dtype=torch.long)
        for b, i in enumerate(chosen):
            x, y = self.examples.input_ids[i], self.examples.labels[i]
            ids[b, :len(x)], labels[b, :len(y)], mask[b, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def sft_rows(examples: SFTExamples, seq_len: int, packing: bool = True, pad_id: int = 0):
    """The rows ``Batches`` draws from: packed (default) or padded."""
    return PackedConversations(examples, seq_len, pad_id) if packing else PaddedConversations(examples, pad_id)


def split_conversations(conversations: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, val): a seeded random ``val_fraction`` of the conversations (at least one) held out."""
    if not 0.0 < val_fraction < 1.0:
        raise LmzooError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(conversations) < 2:
        raise LmzooError(f"{len(conversations)} conversation(s) are too few to hold some out for validation")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(val_fraction * len(order))))
    val = set(order[:n_val])
    return ([c for k, c in enumerate(conversations) if k not in val],
            [c for k, c in enumerate(conversations) if k in val])


def sft_batches(tok, conversations, seq_len: int, batch_size: int, *, template: str | None = None,
                packing: bool = True, overflow: str = "truncate", train_on_prompt: bool = False, seed: int = 0,
                shuffle: bool = True, epochs: int | None = None, rank: int = 0, world_size: int = 1,
                drop_last: bool = True) -> tuple[Batches, SFTExamples]:
    """(batches, examples): a resumable ``Batches`` (``state_dict`` / ``load_state_dict``) over the
    conversations encoded with ``template`` and packed into rows of ``seq_len`` (or padded), and the
    ``SFTExamples`` whose ``summary()`` says what was kept, truncated and dropped."""
    examples = encode_conversations(tok, conversations, seq_len, template=template, overflow=overflow,
                                    train_on_prompt=train_on_prompt)
    rows = sft_rows(examples, seq_len, packing=packing, pad_id=_pad_id(tok))
    batches = Batches(rows, batch_size, seed=seed, shuffle=shuffle, epochs=epochs, rank=rank,
                      world_size=world_size, drop_last=drop_last)
    return batches, examples
