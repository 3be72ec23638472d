"""MLA: the naive path equals the paper's equations written out, the absorbed path equals the naive one
(with and without a cache, padded or not), and the cache holds only c_KV and the RoPE key."""

import math

import pytest
import torch

from lmzoo.nn.attention import KERNELS, AttnInputs
from lmzoo.nn.kv_cache import LatentCache
from lmzoo.nn.masks import decoder_mask
from lmzoo.nn.mla import MLA, mla_softmax_scale
from lmzoo.nn.position import RopeConfig, RotaryEmbedding

D, H, DC, DN, DR, DV = 32, 4, 12, 8, 6, 10


def _mla(q_lora_rank=None, mode="auto", kernel="sdpa"):
    rope = RotaryEmbedding(DR, RopeConfig(interleaved=True, theta=500.0))
    m = MLA(D, H, kv_lora_rank=DC, qk_nope_head_dim=DN, qk_rope_head_dim=DR, v_head_dim=DV, q_lora_rank=q_lora_rank,
            rope=rope, kernel=kernel, mode=mode)
    with torch.no_grad():  # non-trivial norm gains, so a skipped norm would show
        for p in m.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return m.eval()


def _inputs(m, B, T, past=0, mask=None, cache=None, dtype=torch.float32):
    pos = torch.arange(past, past + T)[None]
    return AttnInputs(mask=mask, is_causal=mask is None and past == 0 and T > 1, rope=m.rope(pos, dtype),
                      cache=cache)


def _reference(m: MLA, x: torch.Tensor) -> torch.Tensor:
    """Eq. 9-19 of the DeepSeek-V2 paper, one head at a time, causal, no cache."""
    B, T, _ = x.shape
    q = m.q_proj(x) if m.q_lora_rank is None else m.q_b_proj(m.q_a_norm(m.q_a_proj(x)))
    q = q.view(B, T, H, DN + DR)
    ckv, kr = m.kv_a_proj(x).split([DC, DR], -1)
    c = m.kv_a_norm(ckv)  # (B, T, d_c)
    cos, sin = m.rope(torch.arange(T)[None], torch.float32)
    kr = m.rope.rotate(kr[:, None], cos, sin)[:, 0]  # (B, T, d_R)
    w = m.kv_b_proj.weight.view(H, DN + DV, DC)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    outs = []
    for h in range(H):
        k_c = c @ w[h, :DN].T  # (B, T, d_h)   eq. 10
        v_c = c @ w[h, DN:].T  # (B, T, d_v)   eq. 11
        q_c = q[:, :, h, :DN]
        q_r = m.rope.rotate(q[:, None, :, h, DN:], cos, sin)[:, 0]
        scores = (q_c @ k_c.transpose(1, 2) + q_r @ kr.transpose(1, 2)) * m.scale  # (B, T, T)
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        outs.append(p @ v_c)
    return m.o_proj(torch.cat(outs, dim=-1))


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_naive_and_absorbed_equal_the_equations(q_lora_rank):
    m = _mla(q_lora_rank)
    x = torch.randn(2, 7, D)
    ref = _reference(m, x)
    for mode in ("naive", "absorbed"):
        m.mode = mode
        with torch.no_grad():
            out = m(x, _inputs(m, 2, 7))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_absorbed_equals_naive_through_the_cache_with_padding(kernel):
    """Prefill 5 tokens of a left-padded batch, then 4 decode steps: both paths give the same outputs."""
    B, T = 2, 9
    x = torch.randn(B, T, D)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, :3] = 0
    outs = {mode: _mla(16, mode=mode, kernel=kernel) for mode in ("naive", "absorbed")}
    outs["absorbed"].load_state_dict(outs["naive"].state_dict())
    results = {}
    for mode, m in outs.items():
        cache = m.new_cache(1, B, T, torch.float32, "cpu")
        steps = []
        with torch.no_grad():
            for start, end in [(0, 5), (5, 6), (6, 7), (7, 8), (8, 9)]:
                mask = decoder_mask(am[:, :end], end - start, end)
                steps.append(m(x[:, start:end], _inputs(m, B, end - start, start, mask, cache)))
                cache.commit()
        results[mode] = torch.cat(steps, 1)
    torch.testing.assert_close(results["absorbed"], results["naive"], atol=1e-5, rtol=0)
    # and the cached naive path equals one uncached forward over the same tokens
    m = outs["naive"]
    with torch.no_grad():
        full = m(x, _inputs(m, B, T, mask=decoder_mask(am, T, T)))
    torch.testing.assert_close(results["naive"][0], full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results["naive"][1, 3:], full[1, 3:], atol=1e-5, rtol=0)


