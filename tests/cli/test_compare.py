"""``lmzoo zoo --compare``: each cell comes from the registry and the built model, not from typing."""

import json

import pytest

from lmzoo.cli.main import main
from lmzoo.models.registry import families


def _cols(capsys, *names):
    assert main(["zoo", "--compare", *names, "--json"]) == 0
    return {c["name"]: c for c in json.loads(capsys.readouterr().out)}


def test_bert_gpt2_t5(capsys):
    fams = families()
    if not {"bert", "t5"} <= set(fams):
        pytest.skip("bert and t5 are not registered")
    cols = _cols(capsys, "bert", "gpt2", "t5")
    for name, col in cols.items():
        fam = fams[name]
        cfg = next(iter(fam.presets.values()))
        assert col["objective"] == fam.objective and col["tokenisation"].startswith(fam.tokenizer)
        assert f"{cfg.vocab_size:,}" in col["tokenisation"] and col["architecture"].startswith(fam.shape)
    assert cols["bert"]["attention"].startswith("bidirectional")
    assert cols["gpt2"]["attention"].startswith("causal")
    assert cols["t5"]["attention"].startswith("encoder: bidirectional; decoder: causal + cross")
    assert "124.44M" in cols["gpt2"]["architecture"]  # GPT-2 small's published 124M
    assert main(["zoo", "--compare", "bert", "gpt2", "t5"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| | bert | gpt2 | t5 |" and [r.split(" | ")[0] for r in table[2:]] == [
        "| tokenisation", "| objective", "| input representation", "| attention", "| architecture"]


def test_presets_and_the_prefix_decoder(capsys):
    cols = _cols(capsys, "chatglm", "llama2-70b")
    assert cols["chatglm"]["preset"] == "chatglm-6b"
    assert cols["chatglm"]["attention"].startswith("prefix")
    assert "2D RoPE" in cols["chatglm"]["input representation"]
    assert "DeepNorm" in cols["chatglm"]["architecture"] and "6.71B" in cols["chatglm"]["architecture"]
    assert "GQA-8" in cols["llama2-70b"]["attention"] and "80 layers" in cols["llama2-70b"]["architecture"]


def test_unknown_names_are_an_error(capsys):
    assert main(["zoo", "--compare", "gpt2", "no-such-family"]) == 1
    err = capsys.readouterr().err
    assert "unknown family or preset 'no-such-family'" in err and "gpt2" in err
