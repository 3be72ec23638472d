"""Widths that do not fill a packed layout's int32 words: Karpathy's TinyStories-260K LLaMA (d_model 64,
5 layers, 8 query / 4 key-value heads, d_ff 172, vocab 512). At 4 bits a word holds 8 codes and
172 = 8 · 21 + 4: GPTQ's qzeros (gate/up, 172 outputs) and qweight (down, 172 inputs) and AWQ's
qweight/qzeros (gate/up) cannot hold them. Those linears stay in float, are named in the checkpoint
where the loaders look, and everything else quantizes, saves and loads. 8 bits (4 per word) fits,
and torch's int8 kernel must agree with dequantize-then-matmul on these K = 172 / N = 172 shapes."""

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lmzoo
from lmzoo.errors import LmzooError
from lmzoo.models.llama.config import LlamaConfig
from lmzoo.quant import IntLinear, quantize, set_kernel
from lmzoo.quant.calibrate import quantizable

TINYSTORIES_260K = LlamaConfig(vocab_size=512, d_model=64, n_layers=5, n_heads=8, n_kv_heads=4, d_ff=172,
                               max_positions=128)
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# (method, bits, group_size, options); 32 divides d_model 64 (64 would be one group per row there).
# No group size divides down_proj's in_features 172, which AWQ's layout needs whole groups of (an
# explicit group_size that does not divide stays an error), so grouped AWQ skips down_proj.
CASES = [("rtn", 4, None, {}), ("rtn", 4, 32, {}), ("gptq", 4, None, {}), ("gptq", 4, 32, {}),
         ("awq", 4, None, {"n_grid": 4}), ("awq", 4, 32, {"n_grid": 4, "skip": ("down_proj",)}), ("rtn", 8, None, {})]


def tinystories():
    torch.manual_seed(0)
    return lmzoo.build(TINYSTORIES_260K).eval()


def calibration():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (2, 32), generator=g) for _ in range(2)]


def unpackable(model, method, bits):
    """Written from the layouts' buffer shapes (docs/quantization.md), not from lmzoo.quant.packing:
    GPTQ packs qweight (in·b/32, out) and qzeros (groups, out·b/32); AWQ qweight (in, out·b/32) and
    qzeros (groups, out·b/32)."""
    per = 32 // bits
    return {n for n, lin in quantizable(model).items()
            if lin.out_features % per or (method != "awq" and lin.in_features % per)}


def per_channel_rtn_error(w, bits):
    """‖ŵ − w‖ / ‖w‖ for symmetric round-to-nearest with one absmax scale per row: the coarsest grid."""
    maxq = 2**bits - 1
    s = 2 * w.abs().amax(1, keepdim=True) / maxq
    z = (maxq + 1) / 2
    wh = s * (torch.clamp(torch.round(w / s) + z, 0, maxq) - z)
    return float((wh - w).norm() / w.norm())


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("method,bits,gs,opts", CASES, ids=[f"{m}-w{b}g{g or 'ch'}" for m, b, g, _ in CASES])
def test_tinystories_shapes_quantize_keep_unpackable_linears_and_round_trip(tmp_path, capsys, method, bits, gs, opts):
    model = tinystories()
    original = {n: lin.weight.detach().clone() for n, lin in quantizable(model).items()}
    ids = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(2))
    ref = model(ids).logits
    skipped = {n for n in original if any(s in n for s in opts.get("skip", ()))}
    kept = unpackable(model, method, bits) - skipped
    quantize(model, method, bits=bits, group_size=gs, calibration=calibration(), **opts)
    set_kernel(model, "dequant")  # torch's int8 kernel runs in a child (last test): a crash cannot kill pytest

    # exactly the linears that cannot be packed (plus the skipped) stay float; all others are quantized
    floats = {n for n in original if type(model.get_submodule(n)) is nn.Linear}
    assert floats == kept | skipped
    assert all(isinstance(model.get_submodule(n), IntLinear) for n in set(original) - floats)
    assert kept == ({f"layers.{i}.{m}" for i in range(5) for m in MLP[:2 if method == "awq" else 3]} if bits == 4
                    else set())  # 8 bits: 4 codes per word, 172 = 4 · 43 fits
    if method != "awq":  # untouched (AWQ folds down_proj's scales into up_proj's rows, by design)
        assert all(torch.equal(model.get_submodule(n).weight, original[n]) for n in kept)
    # one line on stderr names them and why; the same line is kept for the report
    lines = [line for line in capsys.readouterr().err.splitlines() if "in float" in line]
    if kept:
        total = len(original) - len(skipped)
        assert len(lines) == 1 and lines[0].startswith(f"{method}: keeping {len(kept)} of {total} linears in float")
        assert "mlp.gate_proj, mlp.up_proj of layers 0-4 (out_features 172 is not a multiple of 8" in lines[0]
        assert ("mlp.down_proj of layers 0-4 (in_features 172" in lines[0]) == (method != "awq")
        assert model.quantization_config["meta"]["kept_in_float"] == lines[0]
    else:
        assert not lines and "kept_in_float" not in model.quantization_config["meta"]

    # close to float: ε is the largest relative weight error of per-channel symmetric RTN at these bits
    # (the coarsest grid) over the linears that were quantized: 0.068 at 4 bits, 0.0040 at 8. Each of
    # them perturbs its own output by about that much, and the float embeddings, head and kept MLPs
    # carry the rest of the residual stream, so the logits move by less (measured 0.035-0.038 at 4
    # bits, 0.0025 at 8)
    eps = max(per_channel_rtn_error(original[n], bits) for n in set(original) - floats)
    out = model(ids).logits
    assert rel(out, ref) < eps, (rel(out, ref), eps)

    # save -> load: the same logits; kept linears are float tensors in the checkpoint
    path = lmzoo.save(model, tmp_path / "q")
    state = load_file(path / "model.safetensors")
    for n in original:
        hf = "model." + n.replace(".attn.", ".self_attn.")
        assert (f"{hf}.weight" in state) == (n in floats) and (f"{hf}.qweight" in state) == (n not in floats)
    back = set_kernel(lmzoo.load(path), "dequant")
    assert torch.equal(back(ids).logits, out)
    assert back.quantization_config == model.quantization_config  # with the note, which the report reads
    assert {n for n in original if type(back.get_submodule(n)) is nn.Linear} == floats
    torch.testing.assert_close(lmzoo.generate(back, ids[:1, :4], max_new_tokens=4),
                               lmzoo.generate(model, ids[:1, :4], max_new_tokens=4))


