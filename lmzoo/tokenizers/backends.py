"""The engines behind ``lmzoo.tokenizers.Tokenizer``: one small interface, three implementations.

- ``TokenizersBackend``: Hugging Face ``tokenizers`` (tokenizer.json, BERT vocab.txt, GPT-2
  vocab.json+merges.txt and everything lmzoo trains). The default engine.
- ``SentencePieceBackend`` (sentencepiece_backend.py): ``.model`` files, read by sentencepiece itself.
- ``TiktokenBackend`` (tiktoken_backend.py): tiktoken rank files, read by tiktoken itself.

A backend only turns text into ids and back. It never adds BOS/EOS (the ``Tokenizer`` does that
from its prefix/suffix ids, the same way for every backend), never pads and never truncates.
``split_special=True`` means that special-token strings found in the text ("<|im_end|>", "</s>")
become their ids, as transformers and Qwen's tiktoken reader do; ``False`` encodes them as text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmzoo.errors import ConfigError, LmzooError

Offsets = list[tuple[int, int]]


class Backend:
    """What every engine provides. Ids are ints in ``[0, vocab_size)``; offsets are character spans."""

    kind = "abstract"

    def encode(self, text: str, split_special: bool = True) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str], split_special: bool = True) -> list[list[int]]:
        return [self.encode(t, split_special) for t in texts]

    def encode_with_offsets(self, text: str, split_special: bool = True) -> tuple[list[int], Offsets]:
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, i: int) -> str | None:
        raise NotImplementedError

    def special_tokens(self) -> dict[str, int]:
        """Special-token strings this backend recognises in text (with ``split_special``)."""
        raise NotImplementedError

    def fallback_ids(self) -> set[int]:
        """Ids that mean "the vocabulary had no piece for this": unknown and byte-fallback tokens."""
        raise NotImplementedError

    def prepare(self, text: str) -> str:
        """A normalisation the backend applies before encoding and that may change lengths (Qwen's NFC);
        chat rendering applies it to messages first so that character spans stay valid."""
        return text

    def save(self, directory: Path) -> list[str]:
        raise NotImplementedError

    def check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise LmzooError(f"token ids {bad[:5]} are outside the vocabulary of {self.vocab_size}")
        return ids


def split_on_specials(text: str, pattern: re.Pattern | None):
    """Yield (start, end, is_special) spans covering ``text``; specials matched longest first."""
    pos = 0
    if pattern is not None:
        for m in pattern.finditer(text):
            if m.start() > pos:
                yield pos, m.start(), False
            yield m.start(), m.end(), True
            pos = m.end()
    if pos < len(text):
        yield pos, len(text), False


def specials_pattern(strings) -> re.Pattern | None:
    strings = sorted({s for s in strings if s}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, strings))) if strings else None


def fill_empty_offsets(offsets: Offsets) -> Offsets:
    """Byte pieces of one character come back as empty spans followed by the character's span;
    give each the span of the character it belongs to, so a span test covers all of its bytes."""
    out = list(offsets)
    for k in range(len(out) - 2, -1, -1):
        s, e = out[k]
        if s == e and out[k + 1][0] == s:
            out[k] = out[k + 1]
    return out


class TokenizersBackend(Backend):
    """Hugging Face ``tokenizers.Tokenizer``; its added tokens marked special are the specials."""

    kind = "tokenizers"

    def __init__(self, tok, source: str = "<memory>"):
        # A tokenizer.json may carry its own padding/truncation (MiniLM's pads every text to 128);
        # the Tokenizer pads and truncates itself, so the engine must do neither (as transformers does).
        tok.no_padding()
        tok.no_truncation()
        self.tok, self.source = tok, source
        self._specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_file(cls, path: Path) -> "TokenizersBackend":
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)), str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON or unknown components
            raise ConfigError(f"{path}: not a tokenizer.json that the tokenizers library can read ({e})") from e

    def _call(self, fn, arg, split_special: bool):
        if split_special or not self._specials:
            return fn(arg, add_special_tokens=False)
        self.tok.encode_special_tokens = True  # i.e. treat special strings as plain text
        try:
            return fn(arg, add_special_tokens=False)
        finally:
            self.tok.encode_special_tokens = False

    def encode(self, text, split_special=True):
        return self._call(self.tok.encode, text, split_special).ids

    def encode_batch(self, texts, split_special=True):
        return [e.ids for e in self._call(self.tok.encode_batch, list(texts), split_special)]

    def encode_with_offsets(self, text, split_special=True):
        enc = self._call(self.tok.encode, text, split_special)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(self.check_ids(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    def id_to_token(self, i):
        return self.tok.id_to_token(int(i))

    def special_tokens(self):
        return dict(self._specials)

    def fallback_ids(self):
        model = json.loads(self.tok.to_str())["model"]
        out = set()
        unk = model.get("unk_token")
        if isinstance(unk, str) and self.tok.token_to_id(unk) is not None:
            out.add(self.tok.token_to_id(unk))
        if isinstance(model.get("unk_id"), int):  # Unigram
            out.add(model["unk_id"])
        if model.get("byte_fallback"):
            out |= {i for i in (self.tok.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None}
        return out

    def post_processor_template(self) -> tuple[list[int], list[int]]:
        """(prefix ids, suffix ids) that the tokenizer.json post-processor adds around one sequence."""
        cfg = json.loads(self.tok.to_str()).get("post_processor")
        return _template_ids(cfg, self.source)

    def save(self, directory):
        path = Path(directory) / "tokenizer.json"
        self.tok.save(str(path))
        return [path.name]


def _template_ids(cfg, source) -> tuple[list[int], list[int]]:
    if cfg is None:
        return [], []
    kind = cfg.get("type")
    if kind == "ByteLevel":
        return [], []
    if kind in ("BertProcessing", "RobertaProcessing"):
        return [cfg["cls"][1]], [cfg["sep"][1]]
    if kind == "Sequence":
        pre, suf = [], []
        for sub in cfg["processors"]:
            p, s = _template_ids(sub, source)
            pre, suf = pre + p, s + suf
        return pre, suf
    if kind == "TemplateProcessing":
        pre, suf, seen_a = [], [], False
        for item in cfg["single"]:
            if "Sequence" in item:
                seen_a = True
                continue
            ids = cfg["special_tokens"][item["SpecialToken"]["id"]]["ids"]
            (suf if seen_a else pre).extend(ids)
        return pre, suf
    raise ConfigError(f"{source}: post_processor type '{kind}' is not supported "
                      "(expected TemplateProcessing, BertProcessing, RobertaProcessing, ByteLevel or Sequence)")
