"""Train, inspect and compare tokenizers.

  lmzoo tokenizer train --kind bpe|wordpiece|unigram|sp-bpe --files corpus.txt poems.json --vocab-size 8000 --out tok/
  lmzoo tokenizer encode path/to/tokenizer --text "床前明月光" [--add-special-tokens]
  lmzoo tokenizer compare llama2=path/llama2 qwen=path/qwen --zh zh.json --en en.txt --out report/

A TOKENIZER is anything lmzoo.load_tokenizer reads: a directory or a tokenizer.json, *.model,
vocab.json (+ merges.txt), vocab.txt or *.tiktoken file; "name=path" names its column.
Text files: .txt lines, or the strings of .json / .jsonl files (chinese-poetry "paragraphs").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmzoo.errors import LmzooError

HELP = "train, encode with, and compare tokenizers (BPE, WordPiece, Unigram, SentencePiece, tiktoken)"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser("train", help="train a tokenizer and save tokenizer.json + tokenizer_config.json",
                       formatter_class=fmt, description="Train one of the four classic kinds; deterministic.")
    t.add_argument("--kind", required=True, choices=["bpe", "wordpiece", "unigram", "sp-bpe"],
                   help="bpe: GPT-2 byte-level; wordpiece: BERT; unigram: T5/SentencePiece; "
                        "sp-bpe: LLaMA-style BPE with byte fallback")
    t.add_argument("--files", nargs="+", required=True, help="training text (.txt, .json, .jsonl)")
    t.add_argument("--vocab-size", type=int, default=8000, help="total vocabulary, specials included")
    t.add_argument("--special-tokens", nargs="*", default=[], help="extra special tokens, e.g. '<|im_start|>'")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--character-coverage", type=float, help="share of characters kept (default per kind)")
    t.add_argument("--lowercase", action="store_true", help="wordpiece: lowercase (an uncased BERT)")
    t.add_argument("--sentinels", type=int, default=100, help="unigram: number of <extra_id_N> tokens")
    t.add_argument("--chat-template", help="a built-in name (llama2, chatml, chatglm2, chatglm3) or Jinja")
    t.add_argument("--out", required=True, help="output directory")

    e = sub.add_parser("encode", help="print the ids and pieces of a text", formatter_class=fmt)
    e.add_argument("tokenizer", help="a tokenizer file or directory")
    e.add_argument("--text", required=True)
    e.add_argument("--add-special-tokens", action="store_true")
    e.add_argument("--flavor", help="override the guessed flavor (chatglm-6b, chatglm2, chatglm3, qwen, ...)")

    c = sub.add_parser("compare", help="compare tokenizers on your Chinese and English text (tokens per character/word, bytes, speed, unknowns)",
                       formatter_class=fmt, description="Prints a markdown table and saves it with a PNG chart.")
    c.add_argument("tokenizers", nargs="+", metavar="TOKENIZER", help="path or name=path")
    c.add_argument("--zh", required=True, nargs="+", help="Chinese text file(s)")
    c.add_argument("--en", required=True, nargs="+", help="English text file(s)")
    c.add_argument("--max-chars", type=int, help="use only the first N characters of each text")
    c.add_argument("--out", default="tokenizer_compare", help="directory for compare.md, compare.json, compare.png")
    c.add_argument("--no-plot", action="store_true", help="skip the PNG chart (only the table and compare.json)")


def _named(spec: str) -> tuple[str, str]:
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, path
    p = Path(spec)
    return (p.name if p.is_dir() else p.parent.name or p.stem), spec


def _train(args) -> int:
    from lmzoo.tokenizers import train_tokenizer

    tok = train_tokenizer(args.kind, files=args.files, vocab_size=args.vocab_size,
                          special_tokens=args.special_tokens, min_frequency=args.min_frequency,
                          character_coverage=args.character_coverage, lowercase=args.lowercase,
                          sentinels=args.sentinels, chat_template=args.chat_template)
    out = tok.save(args.out)
    print(f"wrote {out / 'tokenizer.json'}: {args.kind}, {tok.vocab_size:,} tokens, specials {tok.roles}")
    if tok.vocab_size < args.vocab_size:  # the trainers stop when no pair or piece is frequent enough to add
        print(f"lmzoo tokenizer: note: the corpus supports only {tok.vocab_size:,} tokens; asked for "
              f"{args.vocab_size:,} (more text, or a lower --min-frequency, gives more)", file=sys.stderr)
    return 0


def _encode(args) -> int:
    from lmzoo.tokenizers import load_tokenizer

    tok = load_tokenizer(args.tokenizer, flavor=args.flavor)
    ids = tok.encode(args.text, add_special_tokens=args.add_special_tokens)
    print(json.dumps({"ids": ids, "pieces": [tok.id_to_token(i) for i in ids], "decoded": tok.decode(ids)},
                     ensure_ascii=False))
    return 0


def _compare(args) -> int:
    from lmzoo.tokenizers import load_tokenizer
    from lmzoo.tokenizers.compare import compare, plot, to_markdown
    from lmzoo.tokenizers.texts import read_texts, sample_texts

    tokenizers = {}
    for spec in args.tokenizers:
        name, path = _named(spec)
        if name in tokenizers:
            raise LmzooError(f"two tokenizers are named {name!r}; use name=path to tell them apart")
        tokenizers[name] = load_tokenizer(path)
    zh = sample_texts([t for f in args.zh for t in read_texts(f)], args.max_chars)
    en = sample_texts([t for f in args.en for t in read_texts(f)], args.max_chars)
    stats = compare(tokenizers, zh, en)
    note = (f"Measured on {sum(map(len, zh)):,} characters of {', '.join(Path(f).name for f in args.zh)} and "
            f"{sum(map(len, en)):,} characters of {', '.join(Path(f).name for f in args.en)}.")
    table = to_markdown(stats, note)
    print(table, end="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table, encoding="utf-8")
    (out / "compare.json").write_text(json.dumps([s.__dict__ for s in stats], indent=2) + "\n")
    if not args.no_plot:
        print(f"chart: {plot(stats, out / 'compare.png')}")
    return 0


def run(args) -> int:
    return {"train": _train, "encode": _encode, "compare": _compare}[args.tokenizer_command](args)