def test_auto_mode_absorbs_only_when_decoding(monkeypatch):
    m = _mla()
    calls = []
    monkeypatch.setattr(m, "_absorbed", lambda *a: calls.append("absorbed") or MLA._absorbed(m, *a))
    monkeypatch.setattr(m, "_naive", lambda *a: calls.append("naive") or MLA._naive(m, *a))
    cache = m.new_cache(1, 1, 6, torch.float32, "cpu")
    with torch.no_grad():
        m(torch.randn(1, 4, D), _inputs(m, 1, 4))  # training/uncached forward
        m(torch.randn(1, 4, D), _inputs(m, 1, 4, cache=cache))  # prefill into an empty cache
        cache.commit()
        m(torch.randn(1, 1, D), _inputs(m, 1, 1, past=4, cache=cache))  # a decode step
    assert calls == ["naive", "naive", "absorbed"]


def test_latent_cache_holds_only_c_kv_and_the_rope_key():
    m = _mla(16)
    cache = m.new_cache(3, 2, 10, torch.bfloat16, "cpu")
    assert isinstance(cache, LatentCache)
    assert cache.c_kv[0].shape == (2, 1, 10, DC) and cache.k_rope[0].shape == (2, 1, 10, DR)
    m = m.to(torch.bfloat16)
    with torch.no_grad():
        for layer in range(3):
            m(torch.randn(2, 7, D, dtype=torch.bfloat16), _inputs(m, 2, 7, cache=cache, dtype=torch.bfloat16), layer)
        cache.commit()
    # (d_c + d_h^R) · n_tokens · layers · batch · 2 bytes, independent of the 4 heads
    assert cache.nbytes == (DC + DR) * 7 * 3 * 2 * 2 == m.kv_bytes_per_token(2) * 7 * 3 * 2
    assert cache.allocated_bytes == (DC + DR) * 10 * 3 * 2 * 2


def test_softmax_scale_carries_yarn_mscale_squared():
    rope = RopeConfig(scaling_type="yarn", scaling=dict(factor=40.0, mscale=0.707, mscale_all_dim=0.707,
                                                        original_max_position_embeddings=4096))
    m = 0.1 * 0.707 * math.log(40.0) + 1.0  # YaRN's 0.1·ln(s) + 1 with DeepSeek's mscale_all_dim
    assert mla_softmax_scale(192, rope) == pytest.approx(192 ** -0.5 * m * m, rel=1e-12)
    assert mla_softmax_scale(192, RopeConfig()) == pytest.approx(192 ** -0.5)
    no_all_dim = RopeConfig(scaling_type="yarn", scaling=dict(factor=40.0, original_max_position_embeddings=4096))
    assert mla_softmax_scale(192, no_all_dim) == pytest.approx(192 ** -0.5)


def test_flash_layout_pads_values_without_changing_the_result():
    """flash-attn needs one head width: the naive path pads v with zeros and cuts the output back."""
    m = _mla(mode="naive")
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        ref = m(x, _inputs(m, 2, 5))
        m.kernel, m.kernel_name = KERNELS["sdpa"], "flash"  # sdpa standing in for flash on the CPU
        padded = m(x, _inputs(m, 2, 5))
    torch.testing.assert_close(padded, ref, atol=1e-6, rtol=0)


def test_bad_parts_are_refused():
    with pytest.raises(ValueError, match="rotary_dim"):
        MLA(D, H, kv_lora_rank=DC, qk_nope_head_dim=DN, qk_rope_head_dim=DR, v_head_dim=DV,
            rope=RotaryEmbedding(8, RopeConfig()))
    with pytest.raises(ValueError, match="mode"):
        _mla(mode="fast")


def test_latent_cache_protocol_without_a_model():
    cache = LatentCache(n_layers=2, batch=3, kv_lora_rank=5, rope_dim=2, max_len=4)
    c, r = torch.randn(3, 1, 3, 5), torch.randn(3, 1, 3, 2)
    for layer in range(2):
        got_c, got_r = cache.update(layer, c, r)
        assert torch.equal(got_c, c) and torch.equal(got_r, r)
    assert cache.length == 0  # nothing counts until the forward commits
    cache.commit()
    assert cache.length == 3 and cache.nbytes == (5 + 2) * 3 * 2 * 3 * 4
    got_c, _ = cache.update(0, torch.ones(3, 1, 1, 5), torch.ones(3, 1, 1, 2))
    assert got_c.shape == (3, 1, 4, 5) and torch.equal(got_c[:, :, :3], c)
    cache.reorder(torch.tensor([2, 0]))
    assert cache.batch == 2 and torch.equal(cache.c_kv[1][0, :, :3], c[2])
    with pytest.raises(Exception, match="full"):
        cache.update(1, torch.ones(2, 1, 2, 5), torch.ones(2, 1, 2, 2))
