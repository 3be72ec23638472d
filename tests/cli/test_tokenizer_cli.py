"""`lmzoo tokenizer train | encode | compare` on tiny settings, and `generate --prompt` with other formats."""

from __future__ import annotations

import json

import pytest
import torch

import lmzoo
from lmzoo.cli.main import main
from tests.tokenizers.corpus import tiny_corpus
from tests.tokenizers.strings import TOKENIZERS, need


def test_subcommands_have_help(capsys):
    for sub in ("train", "encode", "compare"):
        with pytest.raises(SystemExit) as e:
            main(["tokenizer", sub, "--help"])
        assert e.value.code == 0 and f"usage: lmzoo tokenizer {sub}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["tokenizer", "--help"])
    listing = capsys.readouterr().out
    # compare's one-line help says what it measures (it read "the seed's comparison table", a name
    # from the project's notes that means nothing to a user)
    assert "compare tokenizers on your Chinese and English text" in listing and "seed" not in listing


def test_train_encode_compare(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny_corpus()))
    assert main(["tokenizer", "train", "--kind", "sp-bpe", "--files", str(corpus), "--vocab-size", "600",
                 "--special-tokens", "<|im_start|>", "<|im_end|>", "--chat-template", "chatml",
                 "--out", str(tmp_path / "tok")]) == 0
    assert "note" not in capsys.readouterr().err  # the corpus had room for all 600
    tok = lmzoo.load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 600 and tok.token_to_id("<|im_end|>") == 4 and "im_start" in tok.chat_template
    assert main(["tokenizer", "encode", str(tmp_path / "tok"), "--text", "床前明月光<|im_end|>"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ids"] == tok.encode("床前明月光<|im_end|>") and out["pieces"][-1] == "<|im_end|>"
    assert main(["tokenizer", "compare", f"mine={tmp_path / 'tok'}", "--zh", str(corpus), "--en", str(corpus),
                 "--out", str(tmp_path / "cmp"), "--no-plot"]) == 0
    table = capsys.readouterr().out
    assert "| mine | 600 |" in table and (tmp_path / "cmp" / "compare.md").read_text() == table
    assert main(["tokenizer", "train", "--kind", "bpe", "--files", str(tmp_path / "nope.txt"),
                 "--out", str(tmp_path / "x")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_train_says_when_the_corpus_supports_fewer_tokens_than_asked(tmp_path, capsys):
    corpus = tmp_path / "small.txt"
    corpus.write_text("to be or not to be\n" * 50)  # a handful of words: far fewer than 32,000 merges
    assert main(["tokenizer", "train", "--kind", "sp-bpe", "--files", str(corpus), "--vocab-size", "32000",
                 "--out", str(tmp_path / "tok")]) == 0
    n = lmzoo.load_tokenizer(tmp_path / "tok").vocab_size
    assert 256 < n < 32000
    assert capsys.readouterr().err == (f"lmzoo tokenizer: note: the corpus supports only {n:,} tokens; asked for "
                                       "32,000 (more text, or a lower --min-frequency, gives more)\n")


@pytest.mark.parametrize("name", ["llama2", "gpt2"])
def test_generate_prompt_with_other_tokenizer_formats(tmp_path, capsys, name):
    """--prompt works with tokenizer.model and vocab.json + merges.txt, not only tokenizer.json."""
    import shutil

    from lmzoo.models.llama.config import LlamaConfig

    src = need(TOKENIZERS / name)
    tok = lmzoo.load_tokenizer(src)
    model = lmzoo.build(LlamaConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, d_ff=24,
                                    max_positions=32))
    path = lmzoo.save(model, tmp_path / "m")
    for f in src.iterdir():
        shutil.copy(f, path / f.name)
    assert main(["generate", "--model", str(path), "--prompt", "床前明月光", "--max-new-tokens", "4"]) == 0
    ids = tok.encode("床前明月光")
    ref = lmzoo.generate(model, torch.tensor([ids]), max_new_tokens=4)[0, len(ids):].tolist()
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(ref)


def _vocab_txt(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "床", "前", "to", "be"]) + "\n",
                                 encoding="utf-8")
    return d


def test_binary_files_are_one_line_errors(tmp_path, capsys):
    """A PNG given as text: "FILE: not UTF-8 text (...)", exit 1, no traceback (the old code raised
    UnicodeDecodeError out of `tokenizer train`)."""
    blob = tmp_path / "figure.txt"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    good = tmp_path / "en.txt"
    good.write_text("to be\n", encoding="utf-8")
    expected = f"lmzoo tokenizer: error: {blob}: not UTF-8 text (invalid start byte at byte 0)\n"
    assert main(["tokenizer", "train", "--kind", "bpe", "--files", str(good), str(blob),
                 "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err == expected and not (tmp_path / "x").exists()
    assert main(["tokenizer", "compare", str(_vocab_txt(tmp_path)), "--zh", str(blob), "--en", str(good),
                 "--out", str(tmp_path / "cmp"), "--no-plot"]) == 1
    assert capsys.readouterr().err == expected


def test_compare_without_an_importable_matplotlib_says_what_to_do(tmp_path, capsys, monkeypatch):
    import sys

    text = tmp_path / "t.txt"
    text.write_text("床前\nto be\n", encoding="utf-8")
    args = ["tokenizer", "compare", f"b={_vocab_txt(tmp_path)}", "--zh", str(text), "--en", str(text),
            "--out", str(tmp_path / "cmp")]
    assert main(args) == 0 and "| b | 9 |" in capsys.readouterr().out  # matplotlib comes with lmzoo
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an install where the import fails anyway
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("lmzoo tokenizer: error: the PNG chart needs matplotlib") and err.count("\n") == 1
    assert "pip install matplotlib" in err and "--no-plot" in err and "lmzoo[plot]" not in err
