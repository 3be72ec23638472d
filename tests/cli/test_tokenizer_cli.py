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


def test_train_encode_compare(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny_corpus()))
    assert main(["tokenizer", "train", "--kind", "sp-bpe", "--files", str(corpus), "--vocab-size", "600",
                 "--special-tokens", "<|im_start|>", "<|im_end|>", "--chat-template", "chatml",
                 "--out", str(tmp_path / "tok")]) == 0
    capsys.readouterr()
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
