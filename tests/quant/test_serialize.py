"""Quantized models save and load with identical logits, in the ecosystem's key names and layouts; a
checkpoint packed by loops written from AutoGPTQ's and AutoAWQ's code (not by lmzoo) loads, for a
plain layout (LLaMA) and for a fused Conv1D one (GPT-2's c_attn)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmzoo
from lmzoo.errors import ConfigError
from lmzoo.models.gpt2.config import GPT2Config
from lmzoo.models.llama.config import LlamaConfig
from lmzoo.quant import IntLinear, quantize

sys.path.insert(0, str(Path(__file__).parent))
from test_packing import ref_awq, ref_gptq_qweight, ref_gptq_qzeros  # noqa: E402

LLAMA = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_positions=64)
GPT2 = GPT2Config(vocab_size=64, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_positions=64)
CASES = [("rtn", {}), ("rtn", {"sym": False, "bits": 8, "group_size": None}), ("gptq", {"desc_act": True}),
         ("awq", {}), ("int8", {}), ("nf4", {})]


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}{i}" for i, (m, _) in enumerate(CASES)])
def test_save_load_identical_logits(tmp_path, cfg, method, kw):
    torch.manual_seed(0)
    model = lmzoo.build(cfg).eval()
    calib = [torch.randint(0, 64, (2, 32)) for _ in range(2)]
    kw = {"group_size": 32, **kw} if method in ("rtn", "gptq", "awq") else kw
    quantize(model, method, calibration=calib, **kw)
    ids = torch.randint(0, 64, (2, 12))
    out = lmzoo.save(model, tmp_path / "q")
    again = lmzoo.load(out)
    assert torch.equal(again(ids).logits, model(ids).logits)
    assert type(again.layers[1].mlp.down_proj) is type(model.layers[1].mlp.down_proj)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == model.quantization_config
    torch.testing.assert_close(lmzoo.generate(again, ids[:1, :4], max_new_tokens=5),
                               lmzoo.generate(model, ids[:1, :4], max_new_tokens=5))


def test_key_names_and_layouts(tmp_path):
    torch.manual_seed(0)
    calib = [torch.randint(0, 64, (2, 32))]
    g = quantize(lmzoo.build(GPT2).eval(), "gptq", group_size=32, calibration=calib)
    s = load_file(lmzoo.save(g, tmp_path / "g") / "model.safetensors")
    assert s["transformer.h.0.attn.c_attn.qweight"].shape == (64 * 4 // 32, 3 * 64)  # q/k/v fused back, (in/8, 3d)
    assert s["transformer.h.0.attn.c_attn.qzeros"].shape == (2, 3 * 64 // 8)
    assert s["transformer.h.0.attn.c_attn.scales"].dtype == torch.float16
    assert "transformer.h.0.attn.c_attn.bias" in s and "transformer.h.0.attn.c_attn.weight" not in s
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq" and cfg["group_size"] == 32

    a = quantize(lmzoo.build(LLAMA).eval(), "awq", group_size=32, calibration=calib)
    s = load_file(lmzoo.save(a, tmp_path / "a") / "model.safetensors")
    assert s["model.layers.0.mlp.gate_proj.qweight"].shape == (64, 128 // 8)  # (in, out/8)
    assert "model.layers.0.mlp.gate_proj.g_idx" not in s

    n = quantize(lmzoo.build(LLAMA).eval(), "nf4")
    s = load_file(lmzoo.save(n, tmp_path / "n") / "model.safetensors")
    assert {"model.layers.0.self_attn.q_proj.weight.absmax", "model.layers.0.self_attn.q_proj.weight.nested_absmax",
            "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"} <= set(s)
    i = quantize(lmzoo.build(LLAMA).eval(), "int8")
    s = load_file(lmzoo.save(i, tmp_path / "i") / "model.safetensors")
    assert s["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert s["model.layers.0.self_attn.q_proj.SCB"].shape == (64,)


def _rewrite(path, fn, qcfg):
    f = path / "model.safetensors"
    state = load_file(f)
    fn(state)
    save_file(state, f)
    hf = json.loads((path / "config.json").read_text())
    hf["quantization_config"] = qcfg
    (path / "config.json").write_text(json.dumps(hf))


def _codes(out_f, in_f, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2**bits, (out_f, in_f), generator=g), torch.randint(1, 2**bits, (in_f // 32, out_f), generator=g),
            (torch.rand(in_f // 32, out_f, generator=g) * 0.05 + 0.01).half())


def test_external_gptq_checkpoint_loads(tmp_path):
    """AutoGPTQ v1 layout (zeros stored minus one) with act-order g_idx, written by reference loops."""
    torch.manual_seed(0)
    path = lmzoo.save(lmzoo.build(LLAMA), tmp_path / "ext")
    expected = {}

    def pack(state):
        for i in range(LLAMA.n_layers):
            for name in ("self_attn.q_proj", "mlp.down_proj"):
                key = f"model.layers.{i}.{name}"
                out_f, in_f = state.pop(key + ".weight").shape
                codes, zeros, scales = _codes(out_f, in_f, 4, seed=i)
                g_idx = (torch.arange(in_f) // 32)[torch.randperm(in_f, generator=torch.Generator().manual_seed(9))]
                state[key + ".qweight"] = torch.tensor(ref_gptq_qweight(codes.t().tolist(), 4), dtype=torch.int32)
                state[key + ".qzeros"] = torch.tensor(ref_gptq_qzeros((zeros - 1).tolist(), 4), dtype=torch.int32)
                state[key + ".scales"], state[key + ".g_idx"] = scales, g_idx.int()
                expected[f"layers.{i}.{'attn.q_proj' if 'q_proj' in name else 'mlp.down_proj'}"] = \
                    scales.float()[g_idx].t() * (codes - zeros[g_idx].t())

    _rewrite(path, pack, {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False})
    model = lmzoo.load(path)
    for name, w in expected.items():
        m = model.get_submodule(name)
        assert isinstance(m, IntLinear) and m.layout == "gptq"
        torch.testing.assert_close(m.dequantize(), w, rtol=0, atol=0)
    assert type(model.layers[0].attn.k_proj) is torch.nn.Linear  # not in the checkpoint's quantized set
    model(torch.randint(0, 64, (1, 8)))


def test_external_awq_checkpoint_with_fused_conv1d_loads(tmp_path):
    """AutoAWQ GEMM layout for GPT-2's fused, Conv1D c_attn: the rows split into q, k and v."""
    torch.manual_seed(0)
    path = lmzoo.save(lmzoo.build(GPT2), tmp_path / "ext")
    ref = {}

    def pack(state):
        key = "transformer.h.0.attn.c_attn"
        in_f, out_f = state.pop(key + ".weight").shape  # Conv1D: (in, 3d)
        codes, zeros, scales = _codes(out_f, in_f, 4, seed=3)
        state[key + ".qweight"] = torch.tensor(ref_awq(codes.t().tolist()), dtype=torch.int32)  # (in, out/8)
        state[key + ".qzeros"] = torch.tensor(ref_awq(zeros.tolist()), dtype=torch.int32)
        state[key + ".scales"] = scales
        g = torch.arange(in_f) // 32
        ref["w"] = scales.float()[g].t() * (codes - zeros[g].t())  # (3d, in)

    _rewrite(path, pack, {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"})
    model = lmzoo.load(path)
    attn = model.layers[0].attn
    for j, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        torch.testing.assert_close(proj.dequantize(), ref["w"][64 * j:64 * (j + 1)], rtol=0, atol=0)
    resaved = load_file(lmzoo.save(model, tmp_path / "again") / "model.safetensors")
    assert torch.equal(resaved["transformer.h.0.attn.c_attn.qweight"], load_file(path / "model.safetensors")["transformer.h.0.attn.c_attn.qweight"])


def test_unsupported_quantization_configs_are_named(tmp_path):
    path = lmzoo.save(lmzoo.build(LLAMA), tmp_path / "m")
    for qcfg, match in (({"quant_method": "gptq", "bits": 3, "group_size": 32}, "bits is 3"),
                        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "'gemv'"),
                        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "'fp4'"),
                        ({"quant_method": "hqq"}, "'hqq'")):
        _rewrite(path, lambda s: None, qcfg)
        with pytest.raises(ConfigError, match=match):
            lmzoo.load(path)
    _rewrite(path, lambda s: None, {"quant_method": "gptq", "bits": 4, "group_size": 32})
    with pytest.raises(lmzoo.CheckpointError, match="no module holds"):
        lmzoo.load(path)



def test_fused_checkpoint_modules_must_be_quantized_together(tmp_path):
    torch.manual_seed(0)
    model = quantize(lmzoo.build(GPT2).eval(), "rtn", group_size=32, skip=("q_proj",))
    with pytest.raises(lmzoo.CheckpointError, match="not all quantized"):  # c_attn holds q, k and v
        lmzoo.save(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
