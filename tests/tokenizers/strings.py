"""The bilingual test set: corpus lines (Chinese poetry and prose, Shakespeare), mixes of them, and
hand-written edge cases. Built in code so no fixture file drifts from the corpora."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.shared_data import DATA, need  # noqa: F401  (need: re-exported for the tokenizer tests)

TOKENIZERS = DATA / "tokenizers"
CORPORA = DATA / "corpora"

EDGE_CASES = [
    "", " ", "  ", "     ", "\n", "\n\n", " \n ", "\t", "\t\tindented", "\r\n", "a\r\nb", "line1\nline2\n",
    " leading space", "  two leading spaces", "trailing space ", "trailing spaces   ", "many     spaces   inside",
    "𠀀𠀁𪚥𰻞", "龘靐齉齾", "㐀㐁㐂", "丒丗乸", "鑫淼焱垚", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "😀", "👍🏽 ok", "👨‍👩‍👧‍👦 family", "🇨🇳🇺🇸", "I ❤️ 北京", "🤖🤖🤖 机器人",
    "Pneumonoultramicroscopicsilicovolcanoconiosis", "a" * 300, "ab" * 150, "超长的词" * 60, "1234567890" * 20,
    "Supercalifragilisticexpialidocious反复出现Supercalifragilisticexpialidocious",
    "GPT-4o 和 LLaMA-2 的对比：tokens/字 = 1.45", "def f(x):\n    return x**2  # 平方\n",
    "https://example.com/路径?q=测试&lang=zh-CN", "Ünïcödé façade naïve café", "日本語のテキスト、한국어 텍스트",
    "Привет, мир", "مرحبا بالعالم", "ελληνικά γράμματα", "3.14159 2.71828", "2024年12月31日 23:59",
    "“引号”‘单引号’《书名》【括号】", "……——！？；：", "混合English和中文without spaces混合",
    "It's, we'll, they've, I'd: contractions", "   中文前面有空格", "中文后面有空格   ", "tab\t中文\tmix",
    "ＡＢＣ全角字母", "１２３全角数字", "ＦｕｌｌＷｉｄｔｈ　全角　空格",
]
SPECIAL_LOOKING = ["<s>hello</s>", "<|endoftext|>", "[CLS] x [SEP]", "<|im_start|>user\nhi<|im_end|>"]


def corpus_lines(n_zh: int = 80, n_en: int = 80, n_mixed: int = 40, seed: int = 0) -> list[str]:
    import json

    need(CORPORA)
    zh = []
    for name in ("tang300", "songci300", "lunyu"):
        zh += [p for rec in json.loads((CORPORA / "zh" / f"{name}.json").read_text()) for p in rec["paragraphs"]]
    en = [ln for ln in (CORPORA / "en" / "tinyshakespeare.txt").read_text().splitlines() if ln.strip()]
    rng = random.Random(seed)
    zs, es = rng.sample(zh, n_zh), rng.sample(en, n_en)
    mixed = [f"{rng.choice(zh)} {rng.choice(en)}" if k % 2 else f"{rng.choice(en)}\n{rng.choice(zh)}"
             for k in range(n_mixed)]
    return zs + es + mixed


def bilingual_set() -> list[str]:
    """At least 200 strings: corpus lines and mixes, then the edge cases."""
    return corpus_lines() + EDGE_CASES
