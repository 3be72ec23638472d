"""DeepNorm: the constants, the residual of TransformerLayer(placement='deepnorm'), the init gains."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmzoo.nn.attention import Attention, AttnInputs
from lmzoo.nn.mlp import MLP
from lmzoo.nn.norms import LayerNorm, deepnorm_alpha, deepnorm_beta, deepnorm_init_
from lmzoo.nn.transformer import TransformerLayer


def test_constants_are_glm130b_s():
    # GLM-130B / ChatGLM-6B: alpha = (2N)^(1/2), beta = (2N)^(-1/2); 28 layers -> sqrt(56)
    assert deepnorm_alpha(28) == pytest.approx(7.483314773547883)
    assert deepnorm_beta(28) == pytest.approx(1 / 7.483314773547883)


def test_deepnorm_layer_is_alpha_times_normed_input_plus_sublayer():
    torch.manual_seed(0)
    D = 16
    attn, mlp = Attention(D, 2, qkv_bias=True, out_bias=True), MLP(D, 32)
    n1, n2 = LayerNorm(D), LayerNorm(D)
    for n in (n1, n2):
        nn.init.normal_(n.weight, 1.0, 0.2), nn.init.normal_(n.bias, 0.0, 0.2)
    layer = TransformerLayer(attn, mlp, n1, n2, placement="deepnorm", alpha=3.0)
    x = torch.randn(2, 5, D) * 4
    inp = AttnInputs(is_causal=True)
    y1 = F.layer_norm(x, (D,), n1.weight, n1.bias, 1e-5)
    h = 3.0 * y1 + attn(y1, inp)
    y2 = F.layer_norm(h, (D,), n2.weight, n2.bias, 1e-5)
    want = 3.0 * y2 + mlp(y2)
    torch.testing.assert_close(layer(x, inp, 0), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        TransformerLayer(attn, mlp, n1, n2, placement="pre", alpha=2.0)


def test_init_gains():
    torch.manual_seed(0)
    a, b = nn.Linear(256, 512), nn.Linear(256, 512)
    deepnorm_init_([a], [b], beta=0.25)
    xavier = (2 / (256 + 512)) ** 0.5
    assert a.weight.std().item() == pytest.approx(0.25 * xavier, rel=0.05)
    assert b.weight.std().item() == pytest.approx(xavier, rel=0.05)
    assert a.bias.abs().max() == 0 and b.bias.abs().max() == 0
