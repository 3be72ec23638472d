"""`lmzoo eval` end to end on a tiny random model: the table, the run folder, --compare, adapters,
and one clear line for each kind of bad input."""

import json

import pytest
import torch

import lmzoo
from lmzoo.cli.main import main
from tests.cli.test_cli import _tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lmzoo.models.llama.config import LlamaConfig

    tok = _tiny_tokenizer()
    torch.manual_seed(0)
    model = lmzoo.build(LlamaConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=1, n_heads=4, d_ff=48,
                                    max_positions=64))
    d = lmzoo.save(model, tmp_path_factory.mktemp("m") / "final")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return d


def test_eval_writes_the_table_results_report_and_plot(model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world, the cat sat on the mat. " * 20)
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(model_dir), "--data", str(text), "--tasks", "add", "choice_add",
                 "--limit", "8", "--context", "32", "--stride", "16", "--max-new-tokens", "4", "--no-progress",
                 "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    for row in (f"{text} perplexity", "add exact_match", "choice_add acc", "choice_add acc_norm"):
        assert row in shown
    res = json.loads((out / "results.json").read_text())
    (r,) = res["models"]
    t = r["text"][str(text)]
    assert t["context"] == 32 and t["stride"] == 16 and t["tokens"] > 0
    assert t["perplexity"] == pytest.approx(float(torch.tensor(t["loss"]).exp()), rel=1e-6)
    assert r["tasks"]["add"]["n"] == 8 and 0 <= r["tasks"]["choice_add"]["acc"] <= 1
    # a random model over ~200 tokens: perplexity near the vocabulary size, not 1 and not 10x it
    assert 50 < t["perplexity"] < 2000
    assert (out / "eval.png").stat().st_size > 1000 and "| add exact_match |" in (out / "report.md").read_text()


def test_compare_evaluates_each_model_alike_side_by_side(model_dir, tmp_path, capsys):
    from lmzoo.interop.checkpoint import save

    other = lmzoo.load(model_dir)
    with torch.no_grad():
        other.lm_head.weight.mul_(0.0)  # uniform predictions: perplexity = vocabulary size exactly
    d2 = save(other, tmp_path / "uniform")
    assert main(["eval", "--compare", str(model_dir), str(d2), "--tasks", "choice_add", "--limit", "4",
                 "--data", str(_text(tmp_path)), "--no-progress", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    a, b = res["models"]
    assert [a["model"], b["model"]] == [model_dir.parent.name, "uniform"]  # a run's final/ is named after its run
    vocab = lmzoo.load(d2).config.vocab_size
    assert list(b["text"].values())[0]["perplexity"] == pytest.approx(vocab, rel=1e-4)
    assert list(a["text"].values())[0]["perplexity"] != pytest.approx(vocab, rel=1e-2)


def test_an_adapter_changes_the_model_evaluated(model_dir, tmp_path, capsys):
    from lmzoo.peft import apply_lora, save_adapter

    m = lmzoo.load(model_dir)
    apply_lora(m, r=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_adapter(m, tmp_path / "ad")
    text = _text(tmp_path)
    ppl = []
    for extra in ([], ["--adapter", str(tmp_path / "ad")]):
        assert main(["eval", "--model", str(model_dir), "--data", str(text), "--no-progress", "--json", *extra]) == 0
        ppl.append(list(json.loads(capsys.readouterr().out)["models"][0]["text"].values())[0]["perplexity"])
    assert ppl[0] != pytest.approx(ppl[1], rel=1e-3)


def _text(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("the cat sat on the mat, hello world. " * 10)
    return p


@pytest.mark.parametrize("flags, message", [
    (["--data", "EMPTY"], "holds no text"),
    (["--data", "TEXT", "--context", "16", "--stride", "32"], "stride"),
    (["--tasks", "hellaswag"], "unknown task 'hellaswag'"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--data", "TEXT", "--context", "4096"], "context"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(flags, message, model_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    flags = [str(tmp_path / "empty.txt") if f == "EMPTY" else str(_text(tmp_path)) if f == "TEXT" else f
             for f in flags]
    assert main(["eval", "--model", str(model_dir), "--no-progress", *flags]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_a_model_without_a_tokenizer_or_without_a_model_is_refused(model_dir, tmp_path, capsys):
    bare = lmzoo.save(lmzoo.load(model_dir), tmp_path / "bare", tokenizer=False)
    assert main(["eval", "--model", str(bare), "--tasks", "add"]) != 0
    assert "holds no tokenizer" in capsys.readouterr().err
    assert main(["eval", "--tasks", "add"]) != 0
    assert "give --model" in capsys.readouterr().err


def test_a_quantized_checkpoint_is_evaluated_as_saved(model_dir, tmp_path, capsys):
    """RTN 8-bit per channel, saved packed and loaded back by lmzoo.load: its perplexity is the float
    model's within a percent, and not bit-equal (the packed weights are what was scored)."""
    m = lmzoo.load(model_dir)
    lmzoo.quantize(m, "rtn", bits=8, group_size=None)
    q = lmzoo.save(m, tmp_path / "q8")
    assert "quantization_config" in json.loads((q / "config.json").read_text())
    text, ppl = _text(tmp_path), []
    for d in (model_dir, q):
        assert main(["eval", "--model", str(d), "--data", str(text), "--no-progress", "--json"]) == 0
        ppl.append(list(json.loads(capsys.readouterr().out)["models"][0]["text"].values())[0]["perplexity"])
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-2) and ppl[1] != ppl[0]
