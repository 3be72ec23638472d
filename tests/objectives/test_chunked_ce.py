"""The chunked (fused linear) cross-entropy equals the plain head + causal_lm_loss, values and
gradients, and holds less memory at its peak."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lmzoo
from lmzoo.nn.transformer import causal_lm_loss
from lmzoo.objectives import chunked_causal_lm_loss


def _grads(loss_fn, tensors):
    loss = loss_fn()
    return loss, torch.autograd.grad(2.5 * loss, tensors)  # a grad_out != 1 reaches backward's scaling


def _compare(h, w, b, labels, chunk):
    tensors = [t for t in (h, w, b) if t is not None]
    ref, ref_g = _grads(lambda: causal_lm_loss(torch.nn.functional.linear(h, w, b), labels), tensors)
    got, got_g = _grads(lambda: chunked_causal_lm_loss(h, w, labels, b, chunk_tokens=chunk), tensors)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(got_g, ref_g):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    return max([(got - ref).abs().item()] + [(g - r).abs().max().item() for g, r in zip(got_g, ref_g)])


@pytest.mark.parametrize("chunk", [1, 5, 7, 1000])  # 7 does not divide the 2·13 = 26 tokens; 1000 > all of them
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_grads_equal_the_plain_head_and_loss(chunk, bias):
    torch.manual_seed(0)
    B, T, D, V = 2, 13, 16, 97
    h = torch.randn(B, T, D, requires_grad=True)
    w = (0.3 * torch.randn(V, D)).requires_grad_()
    b = torch.randn(V, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (B, T))
    labels[0, 1:9] = -100  # with chunk 5 and 7, whole chunks have nothing to predict
    labels[1, 4] = -100
    assert _compare(h, w, b, labels, chunk) < 1e-5


def test_all_ignored_is_nan_like_the_plain_loss_and_ignores_label_zero_shift():
    torch.manual_seed(0)
    h, w = torch.randn(1, 6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    labels = torch.full((1, 6), -100)
    labels[0, 0] = 3  # the first label is never a target (nothing predicts it)
    ref = causal_lm_loss(h @ w.T, labels)
    got = chunked_causal_lm_loss(h, w, labels, chunk_tokens=2)
    assert torch.isnan(ref) and torch.isnan(got)
    got.backward()
    assert h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_no_grad_gives_the_same_loss():
    torch.manual_seed(0)
    h, w = torch.randn(2, 9, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (2, 9))
    with torch.no_grad():
        got = chunked_causal_lm_loss(h.requires_grad_(), w, labels, chunk_tokens=4)
    assert got.grad_fn is None
    torch.testing.assert_close(got, causal_lm_loss(h @ w.T, labels))


def test_bfloat16_hidden_keeps_the_softmax_in_float32():
    torch.manual_seed(0)
    h32, w32 = torch.randn(2, 10, 16), 0.3 * torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 10))
    h, w = h32.bfloat16().requires_grad_(), w32.bfloat16().requires_grad_()
    got = chunked_causal_lm_loss(h, w, labels, chunk_tokens=3)
    got.backward()
    assert got.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    ref_h, ref_w = h32.clone().requires_grad_(), w32.clone().requires_grad_()
    ref = causal_lm_loss(h.detach().float() @ w.detach().float().T, labels)  # the bf16 inputs, in float32
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=1e-2)
    causal_lm_loss(ref_h @ ref_w.T, labels).backward()
    torch.testing.assert_close(w.grad.float(), ref_w.grad, atol=2e-2, rtol=5e-2)


def test_tied_embedding_accumulates_both_gradients():
    """Embedding lookup and head share one weight: its grad is the sum of both paths, as in the plain model."""
    torch.manual_seed(0)
    V, D = 40, 12
    ids = torch.randint(0, V, (2, 7))
    grads = []
    for chunked in (False, True):
        w = torch.nn.Parameter(torch.randn(V, D, generator=torch.Generator().manual_seed(1)))
        h = torch.tanh(torch.nn.functional.embedding(ids, w))
        loss = chunked_causal_lm_loss(h, w, ids, chunk_tokens=4) if chunked else causal_lm_loss(h @ w.T, ids)
        loss.backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"chunk_tokens": 0}, "chunk_tokens must be a positive integer"),
    ({"labels": torch.zeros(2, 4, dtype=torch.long)}, "labels"),
    ({"head_weight": torch.zeros(5, 3)}, "head_weight must be"),
    ({"head_bias": torch.zeros(4)}, "head_bias must be"),
])
def test_bad_shapes_are_refused(kwargs, message):
    args = {"hidden": torch.zeros(2, 3, 8), "head_weight": torch.zeros(5, 8),
            "labels": torch.zeros(2, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match=message):
        chunked_causal_lm_loss(**{**args, **kwargs})


# -- the DecoderLM seam ------------------------------------------------------------------------
def _llama(tie=False):
    from lmzoo.models.llama.config import LlamaConfig

    torch.manual_seed(0)
    return lmzoo.build(LlamaConfig(vocab_size=71, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_positions=64,
                                   tie_embeddings=tie))


def _deepseek_moe():
    from lmzoo.models.deepseek_v2.config import DeepseekV2Config

    torch.manual_seed(0)
    return lmzoo.build(DeepseekV2Config(vocab_size=71, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_positions=64,
                                        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                        v_head_dim=8, n_routed_experts=4, n_shared_experts=1, top_k=2, d_expert=16,
                                        first_k_dense_replace=1, aux_loss_alpha=0.01))


@pytest.mark.parametrize("make", [_llama, lambda: _llama(tie=True), _deepseek_moe], ids=["llama", "tied", "moe"])
def test_decoder_loss_chunk_equals_the_plain_loss_and_grads(make):
    model = make().train()
    ids = torch.randint(0, 71, (2, 11), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :4] = -100
    outs, grads = [], []
    for chunk in (0, 4):
        model.zero_grad()
        out = model(ids, labels=labels, loss_chunk=chunk)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    plain, chunked = outs
    assert chunked.logits is None and plain.logits.shape == (2, 11, 71)
    if make is _deepseek_moe:  # the balance loss is still added: the total differs from the CE alone
        assert chunked.aux_loss is not None and chunked.aux_loss > 0
        torch.testing.assert_close(chunked.aux_loss, plain.aux_loss)
    torch.testing.assert_close(chunked.loss, plain.loss, atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and "embed.weight" in grads[1]  # tied: the head is embed.weight
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-5, msg=name)


def test_loss_chunk_with_logits_to_keep_and_without_labels():
    model = _llama().eval()
    ids = torch.randint(0, 71, (1, 9), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    out = model(ids, labels=ids, loss_chunk=3, logits_to_keep=2)
    torch.testing.assert_close(out.logits, full.logits[:, -2:])
    torch.testing.assert_close(out.loss, causal_lm_loss(full.logits, ids))
    torch.testing.assert_close(model(ids, loss_chunk=3).logits, full.logits)  # no labels: nothing to chunk


# -- memory ------------------------------------------------------------------------------------
_PEAK = textwrap.dedent("""
    import json, resource, sys
    import torch
    from lmzoo.nn.transformer import causal_lm_loss
    from lmzoo.objectives import chunked_causal_lm_loss

    mode, B, T, D, V, chunk = sys.argv[1], *map(int, sys.argv[2:])
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, D, generator=g, requires_grad=True)
    w = (0.02 * torch.randn(V, D, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    def step(h, w, labels, n):
        if mode == "plain":
            loss = causal_lm_loss(h @ w.T, labels)
        else:
            loss = chunked_causal_lm_loss(h, w, labels, chunk_tokens=n)
        loss.backward()
        return loss
    step(h[:, :4], w, labels[:, :4], 4)  # warm up the kernels on a tiny case
    h.grad = w.grad = None
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    # the step's own peak: RSS sampled while it runs (ru_maxrss would also hold any earlier transient peak)
    import threading, time
    peak, done = [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0002)
    before = rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    loss = step(h, w, labels, chunk)
    done.set()
    sampler.join()
    print(json.dumps({"loss": loss.item(), "extra": max(peak[0], rss()) - before}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss in kB")
def test_peak_memory_is_lower_than_the_plain_loss(tmp_path):
    """B·T = 2048 tokens at V = 32000: the plain loss holds several (2048, 32000) float32 tensors
    (logits, log-softmax, their grads: 262 MB each); the chunked one a (256, 32000) chunk at a time.
    Measured as the process's peak RSS above its RSS just before the step."""
    script = tmp_path / "peak.py"
    script.write_text(_PEAK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = {}
    for mode in ("plain", "chunked"):
        r = subprocess.run([sys.executable, str(script), mode, "2", "1024", "64", "32000", "256"], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        res[mode] = json.loads(r.stdout)
    print(f"\npeak extra RSS, B=2 T=1024 D=64 V=32000: plain {res['plain']['extra'] / 1e6:.0f} MB, "
          f"chunked (256 tokens) {res['chunked']['extra'] / 1e6:.0f} MB")
    assert abs(res["plain"]["loss"] - res["chunked"]["loss"]) < 1e-4
    # one (2048, 32000) float32 tensor is 262 MB: the plain step needs at least two at once
    assert res["plain"]["extra"] > 400e6
    assert res["chunked"]["extra"] * 3 < res["plain"]["extra"]
