import pytest
import torch

from lmzoo.nn.attention import KERNELS, Attention, AttnInputs, get_kernel, repeat_kv
from lmzoo.nn.masks import decoder_mask, to_additive


def _qkv(B=2, H=8, Hkv=2, Tq=5, Tk=9, D=16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, Tq, D, generator=g), torch.randn(B, Hkv, Tk, D, generator=g),
            torch.randn(B, Hkv, Tk, D, generator=g))


@pytest.mark.parametrize("hkv", [8, 2, 1])
def test_eager_equals_sdpa_with_masks(hkv):
    q, k, v = _qkv(Hkv=hkv)
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, :3] = 0
    mask = decoder_mask(am, 5, 9)
    for m in (mask, to_additive(mask, torch.float32), None):
        a = KERNELS["eager"](q, k, v, m, False, 0.25, 0.0)
        b = KERNELS["sdpa"](q, k, v, m, False, 0.25, 0.0)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_eager_equals_sdpa_causal_and_reference():
    q, k, v = _qkv(Hkv=2, Tq=6, Tk=6)
    a = KERNELS["eager"](q, k, v, None, True, 0.25, 0.0)
    b = KERNELS["sdpa"](q, k, v, None, True, 0.25, 0.0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # written out independently: softmax over the visible keys of each query
    kk, vv = repeat_kv(k, 4), repeat_kv(v, 4)
    t = 3
    w = torch.softmax(torch.einsum("bhd,bhkd->bhk", q[:, :, t], kk[:, :, : t + 1]) * 0.25, -1)
    ref = torch.einsum("bhk,bhkd->bhd", w, vv[:, :, : t + 1])
    torch.testing.assert_close(a[:, :, t], ref, atol=1e-5, rtol=0)


def test_gqa_shares_kv_heads():
    """With n_kv_heads=2 of 8, query heads 0-3 read K/V head 0 and 4-7 read head 1."""
    q, k, v = _qkv(Hkv=2)
    out = KERNELS["eager"](q, k, v, None, False, 1.0, 0.0)
    solo = KERNELS["eager"](q[:, 5:6], k[:, 1:2], v[:, 1:2], None, False, 1.0, 0.0)
    torch.testing.assert_close(out[:, 5:6], solo)


def test_attention_module_kinds_and_validation():
    assert Attention(64, 8, 8).kind == "MHA"
    assert Attention(64, 8, 2).kind == "GQA-2"  # 2 groups (K/V heads) of 4 query heads, the GQA paper's GQA-2
    assert Attention(64, 8, 1).kind == "MQA"
    assert Attention(64, 8, 1).k_proj.weight.shape == (8, 64)
    with pytest.raises(ValueError, match="n_kv_heads"):
        Attention(64, 8, 3)
    with pytest.raises(ValueError, match="unknown"):
        get_kernel("nope")


def test_flash_kernel_refused_without_package_or_gpu():
    from lmzoo.nn.attention import flash_available

    if flash_available():
        pytest.skip("flash-attn and a GPU are present")
    with pytest.raises(ValueError, match="flash-attn"):
        Attention(64, 8, 2, kernel="flash")


def test_module_eager_equals_sdpa():
    torch.manual_seed(0)
    a = Attention(64, 8, 2, kernel="eager")
    x = torch.randn(2, 7, 64)
    inp = AttnInputs(is_causal=True)
    out_e = a(x, inp)
    a.set_kernel("sdpa")
    torch.testing.assert_close(a(x, inp), out_e, atol=1e-5, rtol=0)


def test_flash_says_once_why_it_runs_sdpa(monkeypatch):
    # On this CPU, in float32 and with a mask, all three reasons apply; each is warned about once, and
    # the call still computes sdpa's result.
    import warnings

    from lmzoo.nn import attention as A

    monkeypatch.setattr(A, "_FLASH_FALLBACKS_WARNED", set())
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    with pytest.warns(UserWarning, match="'flash' was asked for but runs sdpa") as got:
        out = A._flash(q, k, v, mask, False, 8 ** -0.5, 0.0)
    said = " | ".join(str(w.message) for w in got)
    assert "explicit attention mask" in said and "not CUDA" in said and "float16/bfloat16" in said
    assert torch.allclose(out, A._sdpa(q, k, v, mask, False, 8 ** -0.5, 0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reasons again: silent
        A._flash(q, k, v, mask, False, 8 ** -0.5, 0.0)
    with pytest.warns(UserWarning, match="dtype torch.float64"):  # a new reason is said
        A._flash(q.double(), k.double(), v.double(), None, True, 8 ** -0.5, 0.0)
