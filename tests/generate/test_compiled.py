"""``torch.compile`` of the decode step (lmzoo/generate/compiled.py) changes how the forward runs, not what it
computes: greedy ids equal the eager model's and the decode logits agree to float rounding, on every causal
family checked, padded or not. Skipped with the reason where inductor has no C++ compiler.

Compiling costs 20-50 s per family on 2 cores (56 s for DeepSeek-V2, whose MoE routing splits the graph), so
two families stand for the paths: LLaMA (RoPE, GQA, RMSNorm, SwiGLU; the paged cache every causal family
shares) and ChatGLM-6B (the prefix decoder's own cache and 2D positions); the other four passed the same
test when it was written (Bloom 33 s, GPT-2 32 s, ChatGLM2 5 s with a warm inductor cache, DeepSeek-V2 56 s):
``LMZOO_COMPILE_FAMILIES="bloom gpt2"`` runs them again."""

import os

import pytest
import torch

import lmzoo
from lmzoo.generate import compiled
from lmzoo.generate.compiled import compile_for_decode, compiler_available
from lmzoo.generate.fastpath import fuse_for_decode
from tests.stages.test_sft import tiny_decoder, tok  # noqa: F401  (tok: the fixture)

OK, WHY = compiler_available()
needs_compiler = pytest.mark.skipif(not OK, reason=f"torch.compile needs a C++ compiler: {WHY}")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """On one thread (tests/conftest.py)."""


def _pair(family, tok):  # noqa: F811
    torch.manual_seed(0)
    plain = tiny_decoder(family, tok).eval()
    with torch.no_grad():
        for p in plain.parameters():  # peaked distributions: no argmax ties
            p.normal_(0, 0.3) if p.ndim > 1 else None
    fast = tiny_decoder(family, tok).eval()
    fast.load_state_dict(plain.state_dict())
    fuse_for_decode(fast)
    assert compile_for_decode(fast)
    return plain, fast


@needs_compiler
@pytest.mark.parametrize("family", os.environ.get("LMZOO_COMPILE_FAMILIES", "llama chatglm").split())
def test_compiled_decode_equals_eager(family, tok):  # noqa: F811
    plain, fast = _pair(family, tok)
    ids = torch.randint(3, tok.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 left-padded
    if family == "chatglm":  # the prefix decoder reads its [gMASK]<sop> prompt end
        ids[:, -2:] = torch.tensor(tok.encode("[gMASK]<sop>", add_special_tokens=False))
    steps = dict(max_new_tokens=6, with_logits=True)
    a = list(lmzoo.stream(plain, ids, mask, **steps))
    b = list(lmzoo.stream(fast, ids, mask, **steps))
    assert [x.tolist() for x, _ in a] == [y.tolist() for y, _ in b]
    for (_, la), (_, lb) in zip(a, b):  # every step's logits, the prefill's and the cached decode's
        torch.testing.assert_close(lb, la, rtol=1e-4, atol=2e-5 * float(la.abs().max()))  # fp32 rounding of logits ~10


def test_no_compiler_falls_back_with_one_message(tok, monkeypatch):  # noqa: F811
    monkeypatch.setattr(compiled, "compiler_available", lambda: (False, "no C++ compiler (g++, c++ or clang++) on PATH"))
    model = tiny_decoder("llama", tok).eval()
    said = []
    assert compile_for_decode(model, say=said.append) is False
    assert said == ["torch.compile unavailable: no C++ compiler (g++, c++ or clang++) on PATH; decoding eagerly"]
    assert getattr(model, "decode_step", None) is None
    ids = torch.randint(3, tok.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    assert lmzoo.generate(model, ids, max_new_tokens=3).shape == (1, 8)


def test_cli_compile_flag_without_a_compiler_still_generates(tok, tmp_path, monkeypatch, capsys):  # noqa: F811
    from lmzoo.cli.main import main

    monkeypatch.setattr(compiled, "compiler_available", lambda: (False, "no C++ compiler (g++, c++ or clang++) on PATH"))
    src = lmzoo.save(tiny_decoder("llama", tok).eval(), tmp_path / "m", tokenizer=tok)
    assert main(["generate", "--model", str(src), "--ids", "5 6 7", "--max-new-tokens", "3", "--compile"]) == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == ["torch.compile unavailable: no C++ compiler (g++, c++ or clang++) on PATH; "
                                        "decoding eagerly"]
    assert out.strip()
