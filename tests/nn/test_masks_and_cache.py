import pytest
import torch

from lmzoo.errors import LmzooError
from lmzoo.nn.kv_cache import KVCache, kv_bytes_per_token
from lmzoo.nn.masks import causal_mask, decoder_mask, positions_from_mask


def test_causal_mask_aligned_to_key_end():
    m = causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_decoder_mask_with_left_padding():
    am = torch.tensor([[0, 0, 1, 1]])
    m = decoder_mask(am, 4, 4)[0, 0]
    assert m[3].tolist() == [False, False, True, True]
    assert m[2].tolist() == [False, False, True, False]
    assert m[0].all()  # a pad query with nothing to see is opened to keep softmax finite
    assert positions_from_mask(am).tolist() == [[0, 0, 0, 1]]


def test_kv_cache_bytes_follow_the_formula():
    # GQA: 2 · n_kv · d_head · layers per token, here fp16 (2 bytes)
    c = KVCache(n_layers=3, batch=2, n_kv_heads=2, head_dim=8, max_len=10, dtype=torch.float16)
    for layer in range(3):
        c.update(layer, torch.ones(2, 2, 4, 8), torch.ones(2, 2, 4, 8))
    c.commit()
    assert c.length == 4
    assert c.nbytes == 2 * 4 * kv_bytes_per_token(3, 2, 8, 2) == 2 * 4 * (2 * 2 * 8 * 3 * 2)
    k, v = c.update(0, torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))
    assert k.shape == (2, 2, 5, 8) and k[:, :, :4].eq(1).all() and k[:, :, 4].eq(0).all()


def test_kv_cache_overflow_is_an_error():
    c = KVCache(1, 1, 1, 4, max_len=3)
    c.update(0, torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    c.commit()
    with pytest.raises(LmzooError, match="full"):
        c.update(0, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
