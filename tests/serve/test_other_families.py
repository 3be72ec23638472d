"""`lmzoo serve` on the two families that are not causal decoders: the prefix decoder (ChatGLM-6B), which the
paged engine refuses, runs one request at a time (lmzoo/generate/sequential.py); T5 runs on the paged engine
(cross-attention K/V in the pool). Either way the text it returns is lmzoo.generate's."""

import httpx
import pytest
import torch

import lmzoo
from tests.serve.conftest import serving
from tests.stages.test_sft import tiny_decoder, tok  # noqa: F401  (tok: the fixture)


@pytest.mark.parametrize("family, prompt", [("chatglm", "hello world 你好[gMASK]<sop>"), ("t5", "What is 3 + 4?")])
def test_a_prefix_decoder_and_an_encoder_decoder_are_served(family, prompt, tok, tmp_path, capfd):  # noqa: F811
    from lmzoo.generate.requests import SamplingParams
    from lmzoo.generate.sequential import SequentialEngine
    from lmzoo.train.init import init_weights

    torch.manual_seed(0)
    with torch.no_grad():
        model = init_weights(tiny_decoder(family, tok)).eval()
        for p in model.parameters():  # peaked distributions: no argmax ties
            p.normal_(0, 0.3) if p.ndim > 1 else None
    d = lmzoo.save(model, tmp_path / family, tokenizer=tok)
    ids = tok.encode(prompt, add_special_tokens=True)
    out = lmzoo.generate(model, torch.tensor([ids]), max_new_tokens=6)
    want = out[0, (1 if family == "t5" else len(ids)):].tolist()  # T5: the decoder's start token first
    eng = SequentialEngine(model)
    a = eng.add_request(ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    b = eng.add_request(ids, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o.token_ids for o in eng.step() if o.finished})
    assert done == {a: want, b: want[:3]}
    with serving(d) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": family, "prompt": prompt, "max_tokens": 6,
                                                      "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 6
    assert body["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
    assert ("requests run one at a time" in capfd.readouterr().err) == (family == "chatglm")
