"""GPTQ on one layer: with correlated inputs it beats round-to-nearest on the output error ‖WX − ŴX‖
at the same bits and grid; its pieces (damped Cholesky, act-order, groups) behave as the paper says."""

import pytest
import torch

from lmzoo.errors import LmzooError
from lmzoo.quant.gptq import gptq_weight, inverse_hessian_factor
from lmzoo.quant.uniform import rtn


def correlated_inputs(n=4096, d=128, seed=0):
    """Tokens whose features are strongly correlated and unevenly scaled, as a transformer's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + 2.0 * torch.eye(d)
    scale = torch.exp(torch.randn(d, generator=g))  # feature scales over ~e^±2
    z = torch.randn(n, 16, generator=g) @ torch.randn(16, d, generator=g)  # a low-rank shared part
    return (torch.randn(n, d, generator=g) + z) @ mix * scale


def out_err(w, w_hat, x):
    return float((x @ (w - w_hat).t()).norm() / (x @ w.t()).norm())


@pytest.mark.parametrize("bits,gs,sym,desc_act", [(4, None, True, False), (4, 32, False, False), (2, 64, True, True),
                                                  (4, 32, True, True)])
def test_gptq_beats_rtn_on_output_error(bits, gs, sym, desc_act):
    x = correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    H = 2 * x.t().double() @ x.double() / x.shape[0]
    q = gptq_weight(w, H, bits, gs, sym=sym, desc_act=desc_act)
    r = rtn(w, bits, gs, sym=sym)
    e_gptq, e_rtn = out_err(w, q.dequantize(), x), out_err(w, r.dequantize(), x)
    assert e_gptq < 0.75 * e_rtn, (e_gptq, e_rtn)
    assert q.codes.max() < 2**bits and q.scales.dtype == torch.float16
    if desc_act:
        assert not torch.equal(q.g_idx, torch.arange(128, dtype=torch.int32) // gs)  # groups follow act-order


def test_inverse_hessian_factor_is_cholesky_of_the_damped_inverse():
    x = correlated_inputs(n=512, d=32)
    H = 2 * x.t().double() @ x.double() / 512
    U = inverse_hessian_factor(H, 0.01)
    damped = H + 0.01 * torch.diag(H).mean() * torch.eye(32, dtype=torch.float64)
    torch.testing.assert_close(U.t() @ U, torch.linalg.inv(damped), rtol=1e-8, atol=1e-10)
    assert torch.equal(U, U.triu())


def test_dead_inputs_and_singular_hessians():
    x = correlated_inputs(n=256, d=32)
    x[:, 5] = 0  # a feature that is never active: its weights are irrelevant, and zeroed
    x = torch.cat([x, x[:, :1]], 1)  # a duplicated feature makes H singular; damping copes
    H = 2 * x.t().double() @ x.double() / 256
    q = gptq_weight(torch.randn(8, 33), H, 4, None)
    assert torch.all(q.dequantize()[:, 5] == 0)
    with pytest.raises(LmzooError, match="not positive definite"):
        inverse_hessian_factor(-torch.eye(4, dtype=torch.float64), 0.01)
