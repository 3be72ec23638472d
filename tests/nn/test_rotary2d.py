"""GLM's 2D RoPE: each half of the head rotates by its own id, so scores depend on both offsets only."""

import pytest
import torch

from lmzoo.errors import ConfigError
from lmzoo.nn.position import RopeConfig, RotaryEmbedding, Rotary2D


def _score(rope, q, k, qpos, kpos):
    cq, sq = rope(torch.tensor([[[qpos[0]], [qpos[1]]]]), torch.float32)
    ck, sk = rope(torch.tensor([[[kpos[0]], [kpos[1]]]]), torch.float32)
    return (rope.rotate(q, cq, sq) * rope.rotate(k, ck, sk)).sum().item()


def test_each_half_is_plain_rope_with_its_own_ids():
    torch.manual_seed(0)
    rope, plain = Rotary2D(16), RotaryEmbedding(8, RopeConfig())
    x = torch.randn(1, 2, 3, 16)  # (B, H, T, head_dim)
    pos = torch.tensor([[[0, 5, 9], [0, 1, 2]]])  # (B, 2, T)
    out = rope.rotate(x, *rope(pos, torch.float32))
    first = plain.rotate(x[..., :8], *plain(pos[:, 0], torch.float32))
    second = plain.rotate(x[..., 8:], *plain(pos[:, 1], torch.float32))
    torch.testing.assert_close(out, torch.cat((first, second), -1))


def test_scores_depend_on_both_offsets_only():
    torch.manual_seed(1)
    rope = Rotary2D(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    a = _score(rope, q, k, (7, 3), (4, 1))
    assert a == pytest.approx(_score(rope, q, k, (13, 2), (10, 0)), abs=1e-5)  # same (3, 2) offsets
    assert abs(a - _score(rope, q, k, (7, 3), (4, 2))) > 1e-3  # the block offset matters on its own


def test_shapes_are_checked():
    with pytest.raises(ConfigError, match="multiple of 4"):
        Rotary2D(10)
    with pytest.raises(ValueError, match=r"\(B, 2, T\)"):
        Rotary2D(8)(torch.zeros(1, 3, dtype=torch.long), torch.float32)
