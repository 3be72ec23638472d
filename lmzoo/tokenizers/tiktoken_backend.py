"""tiktoken rank files (``*.tiktoken``: one "base64(token bytes) rank" per line), read by tiktoken.

A rank file holds only the byte-level BPE ranks. The pre-tokenizer regex, the special tokens and
any text normalisation belong to the model and live in a flavor:

- ``qwen`` (Qwen-7B/14B/72B ``qwen.tiktoken``, 151,643 ranks): Qwen's regex (digits one at a
  time, unlike cl100k's runs of up to three), NFC-normalised input, and 208 specials numbered
  after the ranks: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645,
  <|extra_0|> ... <|extra_204|>.
- ``cl100k_base``: OpenAI's GPT-3.5/4 encoding.

Any other rank file needs ``pattern=`` (and usually ``special_tokens=``) from its model.
"""

from __future__ import annotations

import base64
import binascii
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from lmzoo.errors import ConfigError
from lmzoo.tokenizers.backends import Backend, fill_empty_offsets, specials_pattern


@dataclass(frozen=True)
class TiktokenFlavor:
    name: str
    pattern: str
    specials: tuple = ()                 # numbered from the first id after the ranks, in this order
    fixed_specials: dict = field(default_factory=dict)  # or with explicit ids
    nfc: bool = False
    roles: dict = field(default_factory=dict)
    chat_template: str | None = None
    n_ranks: int | None = None           # recognise the file by its size


QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

FLAVORS = {f.name: f for f in [
    TiktokenFlavor("qwen", QWEN_PATTERN,
                   specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205)),
                   nfc=True, roles=dict(eos="<|endoftext|>", pad="<|endoftext|>"), chat_template="chatml",
                   n_ranks=151643),
    TiktokenFlavor("cl100k_base", CL100K_PATTERN,
                   fixed_specials={"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                                   "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
                   roles=dict(eos="<|endoftext|>"), n_ranks=100256),
]}


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    # bytes.splitlines splits at \n, \r\n and \r only (str.splitlines would add U+2028 and the like), as
    # tiktoken's load_tiktoken_bpe reads; a token's own bytes are base64, so never split
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise ConfigError(f"{path}:{n}: expected 'base64-token rank', got {line[:60]!r}") from e
    if not ranks:
        raise ConfigError(f"{path}: holds no ranks (expected lines of 'base64-token rank')")
    return ranks


def guess_flavor(path: Path, n_ranks: int) -> str | None:
    stem = Path(path).stem.lower()
    for f in FLAVORS.values():
        if f.name in stem or f.n_ranks == n_ranks:
            return f.name
    return None


class TiktokenBackend(Backend):
    kind = "tiktoken"

    def __init__(self, ranks: dict[bytes, int], flavor: TiktokenFlavor, source: str = "<memory>"):
        import tiktoken

        self.flavor, self.source = flavor, source
        specials = {s: len(ranks) + k for k, s in enumerate(flavor.specials)}
        specials.update(flavor.fixed_specials)
        try:
            self.enc = tiktoken.Encoding(flavor.name, pat_str=flavor.pattern, mergeable_ranks=ranks,
                                         special_tokens=specials)
        except ValueError as e:
            raise ConfigError(f"{source}: tiktoken refused the ranks with flavor '{flavor.name}': {e}") from e
        self._specials, self._allowed = specials, frozenset(specials)
        self._special_ids = {i: s for s, i in specials.items()}
        self._pattern = specials_pattern(specials)

    @classmethod
    def from_file(cls, path: Path, flavor: str | None = None, pattern: str | None = None,
                  special_tokens: dict[str, int] | None = None) -> "TiktokenBackend":
        ranks = read_ranks(path)
        if pattern is not None:
            f = TiktokenFlavor(flavor or Path(path).stem, pattern, fixed_specials=dict(special_tokens or {}))
        else:
            name = flavor or guess_flavor(path, len(ranks))
            if name not in FLAVORS:
                raise ConfigError(f"{path}: a tiktoken file does not say its pre-tokenizer regex; pass flavor= "
                                  f"(known: {sorted(FLAVORS)}) or pattern= and special_tokens= from the model")
            f = FLAVORS[name]
        return cls(ranks, f, str(path))

    def _norm(self, text):
        return unicodedata.normalize("NFC", text) if self.flavor.nfc else text

    prepare = _norm

    def encode(self, text, split_special=True):
        text = self._norm(text)
        # tiktoken's special-aware path copies the set of specials on every call (Qwen has 208):
        # take it only when the text holds one
        if split_special and self._pattern is not None and self._pattern.search(text):
            return self.enc.encode(text, allowed_special=self._allowed)
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts, split_special=True):
        # a plain loop: tiktoken's thread pool costs more than it saves on short lines (measured 6x slower
        # on the 40k lines of tinyshakespeare with 2 cores)
        return [self.encode(t, split_special) for t in texts]

    def encode_with_offsets(self, text, split_special=True):
        norm = self._norm(text)
        if len(norm) != len(text):
            raise ConfigError(f"{self.source}: NFC normalisation changed the length of the text, so token offsets "
                              "cannot be mapped back; normalise the text (unicodedata.normalize('NFC', ...)) first")
        ids = self.encode(norm, split_special)
        _, starts = self.enc.decode_with_offsets(ids)
        ends = starts[1:] + [len(norm)]
        return ids, fill_empty_offsets([(s, max(s, e)) for s, e in zip(starts, ends)])

    def decode(self, ids, skip_special_tokens=False):
        ids = self.check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self.enc.decode(ids, errors="replace")

    @property
    def vocab_size(self):
        return self.enc.n_vocab

    def token_to_id(self, token):
        if token in self._specials:
            return self._specials[token]
        try:
            return self.enc.encode_single_token(token.encode())
        except KeyError:
            return None

    def id_to_token(self, i):
        i = int(i)
        if i in self._special_ids:
            return self._special_ids[i]
        try:
            return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="backslashreplace")
        except KeyError:
            return None

    def special_tokens(self):
        return dict(self._specials)

    def fallback_ids(self):
        return set()  # byte-level: every byte is an ordinary token, nothing is unknown

    def default_roles(self):
        return dict(self.flavor.roles)

    def save(self, directory):
        name = Path(self.source).name if self.source != "<memory>" else f"{self.flavor.name}.tiktoken"
        ranks = sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        (Path(directory) / name).write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks))
        return [name]
