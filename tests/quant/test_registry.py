"""``lmzoo.quantize``: the methods are a registry, requests are checked before anything changes, and
only the decoder layers' linears are quantized (never the embeddings or the head)."""

import pytest
import torch
from torch import nn

import lmzoo
from lmzoo.errors import LmzooError
from lmzoo.models.llama.config import LlamaConfig
from lmzoo.quant import METHODS, QuantLinear

CFG = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_positions=64)


def model():
    torch.manual_seed(0)
    return lmzoo.build(CFG).eval()


def test_registry_and_export():
    assert set(METHODS) == {"rtn", "gptq", "awq", "int8", "nf4"}
    assert lmzoo.quantize is not None and "quantize" in lmzoo.__all__


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="hqq"), r"unknown quantization method 'hqq'; known: \['awq', 'gptq', 'int8', 'nf4', 'rtn'\]"),
    (dict(method="gptq", bits=3, calibration=[torch.zeros(1, 4, dtype=torch.long)]), r"supports bits \[2, 4, 8\], got 3"),
    (dict(method="awq", bits=8), r"supports bits \[4\]"),
    (dict(method="int8", bits=4), r"supports bits \[8\]"),
    (dict(method="rtn", group_size=48), r"supports group_size None \(per channel\), 32, 64, 128; got 48"),
    (dict(method="int8", group_size=64), r"supports group_size None"),
    (dict(method="gptq", calibration=[]), r"calibration data is empty"),
    (dict(method="awq"), r"needs calibration data"),
    (dict(method="gptq", calibration=[torch.tensor([1, 2, 99])]), r"outside the vocabulary \[0, 64\)"),
    (dict(method="rtn", desc_act=True), r"no option\(s\) \['desc_act'\]; its options: \['sym'\]"),
])
def test_bad_requests_fail_before_anything_changes(kwargs, match):
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(LmzooError, match=match):
        lmzoo.quantize(m, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not any(isinstance(x, QuantLinear) for x in m.modules())


def test_only_decoder_linears_and_skip():
    m = lmzoo.quantize(model(), "rtn", group_size=32, skip=("down_proj",))
    assert type(m.lm_head) is nn.Linear and type(m.embed) is nn.Embedding
    assert type(m.layers[0].mlp.down_proj) is nn.Linear
    assert sum(isinstance(x, QuantLinear) for x in m.modules()) == 2 * 6
    with pytest.raises(LmzooError, match="already quantized"):
        lmzoo.quantize(m, "rtn")


def test_small_layers_take_one_group_when_group_size_exceeds_them():
    m = lmzoo.quantize(model(), "gptq", calibration=[torch.randint(0, 64, (1, 16))])  # 128 > in_features 64
    q = m.layers[0].attn.q_proj
    assert q.group_size == 128 and q.scales.shape == (1, 64)
    with pytest.raises(LmzooError, match="does not divide in_features 64"):  # AWQ needs whole groups
        lmzoo.quantize(model(), "awq", group_size=128, calibration=[torch.randint(0, 64, (1, 16))])
    # ... so its default takes the largest of 128, 64, 32 that divides every width (64 and 128 here)
    m = lmzoo.quantize(model(), "awq", calibration=[torch.randint(0, 64, (1, 16))], n_grid=2)
    assert m.quantization_config["group_size"] == 64
    assert {x.group_size for x in m.modules() if isinstance(x, QuantLinear)} == {64}
