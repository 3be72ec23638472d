"""SentencePiece ``.model`` files, read by the sentencepiece library itself (the faithful reader).

Why not convert to ``tokenizers``: transformers' converted LLaMA tokenizer splits runs of spaces
differently from sentencepiece ("Hello  world": [15043, 259, 11526] against sentencepiece's
[15043, 29871, 3186]), so the ids would not be the reference ids.

Flavors describe what a model family puts on top of its ``.model`` file:

- ``sentencepiece`` (LLaMA, T5, any plain file): the file's own pieces; ``add_special_tokens``
  prepends BOS when the file has one (LLaMA) and otherwise appends EOS (T5).
- ``chatglm-6b`` (``ice_text.model``): THUDM's first release appends 8 control tokens, a tab and
  79 blank-run tokens and 256 byte pieces to the 130,000 text pieces, turns "\\n", "\\t" and runs
  of 2-80 spaces into those pieces before encoding, and shifts every id by 20,000 image tokens
  (ids 0-19,999 are image tokens; "你好" is sentencepiece id 74,874 and model id 94,874; vocab
  150,344, embedding 150,528). The later release (the checkpoints with a 130,528-row embedding,
  lmzoo's ``chatglm`` family) ships the 344 pieces inside its file and has no shift: lmzoo
  notices the built-in pieces, and ``image_tokens=0`` gives the later ids from the first file.
- ``chatglm2`` / ``chatglm3``: five (ChatGLM2) or nine (ChatGLM3: + the role tokens) specials
  numbered after the 64,789 pieces. lmzoo writes "sop"/"eop" as "<sop>"/"<eop>" so that the
  word "sop" in text is never taken for a special (GLM-4 spells them this way too).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from lmzoo.errors import ConfigError
from lmzoo.tokenizers.backends import Backend, fill_empty_offsets, specials_pattern, split_on_specials

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type


@dataclass(frozen=True)
class SentencePieceFlavor:
    name: str
    added_pieces: tuple = ()          # (piece, type) appended to the model before loading
    image_tokens: int = 0             # every sentencepiece id is shifted by this many ids
    extra_specials: tuple = ()        # specials numbered after the model's pieces (not in the .model)
    whitespace_pieces: bool = False   # ChatGLM-6B: "\n" -> <n>, "\t" -> <|tab|>, 2-80 spaces -> <|blank_n|>
    prefix: tuple | None = None       # special strings added by add_special_tokens (None: BOS, else EOS)
    suffix: tuple | None = None
    roles: dict = field(default_factory=dict)  # bos/eos/unk/pad/mask... -> string (default: the file's)
    chat_template: str | None = None  # a built-in template name


_GLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")
_GLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
_BLANKS = tuple(f"<|blank_{n}|>" for n in range(2, 81))

FLAVORS = {f.name: f for f in [
    SentencePieceFlavor("sentencepiece"),
    SentencePieceFlavor(
        "chatglm-6b",
        added_pieces=tuple((s, CONTROL) for s in ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>",
                                                  "<ENC>", "<dBLOCK>"))
        + tuple((s, USER_DEFINED) for s in ("<|tab|>",) + _BLANKS)
        + tuple((f"<0x{b:02X}>", BYTE) for b in range(256)),
        image_tokens=20000, whitespace_pieces=True, prefix=(), suffix=("[gMASK]", "<sop>"),
        roles=dict(bos="<sop>", eos="<eop>", unk="<unk>", pad="<pad>", mask="[MASK]")),
    SentencePieceFlavor("chatglm2", extra_specials=_GLM_SPECIALS, prefix=("[gMASK]", "<sop>"), suffix=(),
                        roles=dict(eos="</s>", unk="<unk>", pad="<unk>", mask="[MASK]"), chat_template="chatglm2"),
    SentencePieceFlavor("chatglm3", extra_specials=_GLM_SPECIALS + _GLM3_ROLES, prefix=("[gMASK]", "<sop>"),
                        suffix=(), roles=dict(eos="</s>", unk="<unk>", pad="<unk>", mask="[MASK]"),
                        chat_template="chatglm3"),
]}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited protobuf field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def append_pieces(model: bytes, pieces, byte_fallback: bool = False) -> bytes:
    """Append pieces to a serialized ModelProto without protobuf: repeated fields concatenate and a
    repeated embedded message (trainer_spec) merges, so appended bytes extend the parsed model."""
    out = bytearray(model)
    for piece, kind in pieces:
        sp = _field(1, piece.encode()) + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + _varint(kind)
        out += _field(1, sp)  # ModelProto.pieces = 1
    if byte_fallback:
        out += _field(2, _varint(35 << 3 | 0) + b"\x01")  # ModelProto.trainer_spec = 2, .byte_fallback = 35
    return bytes(out)


_WS = re.compile(r"\n|\t| {2,80}")


def _encode_whitespace(text: str) -> tuple[str, list[int]]:
    """ChatGLM-6B's preprocessing, with a map from each output character to its input character."""
    out, where, pos = [], [], 0
    for m in _WS.finditer(text):
        out.append(text[pos:m.start()])
        where.extend(range(pos, m.start()))
        s = m.group()
        rep = "<n>" if s == "\n" else "<|tab|>" if s == "\t" else f"<|blank_{len(s)}|>"
        out.append(rep)
        where.extend([m.start()] * (len(rep) - 1) + [m.end() - 1])
        pos = m.end()
    out.append(text[pos:])
    where.extend(range(pos, len(text)))
    return "".join(out), where


