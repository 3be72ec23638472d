"""``Tokenizer``: the one type every loader and trainer returns, whatever engine is underneath.

It owns what is the same for every format: the named special tokens (bos, eos, unk, pad, cls,
sep, mask), the ids ``add_special_tokens=True`` puts around a sequence, batching with padding
(right or left) and truncation, the chat template, and saving. The backend (backends.py) only
maps text to ids and back.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmzoo.errors import ConfigError, LmzooError

ROLES = ("bos", "eos", "unk", "pad", "cls", "sep", "mask")


class BatchEncoding(dict):
    """``{"input_ids": ..., "attention_mask": ...}``: lists of lists, or (B, T) tensors."""

    @property
    def input_ids(self):
        return self["input_ids"]

    @property
    def attention_mask(self):
        return self["attention_mask"]


class Tokenizer:
    def __init__(self, backend, roles: dict[str, str] | None = None, prefix=(), suffix=(),
                 chat_template: str | None = None, padding_side: str = "right", name: str | None = None,
                 flavor: str | None = None):
        self.backend, self.name, self.flavor = backend, name or getattr(backend, "source", "tokenizer"), flavor
        self.roles: dict[str, str] = {}
        for role, token in (roles or {}).items():
            self.set_special(role, token)
        self.prefix_ids, self.suffix_ids = [self._id_of(t) for t in prefix], [self._id_of(t) for t in suffix]
        self.chat_template = chat_template
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side

    # -- special tokens -----------------------------------------------------------------
    def _id_of(self, token) -> int:
        if isinstance(token, int):
            return token
        i = self.backend.token_to_id(token)
        if i is None:
            raise ConfigError(f"{self.name}: special token {token!r} is not in the vocabulary")
        return i

    def set_special(self, role: str, token: str | None) -> None:
        """Name a special token, e.g. ``tok.set_special("pad", "<|endoftext|>")`` (None removes it)."""
        if role not in ROLES:
            raise ConfigError(f"unknown special-token role {role!r}; known: {ROLES}")
        if token is None:
            self.roles.pop(role, None)
            return
        self._id_of(token)
        self.roles[role] = token

    def special_id(self, role: str) -> int | None:
        return self._id_of(self.roles[role]) if role in self.roles else None

    bos_id = property(lambda self: self.special_id("bos"))
    eos_id = property(lambda self: self.special_id("eos"))
    unk_id = property(lambda self: self.special_id("unk"))
    pad_id = property(lambda self: self.special_id("pad"))
    cls_id = property(lambda self: self.special_id("cls"))
    sep_id = property(lambda self: self.special_id("sep"))
    mask_id = property(lambda self: self.special_id("mask"))
    bos_token = property(lambda self: self.roles.get("bos"))
    eos_token = property(lambda self: self.roles.get("eos"))
    unk_token = property(lambda self: self.roles.get("unk"))
    pad_token = property(lambda self: self.roles.get("pad"))
    cls_token = property(lambda self: self.roles.get("cls"))
    sep_token = property(lambda self: self.roles.get("sep"))
    mask_token = property(lambda self: self.roles.get("mask"))
    # transformers' names for the same ids (tok.eos_token_id is tok.eos_id)
    bos_token_id, eos_token_id, unk_token_id, pad_token_id = bos_id, eos_id, unk_id, pad_id
    cls_token_id, sep_token_id, mask_token_id = cls_id, sep_id, mask_id

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every special-token string the tokenizer knows (named or not) -> id."""
        return {**self.backend.special_tokens(), **{t: self._id_of(t) for t in self.roles.values()}}

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    # -- one sequence ---------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False, split_special: bool = True) -> list[int]:
        """Ids of ``text``. ``split_special=False`` encodes special-token strings as plain text."""
        if not isinstance(text, str):
            raise LmzooError(f"encode takes a str, got {type(text).__name__}; use encode_batch for lists")
        ids = self.backend.encode(text, split_special)
        return self.prefix_ids + ids + self.suffix_ids if add_special_tokens else ids

    def encode_with_offsets(self, text: str, split_special: bool = True):
        """(ids, [(start, end)] character spans into ``text``), without added special tokens."""
        return self.backend.encode_with_offsets(text, split_special)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens)

    def decode_batch(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in (rows.tolist() if hasattr(rows, "tolist") else rows)]

    # -- batches ------------------------------------------------------------------------
    def encode_batch(self, texts, add_special_tokens: bool = False, padding: bool | str = True,
                     padding_side: str | None = None, truncation: bool = False, max_length: int | None = None,
                     truncation_side: str = "right", pad_to_multiple_of: int | None = None,
                     return_tensors: str | None = None, split_special: bool = True) -> BatchEncoding:
        """Encode many texts; pad (``True``/"longest" or "max_length") on ``padding_side``; truncate
        to ``max_length`` keeping the special tokens. ``return_tensors="pt"`` gives (B, T) tensors."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = self.backend.encode_batch(texts, split_special)
        if truncation:
            if max_length is None:
                raise LmzooError("truncation=True needs max_length")
            room = max_length - (len(self.prefix_ids) + len(self.suffix_ids) if add_special_tokens else 0)
            if room < 0:
                raise LmzooError(f"max_length={max_length} leaves no room after the special tokens")
            if truncation_side not in ("left", "right"):
                raise LmzooError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
            rows = [r[:room] if truncation_side == "right" else r[len(r) - min(room, len(r)):] for r in rows]
        if add_special_tokens:
            rows = [self.prefix_ids + r + self.suffix_ids for r in rows]
        return self.pad(rows, padding=padding, padding_side=padding_side, max_length=max_length,
                        pad_to_multiple_of=pad_to_multiple_of, return_tensors=return_tensors)

    __call__ = encode_batch

    def pad(self, rows, padding: bool | str = True, padding_side: str | None = None, max_length: int | None = None,
            pad_to_multiple_of: int | None = None, return_tensors: str | None = None) -> BatchEncoding:
        """Pad id lists to one length; the attention mask is 1 on real tokens, 0 on padding."""
        rows = [list(r) for r in rows]
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise LmzooError(f"padding_side must be 'left' or 'right', got {side!r}")
        if padding in (True, "longest"):
            target = max((len(r) for r in rows), default=0)
        elif padding == "max_length":
            if max_length is None:
                raise LmzooError("padding='max_length' needs max_length")
            target = max_length
        elif padding in (False, None, "do_not_pad"):
            target = None
        else:
            raise LmzooError(f"padding must be True, 'longest', 'max_length' or False, got {padding!r}")
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        masks = [[1] * len(r) for r in rows]
        if target is not None and any(len(r) < target for r in rows):
            if self.pad_id is None:
                raise LmzooError(f"{self.name} has no pad token; name one with tok.set_special('pad', ...) "
                                 f"(e.g. the EOS token {self.eos_token!r}) or pass padding=False")
            for k, r in enumerate(rows):
                n = target - len(r)
                if n > 0:
                    rows[k] = [self.pad_id] * n + r if side == "left" else r + [self.pad_id] * n
                    masks[k] = [0] * n + masks[k] if side == "left" else masks[k] + [0] * n
        out = BatchEncoding(input_ids=rows, attention_mask=masks)
        if return_tensors == "pt":
            import torch

            if len({len(r) for r in rows}) > 1:
                raise LmzooError("return_tensors='pt' needs rows of one length: pass padding=True")
            out = BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in out.items()})
        elif return_tensors is not None:
            raise LmzooError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        return out

    # -- chat -----------------------------------------------------------------------------
    def render_chat(self, messages, add_generation_prompt: bool = False, template: str | None = None, **kwargs):
        """(text, assistant character spans) of the conversation under the chat template."""
        from lmzoo.tokenizers.chat import render

        return render(self, messages, add_generation_prompt=add_generation_prompt, template=template, **kwargs)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, template: str | None = None,
                            **kwargs):
        """Render and encode a conversation: ``.ids``, ``.assistant_mask`` (1 on tokens the assistant
        wrote, the SFT loss mask), ``.text``. ``template`` is a built-in name or a Jinja string."""
        from lmzoo.tokenizers.chat import apply_chat_template

        return apply_chat_template(self, messages, add_generation_prompt=add_generation_prompt, template=template,
                                   **kwargs)

    # -- saving -----------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """Write the vocabulary file(s) and a tokenizer_config.json; ``lmzoo.load_tokenizer`` reads it
        back, and transformers' AutoTokenizer reads the tokenizer.json ones."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = self.backend.save(directory)
        config = {f"{role}_token": tok for role, tok in self.roles.items()}
        config.update(padding_side=self.padding_side, lmzoo_backend=self.backend.kind, lmzoo_files=files)
        config.update(getattr(self.backend, "config", dict)())
        if self.backend.kind == "tokenizers":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if self.flavor:
            config["lmzoo_flavor"] = self.flavor
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
        return directory

    def __repr__(self) -> str:
        named = ", ".join(f"{r}={t!r}" for r, t in self.roles.items())
        return f"Tokenizer({self.backend.kind}, vocab_size={self.vocab_size}, {named})"
