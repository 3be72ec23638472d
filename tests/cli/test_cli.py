"""Every shipped command runs on a tiny setting, and bad input gets a clear message."""

import json
import subprocess
import sys

import pytest
import torch

import lmzoo
from lmzoo.cli.main import COMMANDS, main
from lmzoo.models.registry import families


def test_every_command_has_help(capsys):
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: lmzoo " + cmd in capsys.readouterr().out


def test_zoo_lists_every_family_from_the_registry(capsys):
    assert main(["zoo", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["family"] for r in rows} == set(families())
    by = {r["preset"]: r for r in rows}
    # KV bytes/token in bf16 = 2 · n_kv · d_head · layers · 2 bytes
    assert by["llama2-7b"]["kv_bytes_per_token"] == 2 * 32 * 128 * 32 * 2
    assert by["llama2-70b"]["kv_bytes_per_token"] == 2 * 8 * 128 * 80 * 2
    assert by["llama2-70b"]["attention"].startswith("GQA-8")


def test_demo_runs_and_cache_agrees(capsys):
    assert main(["demo", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "matches the uncached forward" in out


def test_convert_then_generate(tmp_path, capsys):
    from lmzoo.models.llama.config import LlamaConfig

    torch.manual_seed(0)
    model = lmzoo.build(LlamaConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, d_ff=48, max_positions=32))
    lmzoo.save(model, tmp_path / "src")
    assert main(["convert", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "bf"), "--dtype", "bfloat16"]) == 0
    assert lmzoo.load(tmp_path / "bf").embed.weight.dtype == torch.bfloat16
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "src"), "--ids", "1 2 3", "--max-new-tokens", "5"]) == 0
    got = [int(t) for t in capsys.readouterr().out.split()]
    ref = lmzoo.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5)[0, 3:].tolist()
    assert got == ref


def test_bad_input_messages(tmp_path, capsys):
    assert main(["generate", "--model", "no-such-model", "--ids", "1"]) == 1
    assert "neither a directory nor a preset" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--ids", "1"]) == 1
    assert "config.json" in capsys.readouterr().err


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "lmzoo.cli.main", "zoo", "--family", "llama"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "llama2-70b" in r.stdout


def test_generate_with_text_prompt_and_tokenizer_json(tmp_path, capsys):
    """--prompt goes through the directory's tokenizer.json; Chinese text included."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    from lmzoo.models.llama.config import LlamaConfig

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["床前明月光，疑是地上霜。", "hello world, hello lmzoo"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    model = lmzoo.build(LlamaConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=1, n_heads=4, d_ff=48,
                                    max_positions=64))
    path = lmzoo.save(model, tmp_path / "m")
    tok.save(str(path / "tokenizer.json"))
    assert main(["generate", "--model", str(path), "--prompt", "床前明月光", "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out
    ids = tok.encode("床前明月光").ids
    ref = lmzoo.generate(model, torch.tensor([ids]), max_new_tokens=6)[0, len(ids):].tolist()
    assert text.rstrip("\n") == tok.decode(ref)
    assert main(["generate", "--model", "gpt2", "--prompt", "hi"]) == 1  # a preset has no tokenizer
    assert "--ids" in capsys.readouterr().err