def test_the_report_lists_the_linears_kept_in_float():
    from lmzoo.quant.report import table

    note = "rtn: keeping 15 of 35 linears in float, unquantized (...): mlp.gate_proj, mlp.up_proj of layers 0-4 (...)"
    md = table([{"name": "float32", "perplexity": 9.0}, {"name": "rtn w4", "perplexity": 9.5, "kept_in_float": note},
                {"name": "rtn w8", "perplexity": 9.1}])
    assert md.endswith(f"\n\nKept in float:\n- rtn w4: {note}")


def _hf_linears(path):
    """(full name, name inside its decoder layer) of every linear in transformers' own model of this
    config, built on the meta device: the names its loaders match against."""
    import transformers

    hf = json.loads((path / "config.json").read_text())
    hf.pop("quantization_config")
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(hf))
    return [(n, n.split(".", 3)[3]) for n, x in m.named_modules()
            if isinstance(x, nn.Linear) and n.startswith("model.layers.")]


@pytest.mark.parametrize("method,opts", [("rtn", {}), ("awq", {"n_grid": 2}),
                                         ("awq", {"n_grid": 2, "skip": ("down",)})])
def test_the_ecosystems_loaders_would_leave_exactly_the_float_linears_unconverted(tmp_path, method, opts):
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = quantize(tinystories(), method, bits=4, group_size=None, calibration=calibration(), **opts)
    path = lmzoo.save(model, tmp_path / "q")
    state = load_file(path / "model.safetensors")
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    linears = _hf_linears(path)
    quantized = {n: f"{n}.qweight" in state for n, _ in linears}
    assert 0 < sum(quantized.values()) < len(linears)
    for full, inner in linears:
        if method == "awq":
            # transformers 5.24 (quantizer_awq -> replace_with_awq_linear) converts what should_convert_module allows
            assert should_convert_module(full, q["modules_to_not_convert"]) == quantized[full], full
            # AutoAWQ (exclude_layers_to_not_quantize): skipped when a key is in the name inside the layer
            assert (not any(k in inner for k in q["modules_to_not_convert"])) == quantized[full], full
        else:
            # optimum's GPTQQuantizer.convert_model (transformers' GPTQ loader): keeps names ending with an entry
            allow = sum(q["modules_in_block_to_quantize"], [])
            assert any(full.endswith(k) for k in allow) == quantized[full], full
            # GPTQModel: a "-:" pattern of dynamic matched from the start means "not quantized"
            negative = [p[2:] for p in q["dynamic"] if p.startswith("-:")]
            assert (not any(re.match(p, full) for p in negative)) == quantized[full], full


