"""The classic vocabulary files, rebuilt as ``tokenizers`` pipelines (the same ones transformers builds).

- BERT ``vocab.txt`` (one WordPiece per line, id = line number): BERT normaliser (clean control
  characters, a space around every CJK character, optional lowercasing), split on whitespace and
  punctuation, greedy longest-match WordPiece with "##" continuations, ``[CLS] x [SEP]``.
- GPT-2 ``vocab.json`` + ``merges.txt``: byte-level BPE; GPT-2's regex splits words, every byte
  is a symbol, so nothing is ever unknown. ``<|endoftext|>`` is BOS, EOS and UNK at once.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmzoo.data.readers import read_utf8, text_lines
from lmzoo.errors import ConfigError

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
GPT2_EOT = "<|endoftext|>"


def read_bert_vocab(path: Path) -> dict[str, int]:
    # id = line number, lines ending at "\n" as transformers' load_vocab reads them (not splitlines():
    # a token such as "\u2028" or "##\u2028" would become two lines and shift every later id)
    lines = text_lines(read_utf8(path))
    vocab = {}
    for i, tok in enumerate(lines):
        vocab[tok] = i  # a repeated line takes its last id, as transformers' load_vocab and tokenizers do
    if not vocab or "[UNK]" not in vocab:
        raise ConfigError(f"{path}: not a BERT vocab.txt (expected one token per line including [UNK]; "
                          f"read {len(lines)} lines)")
    return vocab


def bert_lowercases(vocab: dict[str, int]) -> bool:
    """An uncased vocabulary has no capital A-Z outside its [BRACKETED] specials (a few symbols such as
    "ℝ" count as upper case in Unicode, so only ASCII letters decide)."""
    return not any(any("A" <= c <= "Z" for c in t) for t in vocab if not (t.startswith("[") and t.endswith("]")))


def bert_wordpiece(vocab: dict[str, int], lowercase: bool, source: str = "vocab.txt"):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    present = [s for s in BERT_SPECIALS if s in vocab]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in present])
    if "[CLS]" in vocab and "[SEP]" in vocab:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tok


def gpt2_byte_bpe(vocab_path: Path, merges_path: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if not Path(merges_path).exists():
        raise ConfigError(f"{vocab_path}: a GPT-2 vocab.json needs its merges.txt next to it ({merges_path} is "
                          "missing); the merges, not the vocabulary, decide how words split")
    try:
        vocab = json.loads(read_utf8(vocab_path))
    except ValueError as e:
        raise ConfigError(f"{vocab_path}: not valid JSON ({e})") from e
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ConfigError(f"{vocab_path}: expected a JSON object mapping token -> id")
    merges = []
    for n, line in enumerate(text_lines(read_utf8(merges_path)), 1):  # "\n" lines, as tokenizers reads them
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or "".join(pair) not in vocab:
            raise ConfigError(f"{merges_path}:{n}: expected 'left right' with both parts and their merge in "
                              f"{Path(vocab_path).name}, got {line[:60]!r}")
        merges.append((pair[0], pair[1]))
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if GPT2_EOT in vocab:
        tok.add_special_tokens([AddedToken(GPT2_EOT, special=True, normalized=False)])
    return tok
