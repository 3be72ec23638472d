"""The tokenizer comparison table (vocabulary size, tokens per character), measured on your own Chinese and English text.

Columns (every count is over the non-empty lines of each text, each line encoded on its own and
without added special tokens, the way a corpus is tokenized for pretraining):

- vocab: the tokenizer's vocabulary size, specials included.
- tok/zh char: tokens of the Chinese text / its characters (whitespace not counted, punctuation
  counted: a line of verse "床前明月光，" is six characters).
- tok/en word: tokens of the English text / its whitespace-separated words.
- bytes/tok zh, bytes/tok en: UTF-8 bytes per token (compression; higher is better).
- encode ms: wall time to encode both texts once, batched (machine dependent; compare within a run).
- unk/fallback: share of all tokens that are the unknown token or a byte-fallback piece.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

@dataclass
class TokenizerStats:
    name: str
    vocab_size: int
    zh_tokens_per_char: float
    en_tokens_per_word: float
    zh_bytes_per_token: float
    en_bytes_per_token: float
    encode_ms: float
    fallback_share: float


def measure(name: str, tok, zh_lines: list[str], en_lines: list[str]) -> TokenizerStats:
    zh_lines, en_lines = [t for t in zh_lines if t.strip()], [t for t in en_lines if t.strip()]
    tok.encode_batch(zh_lines[:8] + en_lines[:8], padding=False)  # warm-up: thread pools, caches
    t0 = time.perf_counter()
    zh = tok.backend.encode_batch(zh_lines)
    en = tok.backend.encode_batch(en_lines)
    ms = (time.perf_counter() - t0) * 1000
    n_zh, n_en = sum(map(len, zh)), sum(map(len, en))
    n_chars = sum(len("".join(t.split())) for t in zh_lines)
    n_words = sum(len(t.split()) for t in en_lines)
    fallback = tok.backend.fallback_ids()
    n_fb = sum(i in fallback for row in zh + en for i in row)
    return TokenizerStats(
        name=name, vocab_size=tok.vocab_size,
        zh_tokens_per_char=n_zh / max(n_chars, 1), en_tokens_per_word=n_en / max(n_words, 1),
        zh_bytes_per_token=sum(len(t.encode()) for t in zh_lines) / max(n_zh, 1),
        en_bytes_per_token=sum(len(t.encode()) for t in en_lines) / max(n_en, 1),
        encode_ms=ms, fallback_share=n_fb / max(n_zh + n_en, 1))


def compare(tokenizers: dict, zh_lines: list[str], en_lines: list[str]) -> list[TokenizerStats]:
    return [measure(name, tok, zh_lines, en_lines) for name, tok in tokenizers.items()]


HEADER = ("| tokenizer | vocab | tok/zh char | tok/en word | bytes/tok zh | bytes/tok en | encode ms | unk/fallback |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")


def to_markdown(stats: list[TokenizerStats], note: str = "") -> str:
    rows = [f"| {s.name} | {s.vocab_size:,} | {s.zh_tokens_per_char:.2f} | {s.en_tokens_per_word:.2f} | "
            f"{s.zh_bytes_per_token:.2f} | {s.en_bytes_per_token:.2f} | {s.encode_ms:.0f} | {s.fallback_share:.1%} |"
            for s in stats]
    return "\n".join([HEADER, *rows]) + (f"\n\n{note}" if note else "") + "\n"


def plot(stats: list[TokenizerStats], path) -> Path:
    """A bar chart of the four ratios, one panel each (matplotlib, which lmzoo installs)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        from lmzoo.errors import LmzooError

        raise LmzooError(f"the PNG chart needs matplotlib, which lmzoo depends on but cannot import here ({e}); "
                         "reinstall it with `pip install matplotlib`, or pass --no-plot") from e
    panels = [("zh_tokens_per_char", "tokens per Chinese character (lower is better)"),
              ("en_tokens_per_word", "tokens per English word (lower is better)"),
              ("zh_bytes_per_token", "UTF-8 bytes per token, Chinese"),
              ("fallback_share", "share of unknown / byte-fallback tokens")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    names = [s.name for s in stats]
    for ax, (field, title) in zip(axes.flat, panels):
        values = [asdict(s)[field] for s in stats]
        bars = ax.bar(names, values, color="#4C72B0")
        ax.bar_label(bars, fmt="%.2f" if field != "fallback_share" else "%.3f", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
        ax.set_ylim(bottom=0)  # every ratio is >= 0; an all-zero panel (no unknowns) would autoscale to ±0.06
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