def test_a_checkpoint_that_fuses_a_kept_linear_keeps_its_partners_in_float(tmp_path, monkeypatch, capsys):
    """If a family's checkpoint stored q, k and v in one tensor and only k, v could not be packed,
    q must stay in float too, or the fused tensor could not be written (no shipped family fuses
    linears of different widths on save; a patched key map stands in for one)."""
    import dataclasses

    import lmzoo.interop.checkpoint as checkpoint
    from lmzoo.interop.convert import split_rows

    cfg = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=16, n_kv_heads=1, d_ff=128, max_positions=64)
    torch.manual_seed(0)
    model = lmzoo.build(cfg).eval()  # head_dim 4: q has 64 outputs (fits), k and v 4 (do not)
    real = checkpoint._keymap

    def fused(m):
        km = real(m)
        keep = [r for r in km.rules if not any(p in k for k in r.ours for p in ("q_proj", "k_proj", "v_proj"))]
        qkv = split_rows("model.layers.{i}.self_attn.qkv_proj.weight",
                         [f"layers.{{i}}.attn.{p}_proj.weight" for p in "qkv"], (64, 4, 4))
        return dataclasses.replace(km, rules=keep + [qkv])

    monkeypatch.setattr(checkpoint, "_keymap", fused)
    quantize(model, "rtn", bits=4, group_size=None)
    floats = {n for n, m in quantizable(model).items()}
    assert floats == {f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qkv"}
    assert "stored in one tensor (model.layers.0.self_attn.qkv_proj)" in capsys.readouterr().err
    state = load_file(lmzoo.save(model, tmp_path / "q") / "model.safetensors")  # not "fuses ... not all quantized"
    assert state["model.layers.0.self_attn.qkv_proj.weight"].shape == (72, 64)
    assert "model.layers.0.self_attn.o_proj.qweight" in state


def test_nothing_to_pack_is_an_error_and_the_module_refuses_unpackable_widths():
    cfg = LlamaConfig(vocab_size=64, d_model=36, n_layers=1, n_heads=6, n_kv_heads=2, d_ff=172, max_positions=64)
    with pytest.raises(LmzooError, match="no linear fits rtn's gptq layout at 4 bits"):
        quantize(lmzoo.build(cfg).eval(), "rtn", bits=4)  # 36 = 8 · 4 + 4, 12, 172: nothing fits
    with pytest.raises(ValueError, match="out_features 172 is not a multiple of 8"):
        IntLinear(64, 172, False, bits=4, group_size=64, layout="gptq")
    with pytest.raises(ValueError, match="in_features 172 is not a multiple of 8"):
        IntLinear(172, 64, False, bits=4, group_size=172, layout="gptq_v2")
    IntLinear(172, 64, False, bits=4, group_size=172, layout="awq")  # AWQ packs along the outputs only


# torch._weight_int8pack_mm (bf16, CPU) reads K in blocks of 16 and dies with SIGSEGV past them
# (K = 172 unpadded: garbage at one row, SIGSEGV at 5). Run in a child so a crash fails the test.
INT8_SHAPES = r"""
import json, sys, torch
from torch import nn
import lmzoo
from lmzoo.models.llama.config import LlamaConfig
from lmzoo.quant import quantize, set_kernel
from lmzoo.quant.gptq import int_linear
from lmzoo.quant.uniform import rtn
torch.manual_seed(0)
out = {"linears": []}
for K, N in [(172, 172), (172, 64), (64, 172)]:
    lin = nn.Linear(K, N, bias=False)
    m = int_linear(rtn(lin.weight, 8, None, sym=True), lin, "gptq")
    for rows in (1, 5):
        x = torch.randn(rows, K)
        fast = m(x).double()
        ref = x.bfloat16().double() @ m.dequantize().double().t()  # the kernel's bf16 input, exact sum
        # the kernel returns bf16: each value within half an ulp of bf16 (<= 2^-8 of itself), before the
        # float32 scale (2^-24)
        excess = float(((fast - ref).abs() - (2**-8 + 2**-22) * ref.abs()).max())
        out["linears"].append({"K": K, "N": N, "rows": rows, "excess": excess, "padded_k": m._int8[0].shape[1]})
cfg = LlamaConfig(vocab_size=512, d_model=64, n_layers=5, n_heads=8, n_kv_heads=4, d_ff=172, max_positions=128)
model = quantize(lmzoo.build(cfg).eval(), "rtn", bits=8, group_size=None)
out["model"] = []
for B in (1, 5):
    ids = torch.randint(0, 512, (B, 12))
    with torch.no_grad():
        fast = model(ids).logits
        slow = set_kernel(model, "dequant")(ids).logits
        set_kernel(model, "auto")
    out["model"].append(float((fast - slow).norm() / slow.norm()))
out["generated"] = lmzoo.generate(model, torch.randint(0, 512, (5, 4)), max_new_tokens=6).shape[1]
print(json.dumps(out))
"""


def test_int8_kernel_on_k172_and_n172_equals_dequantize_then_matmul_within_rounding():
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", INT8_SHAPES], capture_output=True, text=True)
    assert proc.returncode == 0, f"return code {proc.returncode}: {proc.stderr[-1500:]}"
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for row in r["linears"]:
        assert row["padded_k"] == -(-row["K"] // 16) * 16, row  # 172 -> 176 zero-padded columns
        assert row["excess"] <= 0, row
    # whole model, kernel vs dequantize: the same weights; only the bf16 rounding of the activations
    # entering each of the 35 linears differs (2^-9 relative each; measured 0.002)
    assert max(r["model"]) < 2**-7, r["model"]
    assert r["generated"] == 10
