"""`lmzoo kvcache`: the formula equals the bytes of a real cache after a prefill, for every registered
family; the printed numbers; --compare; DeepSeek-V2's reduction against its dense baseline; the
measurement at a full context, in chunks, with rows dropped, and refused when it cannot be done."""

import pytest
import torch

import lmzoo
from lmzoo.cli import kvcache
from lmzoo.cli.main import main
from lmzoo.interop.checkpoint import build
from lmzoo.models.registry import families

FAMILIES = sorted(families())


def _smallest_preset(fam) -> str:
    return min(fam.presets, key=lambda n: build(fam.presets[n], device="meta").num_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_formula_equals_measured_bytes_for_every_family(family):
    fam = families()[family]
    if not fam.presets:
        pytest.skip(f"{family}: no preset to count")
    name = _smallest_preset(fam)
    if not hasattr(build(fam.presets[name], device="meta"), "new_cache"):
        pytest.skip(f"{family} ({fam.shape}): its model keeps no KV cache")
    r = kvcache.account(name, tokens=6, batch=2, dtype="bf16", source_tokens=5)
    m = r["measured"]
    if "the prefill refused a random prompt" in m.get("error", ""):
        pytest.skip(f"{family}: {m['error']}")
    assert "error" not in m, m["error"]
    assert m["bytes"] == r["formula_bytes"] > 0
    # and the formula is the per-layer values the model reports, times tokens, batch and 2 bytes
    model = build(fam.presets[name], device="meta")
    if not r["cross_groups"]:
        assert r["formula_bytes"] == model.kv_bytes_per_token(2) * 6 * 2


def test_known_formulas_by_hand():
    r = kvcache.account("llama2-70b", tokens=1000, batch=3, dtype="fp16", measured=False)
    assert r["formula_bytes"] == 2 * 8 * 128 * 1000 * 80 * 3 * 2  # GQA: 2·n_g·d_h·n_tokens·layers
    assert r["groups"][0]["shape"].kind == "GQA (8 groups)"
    # llama3-8b: 32 query heads in 8 K/V groups of 4; the label names the 8 of n_g, which the line
    # "GQA-4, 2 · n_g · d_h = 2 · 8 · 128" used to contradict
    shape = kvcache.account("llama3-8b", tokens=16, measured=False)["groups"][0]["shape"]
    assert shape.kind == "GQA (8 groups)" and shape.numbers == "2 · 8 · 128"
    r = kvcache.account("deepseek-v2", tokens=1000, batch=1, dtype="bf16", measured=False)
    assert r["formula_bytes"] == (512 + 64) * 1000 * 60 * 2  # MLA: (d_c + d_h^R)·n_tokens·layers
    assert r["groups"][0]["shape"].formula == "(d_c + d_h^R)"


def test_cli_prints_formula_and_measurement(capsys):
    assert main(["kvcache", "--model", "deepseek-v2-lite", "--tokens", "6", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "(d_c + d_h^R) = (512 + 64) = 576 values/token" in out
    assert f"{576 * 6 * 27 * 2 * 2:,} B" in out and "agrees to the byte" in out
    assert "LatentCache.nbytes" in out


def test_cli_reads_a_checkpoint_directory(tmp_path, capsys):
    from lmzoo.models.llama.config import LlamaConfig

    model = lmzoo.build(LlamaConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48,
                                    max_positions=32))
    lmzoo.save(model, tmp_path / "m")
    assert main(["kvcache", "--model", str(tmp_path / "m"), "--tokens", "10", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert f"{2 * 2 * 8 * 10 * 3 * 4:,} B" in out and "agrees to the byte" in out
    assert main(["kvcache", "--model", str(tmp_path / "m"), "--tokens", "33"]) == 1  # past the context
    assert "context of 32" in capsys.readouterr().err


def test_compare_plot_and_the_paper_ratio(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp.png"
    assert main(["kvcache", "--model", "deepseek-v2", "--tokens", "4096", "--no-measure", "--compare",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    v = kvcache.variants("deepseek-v2")
    mla, mqa = v["MLA (d_c 512 + d_h^R 64)"], v["MQA"]
    assert mla / mqa == 2.25  # the paper's Table 1: MLA caches as much as GQA with 2.25 groups
    assert v["MHA (128 heads × 128)"] == 2 * 128 * 128 * 60
    assert "2.250" in capsys.readouterr().out


def test_deepseek_v2_reduction_against_deepseek_67b():
    """The paper's 93.3%: DeepSeek 67B (GQA, 8 K/V heads of 128, 95 layers) in BF16 against DeepSeek-V2's
    latent cache at ~6 bits per value (its deployment quantizes the KV cache, section 3.2.3)."""
    from lmzoo.models.llama.config import LlamaConfig

    ds67b = LlamaConfig(vocab_size=102400, d_model=8192, n_layers=95, n_heads=64, n_kv_heads=8, d_ff=22016)
    dense = sum(s.values for s in kvcache.cached_shapes(build(ds67b, device="meta"))[0])
    mla = sum(s.values for s in kvcache.cached_shapes(build("deepseek-v2", device="meta"))[0])
    assert (dense, mla) == (194_560, 34_560)
    assert round(1 - mla / dense, 4) == 0.8224  # MLA alone, both in BF16
    assert round(1 - mla * 6 / (dense * 16), 3) == 0.933  # with 6-bit cache values: the reported 93.3%


def test_full_context_of_llama2_70b_is_measured(capsys):
    """Issue 11: 4096 tokens (its whole context) used to say "measured: not done" and exit 0."""
    assert main(["kvcache", "--model", "llama2-70b", "--tokens", "4096"]) == 0
    out = capsys.readouterr().out
    formula = 2 * 8 * 128 * 4096 * 80 * 2  # 2 · n_g · d_h · n_tokens · layers · bf16 bytes = 1.25 GiB
    assert f"{formula:,} B (1.2 GiB)" in out
    assert f"{formula // 40:,} B on 2 layer(s) × 80/2 = {formula:,} B" in out and "agrees to the byte" in out


def test_a_measurement_that_cannot_be_done_exits_nonzero(capsys):
    assert main(["kvcache", "--model", "deepseek-v2", "--tokens", "163840"]) == 1
    out = capsys.readouterr().out
    assert f"{576 * 163840 * 60 * 2:,} B" in out  # the formula is still printed
    assert "measured: not done: a prefill of the cache costs about" in out and "--max-flops 3e+11" in out
    assert main(["kvcache", "--model", "deepseek-v2", "--tokens", "163840", "--no-measure"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("preset", ["chatglm-6b", "t5-small", "bloom-560m"])
def test_chunked_prefill_and_dropped_rows_still_agree(preset):
    """Prefill in chunks of a few tokens (prefix mask + [gMASK] <sop>, encoder-decoder, ALiBi) and with
    batch rows dropped to fit the budget: the scaled bytes are still the formula's."""
    _, _, cfg = kvcache.resolve_config(preset)
    tokens, source, batch = 12, 7, 3
    small = kvcache.small_instance(cfg, 64_000_000)
    one = kvcache.prefill_flops(build(small.replace(n_layers=1) if hasattr(small, "n_layers") else small,
                                      device="meta"), tokens, source)
    m = kvcache.measure(cfg, tokens, source, batch, torch.bfloat16, 64_000_000, max_flops=one * 1.5,
                        scratch_bytes=4 * 3 * 64 * 4)
    r = kvcache.account(preset, tokens, batch, "bf16", measured=False, source_tokens=source)
    assert m["chunks"] > 1 and m["batch_kept"] == 1 and m["layers_kept"] == 1
    assert m["bytes"] == r["formula_bytes"] == m["small_bytes"] * m["layers"] * batch
