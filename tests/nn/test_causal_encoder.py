"""``Encoder(causal=True)`` (CLIP's text tower): token t sees tokens <= t only, and right padding changes nothing."""

import torch

from lmzoo.nn.attention import Attention
from lmzoo.nn.mlp import MLP
from lmzoo.nn.norms import LayerNorm
from lmzoo.nn.transformer import Encoder, TransformerLayer


def _encoder(causal: bool) -> Encoder:
    torch.manual_seed(0)
    layers = [TransformerLayer(Attention(16, 4, qkv_bias=True, out_bias=True), MLP(16, 32), LayerNorm(16), LayerNorm(16))
              for _ in range(2)]
    return Encoder(layers, final_norm=LayerNorm(16), causal=causal).eval()


def test_causal_encoder_ignores_later_tokens_and_pads():
    enc = _encoder(causal=True)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        full = enc(x)
        changed = x.clone()
        changed[:, 5:] = torch.randn(2, 2, 16)
        assert torch.allclose(enc(changed)[:, :5], full[:, :5], atol=1e-6)  # the future does not leak back
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 4:] = 0
        padded = enc(x, mask)  # the mask path (decoder_mask) equals the is_causal path on real tokens
        assert torch.allclose(padded[0], full[0], atol=1e-6) and torch.allclose(padded[1, :4], full[1, :4], atol=1e-6)
        assert (enc(x)[:, :5] - _encoder(causal=False)(x)[:, :5]).abs().max() > 1e-3  # bidirectional differs
