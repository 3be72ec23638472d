"""A small bilingual training corpus made in code, so training tests run without the shared data."""

from __future__ import annotations

import random

ZH = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。",
      "学而时习之，不亦说乎？", "有朋自远方来，不亦乐乎？", "人工智能正在改变世界。", "今天天气很好，我们去公园散步吧。",
      "大语言模型需要大量的中文语料。", "分词器把文本切成词元。"]
EN = ["To be, or not to be: that is the question.", "All the world's a stage, and all the men and women merely players.",
      "The quick brown fox jumps over the lazy dog.", "Language models predict the next token.",
      "Tokenizers split text into pieces the model can read.", "Now is the winter of our discontent."]


SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "ou", "ai")]
HANZI = "".join(sorted(set("".join(ZH)) - set("，。？")))


def tiny_corpus(n: int = 600, seed: int = 0) -> list[str]:
    """Real sentences plus made-up words (Zipf-ish syllable and character mixes), so that every
    kind has enough distinct pieces to fill a few hundred vocabulary slots."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(300)]
    phrases = ["".join(rng.choices(HANZI, k=rng.randint(2, 4))) for _ in range(200)]
    out = []
    for k in range(n):
        made_up = [rng.choice(words[: 20 + k % 280]) for _ in range(rng.randint(3, 8))]
        zh = "".join(rng.choice(phrases[: 10 + k % 190]) for _ in range(rng.randint(1, 4)))
        out.append(" ".join([rng.choice(EN if k % 2 else ZH)] + made_up) + " " + zh + "。")
    return out
