"""The encoder and encoder-decoder stacks on their own: padding, cross-attention K/V reuse, the
cache's reorder, teacher forcing's shift, and labels -> loss."""

import torch
import torch.nn.functional as F

from lmzoo.nn.attention import Attention, CrossAttention
from lmzoo.nn.mlp import MLP
from lmzoo.nn.norms import LayerNorm, RMSNorm
from lmzoo.nn.position import RelativePositionBias
from lmzoo.nn.transformer import CrossDecoderLayer, Encoder, EncoderDecoderLM, TransformerLayer, shift_right

D, H, V = 16, 2, 30


def _encoder(placement="post", bias=None):
    layers = [TransformerLayer(Attention(D, H, qkv_bias=True), MLP(D, 24), LayerNorm(D), LayerNorm(D),
                               placement=placement) for _ in range(2)]
    return Encoder(layers, final_norm=LayerNorm(D) if placement == "pre" else None, position_bias=bias)


def _model():
    torch.manual_seed(0)
    enc = _encoder("pre", RelativePositionBias(H, 8, 16, bidirectional=True))
    dec = [CrossDecoderLayer(Attention(D, H), CrossAttention(D, H), MLP(D, 24), RMSNorm(D), RMSNorm(D), RMSNorm(D))
           for _ in range(2)]
    return EncoderDecoderLM(None, embed=torch.nn.Embedding(V, D), encoder=enc, decoder_layers=dec,
                            decoder_final_norm=RMSNorm(D), decoder_position_bias=RelativePositionBias(H, 8, 16, False),
                            tie_embeddings=True, head_scale=D ** -0.5, decoder_start_token_id=0, pad_token_id=0).eval()


def test_encoder_is_bidirectional_and_ignores_pads():
    torch.manual_seed(0)
    for enc in (_encoder("post"), _encoder("pre", RelativePositionBias(H, 8, 16))):
        x = torch.randn(2, 7, D)
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 4:] = 0
        with torch.no_grad():
            out = enc(x, mask)
            alone = enc(x[1:, :4])
            changed = enc(torch.cat([x[:, :-1], torch.randn(2, 1, D)], 1), mask)
        assert (out[1, :4] - alone[0]).abs().max() < 1e-5  # pads change nothing for real tokens
        assert (changed[0, 0] - out[0, 0]).abs().max() > 1e-4  # the last token reaches the first: no causal mask
        assert (changed[1, :4] - out[1, :4]).abs().max() < 1e-6  # ...unless it is a pad


def test_shift_right_and_loss():
    labels = torch.tensor([[5, 6, 7, -100]])
    assert shift_right(labels, 0, 0).tolist() == [[0, 5, 6, 7]]
    assert shift_right(torch.tensor([[5, -100, 7]]), 2, 9).tolist() == [[2, 5, 9]]
    m = _model()
    ids = torch.randint(1, V, (2, 6))
    labels = torch.tensor([[3, 4, 5, 1], [7, 8, -100, -100]])
    with torch.no_grad():
        out = m(input_ids=ids, labels=labels)
        ref = m(input_ids=ids, decoder_input_ids=shift_right(labels, 0, 0)).logits
    assert torch.equal(out.logits, ref)
    assert torch.allclose(out.loss, F.cross_entropy(ref.reshape(-1, V), labels.reshape(-1), ignore_index=-100))


def test_cache_reorder_moves_self_and_cross_rows():
    m = _model()
    ids = torch.randint(1, V, (3, 5))
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1] * 5])
    dec = torch.randint(1, V, (3, 4))
    with torch.no_grad():
        full = m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        cache = m.new_cache(3, 4)
        m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :2], cache=cache)
        order = torch.tensor([2, 0, 1])
        cache.reorder(order)  # what beam search does when beams swap
        assert torch.equal(cache.encoder_mask, mask[order])
        step = m(decoder_input_ids=dec[order, 2:3], cache=cache).logits
    assert (step[:, 0] - full[order, 2]).abs().max() < 1e-5
    assert cache.nbytes == 2 * 2 * (3 * H * 3 * (D // H) + 3 * H * 5 * (D // H)) * 4  # self: 3 tokens, cross: 5
