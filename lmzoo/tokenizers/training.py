"""Train the four classic tokenizers; every one ends as a ``tokenizers`` pipeline (a tokenizer.json).

| kind | style | model | specials (ids from 0) | unknown text |
|---|---|---|---|---|
| ``bpe`` | GPT-2 | byte-level BPE | <|endoftext|> | impossible: 256 byte symbols |
| ``wordpiece`` | BERT | WordPiece, "##" continuations | [PAD] [UNK] [CLS] [SEP] [MASK] | [UNK] |
| ``unigram`` | T5 / SentencePiece | Unigram LM, NFKC, "▁" for spaces | <pad> </s> <unk>, then <extra_id_N> last | <unk> |
| ``sp-bpe`` | LLaMA / SentencePiece | BPE over "▁"-words, byte fallback | <unk> <s> </s>, <0x00>..<0xFF> | impossible: bytes |

Training is deterministic: the same texts and settings give the same tokenizer.json, byte for
byte. Two library quirks are worked around for that (and are why this file is not a thin call):

- ``tokenizers``' WordPiece trainer numbers its "##" symbols in hash-map order, which changes
  merge tie-breaks from run to run (huggingface/tokenizers#1794). lmzoo trains plain BPE on words
  whose non-initial characters are swapped for private-use characters (a "##x" with a character
  of its own, numbered in sorted order) and maps the result back to "##" pieces.
- ``tokenizers``' Unigram trainer sums scores in hash-map order (ids and scores drift between
  runs), and its ``limit_alphabet`` breaks ties the same way. Unigram is trained with
  sentencepiece's trainer (SentencePiece *is* the T5 recipe) and loaded into ``tokenizers``;
  character coverage is applied by dropping the rarest characters before training.

Rare characters: ``character_coverage`` keeps the most frequent characters that make up that
share of the text (SentencePiece's rule). Dropped ones become bytes (``sp-bpe``) or unknown.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from lmzoo.errors import LmzooError
from lmzoo.tokenizers.tokenizer import Tokenizer

SP_THREADS = 4  # fixed, so that sentencepiece's EM sums in the same order on every machine


@dataclass(frozen=True)
class Recipe:
    specials: tuple
    roles: dict
    coverage: float
    build: Callable  # (texts, vocab_size, specials, opts) -> tokenizers.Tokenizer


def _rare_chars(texts: list[str], coverage: float) -> set[str]:
    if coverage >= 1.0:
        return set()
    counts = Counter()
    for t in texts:
        counts.update(t)
    total, kept, rare = sum(counts.values()), 0, set()
    for ch, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if kept >= coverage * total and not ch.isspace():
            rare.add(ch)
        else:
            kept += n
    return rare


def _drop(texts: list[str], rare: set[str]) -> list[str]:
    if not rare:
        return texts
    table = {ord(c): None for c in rare}
    return [t.translate(table) for t in texts]


def _added(tok, specials):
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])


def _byte_bpe(texts, vocab_size, specials, opts):
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, processors, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=opts["min_frequency"], special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def _sp_bpe(texts, vocab_size, specials, opts):
    import json

    from tokenizers import Regex, Tokenizer as HF, decoders, models, pre_tokenizers, processors, trainers

    # SentencePiece's word rule ("▁" starts a word), plus what its script split and split_digits do
    # for LLaMA: punctuation runs and single digits are words of their own ("be," is "▁be" ",")
    meta = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Split(Regex(r"▁?[\p{P}\p{S}&&[^▁]]+|\p{N}"), behavior="isolated")])
    tok = HF(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer, tok.pre_tokenizer = _dummy_prefix(), meta
    texts = _drop(texts, _rare_chars(texts, opts["coverage"]))
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size - 256, min_frequency=opts["min_frequency"], special_tokens=list(specials),
        show_progress=False))
    trained = json.loads(tok.to_str())["model"]
    # LLaMA's layout: specials, then the 256 byte pieces, then the learned pieces (ids shift by 256)
    order = sorted(trained["vocab"], key=trained["vocab"].get)
    n = len(specials)
    pieces = order[:n] + [f"<0x{b:02X}>" for b in range(256)] + [p for p in order[n:] if not _is_byte(p)]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    out = HF(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>", byte_fallback=True,
                        fuse_unk=True))
    out.normalizer, out.pre_tokenizer = _dummy_prefix(), meta
    out.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    _added(out, specials)
    out.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", pieces.index("<s>"))])
    return out


def _dummy_prefix(*first):
    """SentencePiece's add_dummy_prefix: "▁" before every text (tokenizers' Metaspace skips it when
    the text already starts with a space, which would lose that space), spaces as "▁"."""
    from tokenizers import normalizers

    return normalizers.Sequence([*first, normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])


def _is_byte(p: str) -> bool:
    return len(p) == 6 and p.startswith("<0x") and p.endswith(">")


def _wordpiece(texts, vocab_size, specials, opts):
    from tokenizers import Tokenizer as HF, decoders, models, normalizers, pre_tokenizers, processors, trainers

    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                      lowercase=opts["lowercase"])
    pre = pre_tokenizers.BertPreTokenizer()
    words = [[w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))] for t in texts]
    rare = _rare_chars([" ".join(ws) for ws in words], opts["coverage"])
    inner = sorted({c for ws in words for w in ws for c in w[1:]} - rare)
    used = {c for ws in words for w in ws for c in w}
    free = (chr(c) for c in list(range(0xF0000, 0xFFFFE)) + list(range(0x100000, 0x10FFFE)) if chr(c) not in used)
    to_pua = {c: next(free) for c in inner}  # "##c" gets a character of its own
    table = {ord(c): p for c, p in to_pua.items()} | {ord(c): None for c in rare}
    drop = {ord(c): None for c in rare}
    mapped = [" ".join(w[0].translate(drop) + w[1:].translate(table) for w in ws) for ws in words]
    bpe = HF(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(mapped, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=opts["min_frequency"],
                                                        special_tokens=list(specials), show_progress=False))
    back = {p: c for c, p in to_pua.items()}
    vocab = {}
    for piece, i in sorted(bpe.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1]):
        text = "".join(back.get(c, c) for c in piece)
        vocab[("##" + text) if piece[0] in back and piece not in specials else text] = i
    tok = HF(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.decoder = decoders.WordPiece(prefix="##")
    _added(tok, specials)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tok


def _unigram(texts, vocab_size, specials, opts):
    import sentencepiece as spm
    from tokenizers import Tokenizer as HF, decoders, models, normalizers, pre_tokenizers, processors

    nfkc = normalizers.NFKC()
    lines = [ln for t in texts for ln in nfkc.normalize_str(t).split("\n") if ln.strip()]
    lines = [ln[k:k + 4000] for ln in lines for k in range(0, len(ln), 4000)]  # sentencepiece skips long lines
    extra = [s for s in specials if s not in ("<pad>", "</s>", "<unk>")]
    n_sentinels = opts["sentinels"]
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, model_type="unigram",
            vocab_size=vocab_size - n_sentinels - len(extra), character_coverage=opts["coverage"],
            normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, num_threads=SP_THREADS,
            max_sentence_length=1 << 16, minloglevel=2)
    except RuntimeError as e:
        raise LmzooError(f"sentencepiece could not train a {vocab_size}-piece Unigram model: {e}") from e
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = HF(models.Unigram(pieces, unk_id=sp.unk_id(), byte_fallback=False))
    tok.normalizer = _dummy_prefix(nfkc)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    _added(tok, ["<pad>", "</s>", "<unk>"] + extra + [f"<extra_id_{k}>" for k in reversed(range(n_sentinels))])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", sp.eos_id())])
    return tok


RECIPES = {
    "bpe": Recipe(("<|endoftext|>",), dict(bos="<|endoftext|>", eos="<|endoftext|>"), 1.0, _byte_bpe),
    "wordpiece": Recipe(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
                        dict(pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]"), 1.0, _wordpiece),
    "unigram": Recipe(("<pad>", "</s>", "<unk>"), dict(pad="<pad>", eos="</s>", unk="<unk>"), 0.9995, _unigram),
    "sp-bpe": Recipe(("<unk>", "<s>", "</s>"), dict(unk="<unk>", bos="<s>", eos="</s>"), 0.9995, _sp_bpe),
}


def _gather(texts: Iterable[str] | None, files) -> list[str]:
    from lmzoo.tokenizers.texts import read_texts

    if (texts is None) == (files is None):
        raise LmzooError("train_tokenizer needs exactly one of texts= (an iterable of str) or files= (paths)")
    if files is not None:
        files = [files] if isinstance(files, (str, Path)) else list(files)
        out = [t for f in files for t in read_texts(f)]
        where = ", ".join(map(str, files))
    else:
        out = [t for t in texts if isinstance(t, str)]
        where = "texts="
    if not any(t.strip() for t in out):
        raise LmzooError(f"the training corpus is empty ({where} holds no text)")
    return out


def train_tokenizer(kind: str, texts: Iterable[str] | None = None, files=None, vocab_size: int = 8000,
                    special_tokens: Iterable[str] = (), min_frequency: int = 2,
                    character_coverage: float | None = None, lowercase: bool = False, sentinels: int = 100,
                    chat_template: str | None = None) -> Tokenizer:
    """Train a ``kind`` tokenizer (``bpe``, ``wordpiece``, ``unigram``, ``sp-bpe``) on ``texts`` or
    ``files`` (.txt lines, .json/.jsonl strings). ``vocab_size`` counts every token, specials and
    sentinels included; ``special_tokens`` are added to the kind's own (e.g. "<|im_start|>")."""
    from lmzoo.tokenizers.backends import TokenizersBackend
    from lmzoo.tokenizers.chat import resolve_template

    if kind not in RECIPES:
        raise LmzooError(f"unknown tokenizer kind {kind!r}; known: {sorted(RECIPES)}")
    recipe = RECIPES[kind]
    data = _gather(texts, files)
    specials = list(dict.fromkeys(list(recipe.specials) + list(special_tokens)))
    floor = len(specials) + (256 if kind == "sp-bpe" else 0) + (sentinels if kind == "unigram" else 0)
    if vocab_size <= floor:
        raise LmzooError(f"vocab_size={vocab_size} leaves no room for learned pieces ({floor} are reserved)")
    coverage = recipe.coverage if character_coverage is None else float(character_coverage)
    if not 0.0 < coverage <= 1.0:
        raise LmzooError(f"character_coverage must be in (0, 1], got {coverage}")
    opts = dict(min_frequency=min_frequency, coverage=coverage, lowercase=lowercase, sentinels=sentinels)
    backend = TokenizersBackend(recipe.build(data, vocab_size, specials, opts), f"<trained {kind}>")
    prefix, suffix = backend.post_processor_template()
    return Tokenizer(backend, roles=recipe.roles, prefix=prefix, suffix=suffix,
                     chat_template=resolve_template(chat_template) if chat_template else None, name=f"trained-{kind}")
