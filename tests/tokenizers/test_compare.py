"""The comparison table on the six real tokenizers and a sample of the real corpora."""

from __future__ import annotations

import json

import pytest

from lmzoo.cli.main import main
from tests.tokenizers.strings import CORPORA, TOKENIZERS, need

NAMES = ["llama2", "chatglm-6b", "chatglm2", "gpt2", "bert-base-uncased", "qwen"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    zh = [str(need(CORPORA / "zh" / f"{n}.json")) for n in ("tang300", "songci300", "lunyu")]
    en = str(need(CORPORA / "en" / "tinyshakespeare.txt"))
    args = ["tokenizer", "compare", *[f"{n}={need(TOKENIZERS / n)}" for n in NAMES], "--zh", *zh, "--en", en,
            "--max-chars", "12000", "--out", str(out)]
    assert main(args) == 0
    return out, {row["name"]: row for row in json.loads((out / "compare.json").read_text())}


def test_files_and_vocab_sizes(table):
    out, rows = table
    md = (out / "compare.md").read_text()
    assert md.count("\n|") == len(NAMES) + 1 and "tok/zh char" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {n: rows[n]["vocab_size"] for n in NAMES} == {
        "llama2": 32000, "chatglm-6b": 150344, "chatglm2": 64794, "gpt2": 50257, "bert-base-uncased": 30522,
        "qwen": 151851}


def test_the_numbers_tell_the_known_story(table):
    _, rows = table
    zh = {n: rows[n]["zh_tokens_per_char"] for n in NAMES}
    # the Chinese-first vocabularies need fewer tokens per character than LLaMA's, GPT-2's most of all
    assert max(zh["chatglm2"], zh["qwen"], zh["chatglm-6b"]) < zh["llama2"] < zh["gpt2"]
    assert zh["gpt2"] > 2.0  # most characters are 3 UTF-8 bytes, often 2-3 tokens each
    # byte-level vocabularies never fall back; LLaMA falls back to bytes on rarer (traditional) characters
    assert rows["gpt2"]["fallback_share"] == rows["qwen"]["fallback_share"] == 0.0
    assert rows["llama2"]["fallback_share"] > 0.05 and rows["bert-base-uncased"]["fallback_share"] > 0.0
    for n in NAMES:  # English is 1.3-1.7 tokens per word for all of them
        assert 1.2 < rows[n]["en_tokens_per_word"] < 1.8, n


def test_one_cell_recomputed_with_tiktoken(table):
    """GPT-2's tokens per English word, counted again with tiktoken on the same sample."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    from lmzoo.tokenizers.texts import read_texts, sample_texts

    _, rows = table
    d = TOKENIZERS / "gpt2"
    enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, special_tokens={},
                            mergeable_ranks=data_gym_to_mergeable_bpe_ranks(str(d / "merges.txt"),
                                                                            str(d / "vocab.json")))
    lines = sample_texts(read_texts(CORPORA / "en" / "tinyshakespeare.txt"), 12000)
    expected = sum(len(enc.encode_ordinary(t)) for t in lines) / sum(len(t.split()) for t in lines)
    assert rows["gpt2"]["en_tokens_per_word"] == pytest.approx(expected, rel=1e-12)


def test_chart_axes_start_at_zero_even_when_a_panel_is_all_zero(tmp_path, monkeypatch):
    """No tokenizer falls back to unknowns here: that panel's bars are all 0, and its axis must still
    run from 0 up (it autoscaled to -0.06..0.06 before, drawing a negative share)."""
    import matplotlib.pyplot as plt

    from lmzoo.tokenizers.compare import TokenizerStats, plot

    stats = [TokenizerStats("a", 500, 1.05, 1.78, 2.85, 2.99, 13.0, 0.0),
             TokenizerStats("b", 500, 0.60, 2.54, 4.97, 2.10, 16.0, 0.0)]
    saved = []
    monkeypatch.setattr(plt, "close", lambda fig: saved.append(fig))  # keep the figure to read its axes
    assert plot(stats, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    lows_highs = [ax.get_ylim() for ax in saved[0].axes]
    assert len(lows_highs) == 4 and all(lo == 0 and hi > 0 for lo, hi in lows_highs), lows_highs
    assert lows_highs[1][1] > 2.54  # the margin above the tallest bar is kept
