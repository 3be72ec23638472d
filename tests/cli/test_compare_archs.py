"""`lmzoo compare-archs`: same-size configs per family, and a tiny end-to-end comparison."""

import json
import math

import pytest

import lmzoo
from lmzoo.cli.compare_archs import at_width, base_config, count_params, parse_count, solve_width
from lmzoo.cli.main import main
from lmzoo.errors import LmzooError


@pytest.fixture(scope="module")
def tok():
    return lmzoo.train_tokenizer("sp-bpe", texts=["the cat sat on the mat 一二三"] * 20, vocab_size=300)


def test_parse_count():
    assert [parse_count(x) for x in ("10M", "500K", "1.5M", "2000", "2_000", "1G")] == [
        10_000_000, 500_000, 1_500_000, 2000, 2000, 10 ** 9]
    with pytest.raises(LmzooError, match="not a count"):
        parse_count("ten")


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2", "chatglm2", "deepseek_v2"])
def test_solved_width_lands_near_the_target(tok, family):
    cfg, n = solve_width(base_config(family, tok, None), 2_000_000, 64)
    unit = 8 * cfg.n_heads
    assert cfg.d_model % unit == 0 and n == count_params(cfg)
    # the next width step up or down is farther from the target
    for other in (cfg.d_model - unit, cfg.d_model + unit):
        if other > 0:
            assert abs(count_params(at_width(cfg, other, 64)) - 2_000_000) >= abs(n - 2_000_000)
    assert abs(n - 2_000_000) / 2_000_000 < 0.2


def test_width_fields_scale_together(tok):
    ds = base_config("deepseek_v2", tok, None)
    wide = at_width(ds, ds.d_model * 2, 64)
    assert (wide.kv_lora_rank, wide.d_expert, wide.d_ff) == (2 * ds.kv_lora_rank, 2 * ds.d_expert, 2 * ds.d_ff)
    assert wide.n_routed_experts == ds.n_routed_experts and wide.n_layers == ds.n_layers
    bloom = base_config("bloom", tok, None)
    assert at_width(bloom, 96, 64).d_ff == 4 * 96  # Bloom's only ratio survives
    with pytest.raises(LmzooError, match="causal decoders"):
        base_config("t5", tok, None)


def test_tiny_comparison_end_to_end(tmp_path, capsys):
    out = tmp_path / "lab"
    assert main(["compare-archs", "--tiny", "--families", "llama", "gpt2", "--tokens", "4K", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    assert "| llama |" in capsys.readouterr().out
    res = json.loads((out / "compare.json").read_text())
    rows = {r["family"]: r for r in res["rows"]}
    assert set(rows) == {"llama", "gpt2"} and res["tokens"] == 16 * 256
    for name, r in rows.items():
        # KV bytes/token in bf16 = 2 (K and V) · n_kv_heads · head_dim · layers · 2 bytes
        head_dim = r["d_model"] // r["n_heads"]
        assert r["kv_bytes_per_token"] == 2 * r["n_kv_heads"] * head_dim * r["n_layers"] * 2, name
        # An untrained model sits at the uniform loss ln V (6.20 for this tokenizer's 491 tokens; after one
        # step 6.06-6.12); 16 steps measured 5.18 (gpt2) and 5.29 (llama). The unigram baseline (3.98) is
        # out of reach at this budget.
        assert r["val_loss"] < res["uniform_loss"] - 0.5, (name, r["val_loss"], res["uniform_loss"])
        assert r["tokens_per_s"] > 0 and abs(r["params"] - 60_000) / 60_000 < 0.5
        assert (out / name / "metrics.jsonl").is_file()
    assert res["uniform_loss"] == pytest.approx(math.log(lmzoo.load_tokenizer(out / "tokenizer").vocab_size))
    assert res["unigram_loss"] < res["uniform_loss"] - 1  # token frequencies alone already beat uniform
    assert rows["llama"]["n_kv_heads"] < rows["gpt2"]["n_kv_heads"]  # LLaMA's tiny config has GQA
    assert (out / "compare.md").read_text().count("|") > 20


@pytest.mark.parametrize("extra,message", [
    (["--families", "llama", "bert"], "'bert' is a"),
    (["--families", "llama", "nope"], "unknown model family 'nope'"),
    (["--families", "llama", "gpt2", "llama"], "['llama'] given more than once"),
    (["--families", "llama", "--layers", "0"], "--layers must be at least 1, got 0"),
    (["--families", "llama", "--tokens", "0"], "--tokens must be at least 1"),
    (["--families", "llama", "--data", "/no/such.txt"], "--data: /no/such.txt: no such file"),
])
def test_every_argument_is_checked_before_any_work(extra, message, tmp_path, capsys):
    """`--families llama bert` used to train llama before refusing bert."""
    out = tmp_path / "lab"
    assert main(["compare-archs", "--tiny", "--out", str(out), "--no-progress", *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # no tokenizer, no run folder: nothing was done
