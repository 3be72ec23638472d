"""Beam search on a decoder-only model (left-padded prompts) gives transformers' ids."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmzoo  # noqa: E402
from lmzoo.errors import LmzooError  # noqa: E402


def test_decoder_only_beam_search_matches_transformers(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # wider weights than the default init, so beams diverge and end at different steps
        for n, p in hf.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.3)
    hf.save_pretrained(tmp_path)
    ours = lmzoo.load(tmp_path)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 50, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    greedy = lmzoo.generate(ours, ids, mask, max_new_tokens=8, pad_token_id=2)
    ended_early = False
    for eos, nb, lp, early in ((int(greedy[0, 10]), 3, 1.0, False), (int(greedy[1, 8]), 2, 0.5, True),
                               (int(greedy[0, 9]), 4, 2.0, "never")):
        kw = dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=2, num_beams=nb, length_penalty=lp,
                  early_stopping=early, num_return_sequences=2)
        a = lmzoo.generate(ours, ids, mask, **kw)
        b = hf.generate(ids, attention_mask=mask, do_sample=False, **kw)
        assert torch.equal(a, b), f"\nlmzoo {a.tolist()}\nhf    {b.tolist()}"
        ended_early |= bool((a[:, 7:] == 2).any()) or a.shape[1] < 15  # padded after an early EOS
    assert ended_early
    with pytest.raises(LmzooError, match="num_beams=1 to sample"):
        lmzoo.generate(ours, ids, mask, num_beams=2, do_sample=True)
    with pytest.raises(LmzooError, match="'top_k' is not used by beam search"):
        lmzoo.generate(ours, ids, mask, num_beams=2, top_k=5)
