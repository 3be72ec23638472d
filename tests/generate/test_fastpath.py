"""The decode fast path (lmzoo/generate/fastpath.py) changes the weights' layout, not the model: logits
equal the plain model's to float rounding, greedy ids equal, on every causal family, padded or not."""

import pytest
import torch

import lmzoo
from lmzoo.errors import CheckpointError
from lmzoo.generate.fastpath import WideLinear, fuse_for_decode
from tests.stages.test_sft import tiny_decoder, tok  # noqa: F401  (tok: the fixture)

FAMILIES = ["gpt2", "llama", "bloom", "chatglm", "chatglm2", "deepseek_v2"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """On one thread (tests/conftest.py)."""


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_decode_equals_the_plain_model(family, tok, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    plain = tiny_decoder(family, tok).eval()
    with torch.no_grad():
        for p in plain.parameters():  # peaked distributions: no argmax ties
            p.normal_(0, 0.3) if p.ndim > 1 else None
    fused = tiny_decoder(family, tok).eval()
    fused.load_state_dict(plain.state_dict())
    changed = fuse_for_decode(fused)
    assert changed["wide"] > 0 and (changed["qkv"] > 0 or family == "deepseek_v2"), changed
    assert not any(type(m) is torch.nn.Linear and m.out_features > m.in_features for m in fused.modules()
                   if not isinstance(m, WideLinear)) or family == "deepseek_v2"
    ids = torch.randint(3, tok.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 left-padded
    if family == "chatglm":  # the prefix decoder reads its [gMASK]<sop> prompt end
        ids[:, -2:] = torch.tensor(tok.encode("[gMASK]<sop>", add_special_tokens=False))
    with torch.no_grad():
        a = plain(ids, attention_mask=mask).logits
        b = fused(ids, attention_mask=mask).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert torch.equal(lmzoo.generate(plain, ids, mask, max_new_tokens=8),
                       lmzoo.generate(fused, ids, mask, max_new_tokens=8))
    with pytest.raises(CheckpointError, match="laid out for decoding"):
        lmzoo.save(fused, tmp_path / "fused")


def test_bf16_models_keep_the_linear_layout_and_their_logits(tok):  # noqa: F811
    """16-bit weights are fused but not transposed (WideLinear): the same F.linear products, the same logits."""
    torch.manual_seed(0)
    plain = tiny_decoder("llama", tok).eval().to(torch.bfloat16)
    fused = tiny_decoder("llama", tok).eval().to(torch.bfloat16)
    fused.load_state_dict(plain.state_dict())
    fuse_for_decode(fused)
    wide = [m for m in fused.modules() if isinstance(m, WideLinear)]
    assert wide and all(not m.transposed and m.weight.dtype == torch.bfloat16 for m in wide)
    ids = torch.randint(3, tok.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = plain(ids).logits.float(), fused(ids).logits.float()
    assert (a - b).abs().max() <= 2 ** -6 * a.abs().max()  # bf16: fused outputs are summed in another order
