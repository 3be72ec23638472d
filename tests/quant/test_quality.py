"""The issue's quality targets on a model actually trained on text (tinyshakespeare, byte-level, fixed
seed; trained here in 100 steps, ~15 s).

On a model this small, 4-bit RTN costs only ~0.1% perplexity, and a perplexity *difference* that
small is dominated by the first-order term g·δW (the held-out gradient of a model still learning,
times the rounding error), whose sign is random. The KL divergence of the quantized model's
next-token distributions from the float model's has no first-order term, so it ranks methods
steadily; the relative targets are asserted on it here:
  - GPTQ w4g128 at most half of RTN w4g128's divergence (it is ~1/6);
  - AWQ below RTN on the same asymmetric grid;
and on perplexity: every 8-bit method loses under 1%, every 4-bit one under 3%.
The perplexity ratios themselves are measured by benchmarks/bench_quant.py on a larger model
trained longer (numbers in docs/quantization.md).
"""

import importlib.util
from pathlib import Path

import pytest
import torch

import lmzoo
from lmzoo.quant.report import perplexity
from tests.shared_data import DATA, need

ROOT = Path(__file__).resolve().parents[2]
CORPUS = DATA / "corpora" / "en" / "tinyshakespeare.txt"

SEQ = 64


def _trainer():
    spec = importlib.util.spec_from_file_location("tiny_shakespeare", ROOT / "benchmarks" / "tiny_shakespeare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    need(CORPUS)
    ts = _trainer()
    path = tmp_path_factory.mktemp("shakespeare") / "model"
    ts.train(path, d_model=128, n_layers=2, n_heads=4, d_ff=384, seq_len=SEQ, batch=16, steps=100, lr=4e-3, seed=0)
    train_ids, held = ts.load_ids()
    g = torch.Generator().manual_seed(1)
    calib = [train_ids[s:s + SEQ][None] for s in torch.randint(0, len(train_ids) - SEQ, (32,), generator=g).tolist()]
    return path, calib, held[: 128 * SEQ + 1]


@torch.no_grad()
def kl_from(ref, model, ids):
    """Mean KL(float || quantized) of the next-token distributions: second order in the error, so
    it ranks methods more steadily than a perplexity difference does."""
    w = ids[: (len(ids) - 1) // SEQ * SEQ].view(-1, SEQ)
    p = torch.log_softmax(ref(w).logits.float(), -1)
    q = torch.log_softmax(model(w).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_quality_targets(trained):
    path, calib, held = trained
    base = lmzoo.load(path)
    ppl0 = perplexity(base, held, SEQ)
    assert ppl0 < 12  # it learned something: a uniform byte model has perplexity 256
    runs = {"rtn": ("rtn", {}), "gptq": ("gptq", {}), "rtn_asym": ("rtn", {"sym": False}), "awq": ("awq", {}),
            "nf4": ("nf4", {}), "rtn8": ("rtn", {"bits": 8, "group_size": None}),
            "gptq8": ("gptq", {"bits": 8, "group_size": None}), "int8": ("int8", {})}
    loss, kl = {}, {}
    for name, (method, kw) in runs.items():
        model = lmzoo.quantize(lmzoo.load(path), method, calibration=calib, **kw)
        loss[name] = perplexity(model, held, SEQ) / ppl0 - 1
        kl[name] = kl_from(base, model, held)
    msg = f"perplexity change {loss}, KL {kl}"
    assert kl["gptq"] <= 0.5 * kl["rtn"], msg
    assert kl["awq"] < kl["rtn_asym"], msg
    for name in ("rtn8", "gptq8", "int8"):
        assert abs(loss[name]) < 0.01 and kl[name] < 0.05 * kl["rtn"], msg
    assert all(loss[n] < 0.03 for n in ("rtn", "rtn_asym", "awq", "nf4")), msg


@pytest.mark.parametrize("bits,gs", [(8, 32), (4, 32)])  # 8-bit per channel: IntLinear already runs that kernel
def test_decode_kernels_keep_the_quantized_models_quality_and_greedy_ids(trained, bits, gs):
    """The fast path's int8/int4 kernels (lmzoo/quant/kernels.py, bf16 activations) against the quantized
    model's own forward: the same perplexity to 0.1%, a divergence far below the quantization's, equal ids."""
    from lmzoo.generate.fastpath import fuse_for_decode
    from lmzoo.quant.kernels import Int4Matmul, Int8Matmul

    path, _, held = trained
    base = lmzoo.load(path)
    q = lmzoo.quantize(lmzoo.load(path), "rtn", bits=bits, group_size=gs)
    ppl_q, kl_q = perplexity(q, held, SEQ), kl_from(base, q, held)
    prompt = held[:24][None]
    want = lmzoo.generate(q, prompt, max_new_tokens=24)
    fused = lmzoo.quantize(lmzoo.load(path), "rtn", bits=bits, group_size=gs)
    fuse_for_decode(fused)
    assert sum(isinstance(m, (Int4Matmul, Int8Matmul)) for m in fused.modules()) == 2 * 4  # qkv, o, gate_up, down
    ppl_k, kl_k = perplexity(fused, held, SEQ), kl_from(q, fused, held)
    assert abs(ppl_k / ppl_q - 1) < 1e-3, (ppl_k, ppl_q)
    assert kl_k < 0.1 * kl_q or kl_k < 1e-6, (kl_k, kl_q)
    assert torch.equal(lmzoo.generate(fused, prompt, max_new_tokens=24), want)