def _decode_whitespace(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    return re.sub(r"<\|blank_(\d+)\|>", lambda m: " " * int(m.group(1)), text)


class SentencePieceBackend(Backend):
    kind = "sentencepiece"

    def __init__(self, model_bytes: bytes, flavor: SentencePieceFlavor, source: str = "<memory>",
                 image_tokens: int | None = None):
        import sentencepiece as spm

        self.flavor, self.source, self.original = flavor, source, model_bytes
        # the later ChatGLM-6B release ships these pieces inside the file (130,344 pieces, no image tokens)
        built_in = bool(flavor.added_pieces) and all(p.encode() in model_bytes for p in ("[gMASK]", "<|blank_80|>"))
        if flavor.added_pieces and not built_in:
            model_bytes = append_pieces(model_bytes, flavor.added_pieces,
                                        byte_fallback=any(k == BYTE for _, k in flavor.added_pieces))
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own wording
            raise ConfigError(f"{source}: not a SentencePiece model that sentencepiece can read ({e})") from e
        self.offset = (0 if built_in else flavor.image_tokens) if image_tokens is None else int(image_tokens)
        self.n_pieces = self.sp.get_piece_size()
        self.extra = {s: self.offset + self.n_pieces + k for k, s in enumerate(flavor.extra_specials)}
        own = {self.sp.id_to_piece(i): i + self.offset for i in range(self.n_pieces)
               if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._specials = {**own, **self.extra}
        self._pattern = specials_pattern(self._specials)
        self._special_ids = {i: s for s, i in self._specials.items()}

    @classmethod
    def from_file(cls, path: Path, flavor: str = "sentencepiece", **options) -> "SentencePieceBackend":
        if flavor not in FLAVORS:
            raise ConfigError(f"{path}: unknown SentencePiece flavor '{flavor}'; known: {sorted(FLAVORS)}")
        return cls(Path(path).read_bytes(), FLAVORS[flavor], str(path), **options)

    # -- encoding -------------------------------------------------------------------------
    def _segments(self, text, split_special):
        return split_on_specials(text, self._pattern if split_special else None)

    def _sp_encode(self, text: str) -> list[int]:
        if self.flavor.whitespace_pieces:
            text = _encode_whitespace(text)[0]
        return [i + self.offset for i in self.sp.encode(text)]

    def encode(self, text, split_special=True):
        ids = []
        for s, e, special in self._segments(text, split_special):
            ids.extend([self._specials[text[s:e]]] if special else self._sp_encode(text[s:e]))
        return ids

    def encode_batch(self, texts, split_special=True):
        texts = list(texts)
        if self.flavor.whitespace_pieces:
            return [self.encode(t, split_special) for t in texts]
        out = [[i + self.offset for i in row] for row in self.sp.encode(texts)]  # sentencepiece's threads
        if split_special and self._pattern is not None:  # redo the few texts that hold a special token
            for k, t in enumerate(texts):
                if self._pattern.search(t):
                    out[k] = self.encode(t, split_special)
        return out

    def encode_with_offsets(self, text, split_special=True):
        ids, offsets = [], []
        for s, e, special in self._segments(text, split_special):
            if special:
                ids.append(self._specials[text[s:e]])
                offsets.append((s, e))
                continue
            seg, where = text[s:e], None
            if self.flavor.whitespace_pieces:
                seg, where = _encode_whitespace(seg)
            out = self.sp.encode(seg, return_type="offset_mapping")
            for i, (a, b) in zip(out["ids"], fill_empty_offsets(out["offsets"])):
                if where is not None:  # back to the caller's characters
                    a, b = (where[a], where[b - 1] + 1) if b > a else (where[min(a, len(where) - 1)],) * 2
                ids.append(i + self.offset)
                offsets.append((s + a, s + b))
        return ids, offsets

    def decode(self, ids, skip_special_tokens=False):
        parts, run = [], []

        def flush():
            if run:
                text = self.sp.decode(run)
                parts.append(_decode_whitespace(text) if self.flavor.whitespace_pieces else text)
                run.clear()

        for i in self.check_ids(ids):
            if i in self._special_ids:
                flush()
                if not skip_special_tokens:
                    parts.append(self._special_ids[i])
            elif i >= self.offset:
                run.append(i - self.offset)
            # ids below the offset are image tokens: they have no text (as in THUDM's decode)
        flush()
        return "".join(parts)

    # -- vocabulary -----------------------------------------------------------------------
    @property
    def vocab_size(self):
        return self.offset + self.n_pieces + len(self.extra)

    def token_to_id(self, token):
        if token in self._specials:
            return self._specials[token]
        i = self.sp.piece_to_id(token)
        return i + self.offset if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, i):
        i = int(i)
        if i in self._special_ids:
            return self._special_ids[i]
        if self.offset <= i < self.offset + self.n_pieces:
            return self.sp.id_to_piece(i - self.offset)
        return f"<image_{i}>" if 0 <= i < self.offset else None

    def special_tokens(self):
        return dict(self._specials)

    def fallback_ids(self):
        return {i + self.offset for i in range(self.n_pieces) if self.sp.is_unknown(i) or self.sp.is_byte(i)}

    def default_roles(self) -> dict[str, str]:
        roles = {}
        for role, i in (("unk", self.sp.unk_id()), ("bos", self.sp.bos_id()), ("eos", self.sp.eos_id()),
                        ("pad", self.sp.pad_id())):
            if 0 <= i < self.n_pieces:
                roles[role] = self.sp.id_to_piece(i)
        return {**roles, **self.flavor.roles}

    def template(self, roles: dict[str, str]) -> tuple[tuple, tuple]:
        """(prefix, suffix) special strings for ``add_special_tokens=True``."""
        if self.flavor.prefix is not None or self.flavor.suffix is not None:
            return tuple(self.flavor.prefix or ()), tuple(self.flavor.suffix or ())
        if "bos" in roles:
            return (roles["bos"],), ()
        return (), ((roles["eos"],) if "eos" in roles else ())

    def config(self) -> dict:
        """What tokenizer_config.json must record to load this back the same way."""
        return {"num_image_tokens": self.offset} if self.flavor.image_tokens else {}

    def save(self, directory):
        name = Path(self.source).name if self.source != "<memory>" else "tokenizer.model"
        (Path(directory) / name).write_bytes(self.original)  # as read: flavors re-apply their additions
        return [name]
