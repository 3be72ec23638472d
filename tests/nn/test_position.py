import math

import pytest
import torch

from lmzoo.nn.position import RopeConfig, RotaryEmbedding


def test_rope_preserves_norm_and_is_relative():
    rope = RotaryEmbedding(16, RopeConfig(theta=100.0))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def at(x, p):
        cos, sin = rope(torch.tensor([[p]]), torch.float32)
        return rope.rotate(x, cos, sin)

    torch.testing.assert_close(at(q, 7).norm(), q.norm())
    # <R(m)q, R(n)k> depends on m - n only
    a = (at(q, 9) * at(k, 4)).sum()
    b = (at(q, 25) * at(k, 20)).sum()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_interleaved_is_half_split_under_a_permutation():
    D = 12
    half = RotaryEmbedding(D, RopeConfig(theta=50.0))
    inter = RotaryEmbedding(D, RopeConfig(theta=50.0, interleaved=True))
    x = torch.randn(2, 3, 5, D)
    perm = torch.tensor([i for p in range(D // 2) for i in (p, p + D // 2)])  # half layout -> pairs
    pos = torch.arange(5)[None].expand(2, 5)
    a = half.rotate(x, *half(pos, torch.float32))
    b = inter.rotate(x[..., perm], *inter(pos, torch.float32))
    torch.testing.assert_close(a[..., perm], b)


def test_partial_rotary_leaves_the_rest_untouched():
    rope = RotaryEmbedding(16, RopeConfig(rotary_fraction=0.5, interleaved=True))
    assert rope.rotary_dim == 8
    x = torch.randn(1, 2, 4, 16)
    y = rope.rotate(x, *rope(torch.arange(4)[None], torch.float32))
    assert torch.equal(y[..., 8:], x[..., 8:])
    assert not torch.allclose(y[..., :8], x[..., :8])


@pytest.mark.parametrize("kind,params", [
    ("default", {}),
    ("linear", {"factor": 4.0}),
    ("dynamic", {"factor": 2.0}),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 64}),
    ("yarn", {"factor": 40.0, "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.707,
              "beta_fast": 16, "beta_slow": 2}),
])
def test_rope_scaling_matches_transformers(kind, params):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=256,
                                   rope_parameters={"rope_type": kind, "rope_theta": 10000.0, **params})
    ours = RotaryEmbedding(32, RopeConfig(theta=10000.0, scaling_type=kind, scaling=dict(params), max_positions=256))
    if kind == "default":
        ref = 1.0 / (10000.0 ** (torch.arange(0, 32, 2).float() / 32))
        factor = 1.0
    else:
        ref, factor = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    torch.testing.assert_close(ours.inv_freq, ref.float(), atol=1e-7, rtol=1e-6)
    assert math.isclose(ours.attention_factor, factor, rel_tol=1e-9)
    if kind == "dynamic":  # past the trained context the base grows like transformers' seq_len update
        ref_long, _ = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=1000)
        torch.testing.assert_close(ours._inv_freq(1000), ref_long.float(), atol=1e-7, rtol=1e-6)


def test_unknown_scaling_is_refused():
    from lmzoo.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown rope scaling"):
        RotaryEmbedding(16, RopeConfig(scaling_type="nope"))
    with pytest.raises(ConfigError, match="factor"):
        RotaryEmbedding(16, RopeConfig(scaling_type="linear"))


def test_computed_tables_stay_float32_when_the_model_is_cast():
    from lmzoo.nn.position import ALiBi

    rope = RotaryEmbedding(64, RopeConfig(theta=500000.0))
    exact = rope.inv_freq.clone()
    alibi = ALiBi(6)
    rope.to(torch.bfloat16)
    alibi.half()
    assert rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq, exact)
    assert alibi.slopes.dtype == torch.float32
