"""``lmzoo quantize`` on a tiny model: a single method with its report, ``--compare``, and clear
messages for a bad method, bit width, group size or calibration file."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import lmzoo
from lmzoo.cli.main import main
from lmzoo.models.llama.config import LlamaConfig
from lmzoo.quant import IntLinear

ROOT = Path(__file__).resolve().parents[2]


def _byte_tokenizer():
    spec = importlib.util.spec_from_file_location("tiny_shakespeare", ROOT / "benchmarks" / "tiny_shakespeare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.byte_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant_cli")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_positions=64)
    path = lmzoo.save(lmzoo.build(cfg), d / "model")
    _byte_tokenizer().save(str(path / "tokenizer.json"))
    (d / "text.txt").write_text("To be, or not to be, that is the question. " * 30)
    (d / "ids.ids").write_text(" ".join(str(i % 200) for i in range(600)))
    (d / "empty.txt").write_text("")
    return d


def test_quantize_one_method_with_report(tiny, capsys):
    out = tiny / "rtn"
    assert main(["quantize", "--model", str(tiny / "model"), "--method", "rtn", "--group-size", "32",
                 "--calib", str(tiny / "text.txt"), "--out", str(out), "--calib-len", "32", "--n-calib", "4",
                 "--eval-windows", "2", "--new-tokens", "4", "--threads", "1"]) == 0
    table = capsys.readouterr().out
    assert "| float32 |" in table and "| rtn w4g32 |" in table
    rows = json.loads((out / "quant_report.json").read_text())
    assert [r["name"] for r in rows] == ["float32", "rtn w4g32"]
    for r in rows:
        assert r["perplexity"] > 1 and r["decode_tokens_per_s"] > 0 and r["linear_bytes"] > 0
    assert rows[1]["linear_bytes"] < rows[0]["linear_bytes"] / 5  # 4-bit + scales vs float32
    assert (out / "quant_report.md").exists()
    model = lmzoo.load(out)  # the output is a quantized checkpoint with the tokenizer beside it
    assert isinstance(model.layers[0].attn.q_proj, IntLinear) and (out / "tokenizer.json").exists()


def test_compare_writes_every_method(tiny):
    out = tiny / "all"
    assert main(["quantize", "--model", str(tiny / "model"), "--compare", "--calib", str(tiny / "ids.ids"),
                 "--out", str(out), "--calib-len", "16", "--n-calib", "2", "--no-report"]) == 0
    # the tiny model's 64 inputs are fewer than a group of 128: AWQ is left out with a note
    written = sorted(p.name for p in out.iterdir() if (p / "config.json").exists())
    assert written == ["gptq-w4g128", "llm.int8", "nf4", "rtn-w4g128", "rtn-w8"]


@pytest.mark.parametrize("extra,match", [
    (["--method", "hqq"], "unknown quantization method 'hqq'"),
    (["--method", "gptq", "--bits", "3"], r"supports bits \[2, 4, 8\], got 3"),
    (["--method", "rtn", "--group-size", "48"], "supports group_size"),
    (["--method", "rtn", "--group-size", "big"], '--group-size must be a number or "none"'),
    (["--method", "rtn", "--calib", "EMPTY"], "holds no tokens"),
    (["--method", "rtn", "--calib", "MISSING"], "no such file"),
])
def test_bad_arguments_give_clear_errors(tiny, capsys, extra, match):
    calib = str(tiny / "text.txt")
    if "EMPTY" in extra:
        extra[extra.index("EMPTY")], calib = str(tiny / "empty.txt"), None
    if "MISSING" in extra:
        extra[extra.index("MISSING")], calib = str(tiny / "nope.txt"), None
    args = ["quantize", "--model", str(tiny / "model"), "--out", str(tiny / "bad"), *extra]
    if calib:
        args += ["--calib", calib]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "lmzoo quantize: error:" in err and __import__("re").search(match, err), err
    assert not (tiny / "bad").exists()
