"""``lmzoo quantize`` on a tiny model: a single method with its report, ``--compare``, the built-in
text when no --calib is given, and clear messages for a bad method, bit width, group size or
calibration file."""

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


def test_compare_writes_every_method(tiny, capsys):
    out = tiny / "all"
    assert main(["quantize", "--model", str(tiny / "model"), "--compare", "--calib", str(tiny / "ids.ids"),
                 "--out", str(out), "--calib-len", "16", "--n-calib", "2", "--no-report"]) == 0
    # the tiny model's 64 inputs are fewer than AWQ's default group of 128: it takes 64, and says so
    written = sorted(p.name for p in out.iterdir() if (p / "config.json").exists())
    assert written == ["awq-w4g64", "gptq-w4g128", "llm.int8", "nf4", "rtn-w4g128", "rtn-w8"]
    assert json.loads((out / "awq-w4g64" / "config.json").read_text())["quantization_config"]["group_size"] == 64
    assert "using group_size 64" in capsys.readouterr().err


def test_compare_names_a_skipped_method_with_its_reason(tiny, monkeypatch, capsys):
    import lmzoo.cli.quantize as cli

    monkeypatch.setattr(cli, "COMPARE", [("rtn", {}), ("awq", {"group_size": 48})])
    out = tiny / "skip"
    assert main(["quantize", "--model", str(tiny / "model"), "--compare", "--calib", str(tiny / "ids.ids"),
                 "--out", str(out), "--calib-len", "16", "--n-calib", "2", "--eval-windows", "2",
                 "--new-tokens", "2", "--threads", "1"]) == 0
    md = (out / "quant_report.md").read_text()
    assert "| rtn-w4g128 |" in md and "| awq-w4g48 |" not in md
    reason = "quantize: method 'awq' supports group_size None (per channel), 32, 64, 128; got 48"
    assert f"Skipped:\n- awq-w4g48: {reason}" in md
    assert json.loads((out / "quant_report.json").read_text())[-1] == {"name": "awq-w4g48", "skipped": reason}
    assert "Calibration: ids.ids" not in md and f"Calibration: {tiny / 'ids.ids'} (600 tokens" in md


def _builtin_ids(model_dir, n):
    """The model's tokenizer's ids of the built-in corpus (scale 0.1), document after document."""
    from lmzoo.data.builtin import builtin_corpus

    tok, ids = lmzoo.load_tokenizer(model_dir), []
    for doc in builtin_corpus(0.1):
        ids += tok.encode(doc + "\n\n")
        if len(ids) >= n:
            return torch.tensor(ids[:n])


def test_rtn_runs_without_calib_and_measures_on_builtin_text(tiny, capsys):
    from lmzoo.quant.report import perplexity

    out = tiny / "rtn-builtin"
    assert main(["quantize", "--model", str(tiny / "model"), "--method", "rtn", "--out", str(out),
                 "--calib-len", "32", "--n-calib", "4", "--eval-windows", "2", "--new-tokens", "2",
                 "--threads", "1"]) == 0
    captured = capsys.readouterr()
    # no data is needed to quantize; the report's held-out text is the built-in corpus after the
    # 1024 tokens kept for calibration: 2 windows of 32, the tokens perplexity reads (it was "the 65
    # tokens": the one token perplexity wants past its last window, and never reads, was counted)
    line = "its first 1024 tokens; held-out: the 64 tokens after them (2 windows of 32)"
    assert "calibration: no --calib, so the built-in corpus" in captured.err and line in captured.err
    assert (out / "quant_report.md").read_text().rstrip().endswith(line + ".")
    rows = json.loads((out / "quant_report.json").read_text())
    held = _builtin_ids(tiny / "model", 1024 + 65)[1024:]
    want = perplexity(lmzoo.load(tiny / "model"), held, seq_len=32, max_windows=2)
    assert rows[0]["perplexity"] == pytest.approx(want, rel=1e-5)


def test_gptq_without_calib_calibrates_on_builtin_text(tiny, capsys):
    out = tiny / "gptq-builtin"
    assert main(["quantize", "--model", str(tiny / "model"), "--method", "gptq", "--group-size", "32",
                 "--out", str(out), "--calib-len", "16", "--n-calib", "2", "--no-report"]) == 0
    assert "calibration: no --calib, so the built-in corpus (lmzoo.data.builtin" in capsys.readouterr().err
    model = lmzoo.load(out)
    assert isinstance(model.layers[1].mlp.down_proj, IntLinear) and model.layers[1].mlp.down_proj.group_size == 32


def test_rtn_without_calib_or_report_needs_no_text(tmp_path, capsys):
    torch.manual_seed(0)
    model_dir = lmzoo.save(lmzoo.build(LlamaConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, d_ff=96,
                                                   max_positions=16)), tmp_path / "m")  # no tokenizer beside it
    assert main(["quantize", "--model", str(model_dir), "--method", "rtn", "--group-size", "32",
                 "--out", str(tmp_path / "q"), "--no-report"]) == 0
    assert "calibration: none" in capsys.readouterr().err
    assert lmzoo.load(tmp_path / "q").layers[0].mlp.down_proj.group_size == 32


@pytest.mark.parametrize("name", ["calib.txt", "calib.ids"])
def test_a_binary_calib_file_is_a_one_line_error(tiny, capsys, name):
    bad = tiny / name
    bad.write_bytes(bytes([0x89, 0x50, 0x4E, 0x47, 0xFF, 0xFE, 0x00, 0x81]) * 64)
    assert main(["quantize", "--model", str(tiny / "model"), "--method", "rtn", "--calib", str(bad),
                 "--out", str(tiny / "bad"), "--no-report"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"lmzoo quantize: error: {bad}: not UTF-8 text (invalid start byte at byte 0)"
    assert not (tiny / "bad").exists()


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


def test_a_model_larger_than_memory_is_refused_before_loading(tiny, monkeypatch, capsys):
    import lmzoo.cli.common as common

    monkeypatch.setattr(common, "available_memory", lambda: 1000)  # bytes: far below the model's float32 size
    monkeypatch.setattr(lmzoo, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    assert main(["quantize", "--model", str(tiny / "model"), "--method", "rtn", "--no-report",
                 "--out", str(tiny / "never")]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and err[0].startswith("lmzoo quantize: error: --model") and "needs about" in err[0]
    assert "--skip-memory-check" in err[0]
    assert not (tiny / "never").exists()
