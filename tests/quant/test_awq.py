"""AWQ on one layer: with a few salient input channels, scaling them before rounding (then clipping)
beats round-to-nearest on the output error at the same grid; folding keeps the float model unchanged."""

import pytest
import torch
from torch import nn

import lmzoo
from lmzoo.models.llama.config import LlamaConfig
from lmzoo.quant import IntLinear, quantize
from lmzoo.quant.awq import search_clip, search_scale
from lmzoo.quant.uniform import rtn


def salient_inputs(n=2048, d=256, salient=(7, 50, 201), factor=30.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, list(salient)] *= factor
    return x


def test_awq_beats_rtn_with_salient_channels():
    x = salient_inputs()
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    s, alpha = search_scale([w], x, 4, 128)
    assert alpha > 0 and s[[7, 50, 201]].min() > s.median() * 3  # the salient channels get the big scales
    ws = w * s
    m = search_clip(ws, x / s, 4, 128)
    iw = rtn(torch.clamp(ws.view(128, 2, 128), -m, m).view(128, 256), 4, 128, sym=False)
    w_awq = iw.dequantize() / s
    w_rtn = rtn(w, 4, 128, sym=False).dequantize()
    err = lambda wh: float((x @ (w - wh).t()).norm() / (x @ w.t()).norm())  # noqa: E731
    assert err(w_awq) < 0.7 * err(w_rtn), (err(w_awq), err(w_rtn))


def test_awq_folds_into_norms_and_linears_and_falls_back_to_input_scales():
    torch.manual_seed(0)
    # GQA: v_proj (2 heads) cannot fold into o_proj (4 heads), so o_proj keeps an input scale
    cfg = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_positions=64)
    model = lmzoo.build(cfg).eval()
    norms_before = model.layers[0].attn_norm.weight.clone()
    calib = [torch.randint(0, 64, (2, 32)) for _ in range(2)]
    quantize(model, "awq", group_size=64, calibration=calib)
    layer = model.layers[0]
    assert not torch.equal(layer.attn_norm.weight, norms_before)  # q/k/v's scales went into the norm
    assert all(isinstance(m, IntLinear) and m.layout == "awq" for m in layer.modules() if hasattr(m, "qweight"))
    assert layer.attn.o_proj.input_scale is not None  # GQA: no fold
    assert layer.mlp.down_proj.input_scale is None and layer.attn.q_proj.input_scale is None  # folded


def test_awq_on_gpt2_scales_the_input_of_down_proj_after_the_gelu():
    from lmzoo.models.gpt2.config import GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, d_model=64, n_layers=1, n_heads=4, d_ff=256, max_positions=64)
    model = lmzoo.build(cfg).eval()
    ids = torch.randint(0, 64, (2, 16))
    ref = model(ids).logits
    quantize(model, "awq", group_size=64, calibration=[torch.randint(0, 64, (2, 32))])
    layer = model.layers[0]
    assert layer.mlp.down_proj.input_scale is not None  # GeLU between up and down: nothing to fold into
    assert layer.attn.o_proj.input_scale is None and layer.mlp.up_proj.input_scale is None  # v -> o, ln_2 -> up
    assert (model(ids).logits - ref).norm() / ref.norm() < 0.1


class _Tokens:
    """What ``model_config`` asks of a tokenizer: a size and ids for the special tokens it names."""

    vocab_size, name = 512, "test"

    def token_to_id(self, token):
        return 500 + sum(map(ord, token)) % 12


def _tiny(family):
    from lmzoo.stages.pretrain import load_config, model_config

    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    return model_config(load_config(root / "configs" / family / "tiny.yaml")["model"], _Tokens())[1]


# d_ff 344 = 8 · 43 is divided by none of 128, 64, 32: per-channel; 128 and 512 keep 128
TINY_AWQ_GROUP = {"llama": None, "chatglm2": None, "deepseek_v2": None, "gpt2": 128, "bloom": 128, "chatglm": 128}


def test_every_shipped_tiny_decoder_config_is_covered():
    from lmzoo.errors import LmzooError
    from lmzoo.quant.calibrate import quantizable

    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    decoders = set()
    from lmzoo.models.registry import families

    for path in root.glob("configs/*/tiny.yaml"):
        if path.parent.name not in families():  # configs/sft/ and other stages' folders
            continue
        try:
            quantizable(lmzoo.build(_tiny(path.parent.name)))
            decoders.add(path.parent.name)
        except LmzooError:  # bert, t5: no decoder layers to quantize
            pass
    assert decoders == set(TINY_AWQ_GROUP)


@pytest.mark.parametrize("family", sorted(TINY_AWQ_GROUP))
def test_awq_default_group_divides_every_layer_of_the_shipped_tiny_configs(family):
    from lmzoo.quant.calibrate import quantizable
    from lmzoo.quant.registry import METHODS, fitting_group

    widths = {n: lin.in_features for n, lin in quantizable(lmzoo.build(_tiny(family))).items()}
    gs, note = fitting_group(METHODS["awq"], widths)
    assert gs == TINY_AWQ_GROUP[family]
    assert (note is None) == (gs == 128)
    assert all(k % (gs or k) == 0 for k in widths.values())


def test_awq_with_defaults_quantizes_the_tiny_llama_config(tmp_path, capsys):
    torch.manual_seed(0)
    model = lmzoo.build(_tiny("llama")).eval()
    ids = torch.randint(0, 512, (1, 24))
    ref = model(ids).logits
    quantize(model, "awq", calibration=[torch.randint(0, 512, (1, 32))], n_grid=4)  # a coarse search: fast
    assert "does not divide in_features 344 of layers.0.mlp.down_proj" in capsys.readouterr().err
    assert model.quantization_config["group_size"] == -1
    down = model.layers[0].mlp.down_proj
    assert isinstance(down, IntLinear) and down.layout == "awq" and down.group_size == 344
    out = model(ids).logits
    assert (out - ref).norm() / ref.norm() < 0.1
    back = lmzoo.load(lmzoo.save(model, tmp_path / "awq"))  # group_size -1 is read back as per channel
    torch.testing.assert_close(back(ids).logits, out)
