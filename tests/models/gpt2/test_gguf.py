"""GGUF export/import of tiny GPT-2s (tied head and d_ff = 4·d_model; untied head, n_inner 96, eps 1e-6),
checked by transformers' GGUF loader and by llama.cpp itself (llama-cpp-python, in a subprocess).

Weights are N(0, 0.1²), biases too and the LayerNorm gains 1 + N(0, 0.1²): a bias or a gain read into
the wrong place moves the logits. transformers reads the tied file with no help (its loader maps
``context_length`` to ``n_ctx``, not ``n_positions``, and drops ``feed_forward_length``, so that model has
GPT2Config's defaults there: 1024 positions, 4·n_embd); the untied one is given the config.

llama.cpp's CPU GELU is a table of F16 values indexed by the F16-rounded input (GGML_GELU_FP16), ~1e-3
relative. Rounding to F16 turns the ~1e-7 float32 differences of the GELU inputs into whole F16 steps
here and there (adding 1e-7 relative noise to lmzoo's own inputs moves its logits by ~1e-4), so even lmzoo
with that GELU is only ~3e-4 from llama.cpp. The untied model's MLP biases (±16) put every GELU input
outside (-10, 10), where llama.cpp's GELU is exact (x or 0): that model is the 1e-4 check of the rest of
the graph (fused q|k|v, positions, LayerNorm biases, the head).
"""

import copy
import os

import numpy as np
import pytest
import torch

import lmzoo
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.interop.gguf import export_gguf, read_gguf
from lmzoo.models.gpt2 import gguf as gpt2_gguf
from lmzoo.models.gpt2.config import GPT2Config
from tests.gguf_cases import one_thread, TEXTS, EN, ZH, rounded as rounded_copy, llamacpp_gelu  # noqa: F401 (one_thread: a fixture)
from tests.shared_data import need_llamacpp

gguf = pytest.importorskip("gguf")

SMALL = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, bos_token_id=None, eos_token_id=None)
KINDS = {"tied": dict(d_ff=256, max_positions=1024, tie_embeddings=True),
         "untied": dict(d_ff=96, max_positions=128, tie_embeddings=False, norm_eps=1e-6, act="gelu_pytorch_tanh")}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(kind, seed):
    torch.manual_seed(seed)
    model = lmzoo.build(GPT2Config(**SMALL, **KINDS[kind])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if p.ndim == 1 and name.endswith(".weight") else 0.0, 0.1)  # gains around 1
        if kind == "untied":  # every GELU input beyond ±10 (|x·W| stays below 4): llama.cpp's GELU exact there
            for layer in model.layers:
                b = layer.mlp.up_proj.bias
                b.copy_(torch.where(torch.rand_like(b) < 0.5, -16.0, 16.0) + b)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = lmzoo.train_tokenizer("bpe", texts=TEXTS, vocab_size=300)
    d = tmp_path_factory.mktemp("gpt2gguf")
    ids = tok.encode(EN + ZH)
    out = {"tok": tok, "dir": d, "ids": ids}
    for seed, kind in enumerate(KINDS):
        model = build(kind, seed)
        files = {t: d / f"{kind}-{t}.gguf" for t in ("f32", "q8_0")}
        for t, f in files.items():
            export_gguf(model, tok, f, type=t)
        out[kind] = dict(model=model, files=files, ref=logits_of(model, ids))
    return out


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def rounded(model, type):
    """``model`` as the file rounds it: every matrix but the position table (kept F32, as the converter does)."""
    return rounded_copy(model, type, keep=("positions.weight",))


def fp16_gelu(model):
    """A copy whose GELU is llama.cpp's CPU GELU: F16 table at the F16-rounded input, exact past |x| >= 10."""
    act, out = llamacpp_gelu("gelu_new"), copy.deepcopy(model)
    for layer in out.layers:
        layer.mlp.act = act
    return out


def hf_logits(setup, kind, type):
    import transformers

    s = setup[kind]
    config = None if kind == "tied" else transformers.GPT2Config(**s["model"].config.to_hf())
    hf = transformers.GPT2LMHeadModel.from_pretrained(setup["dir"], gguf_file=s["files"][type].name, config=config,
                                                      dtype=torch.float32)
    assert hf.config.tie_word_embeddings == (kind == "tied")
    with torch.no_grad():
        return hf(torch.tensor([setup["ids"]])).logits[0]


def test_metadata_names_and_types(setup):
    r = gguf.GGUFReader(str(setup["untied"]["files"]["q8_0"]))
    f = lambda k: r.get_field(k).contents()  # noqa: E731
    assert f("general.architecture") == "gpt2" and f("gpt2.block_count") == 2 and f("gpt2.context_length") == 128
    assert f("gpt2.embedding_length") == 64 and f("gpt2.feed_forward_length") == 96
    assert f("gpt2.attention.head_count") == 4 and r.get_field("gpt2.attention.head_count_kv") is None  # as converted
    assert f("gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-6)
    assert f("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f("tokenizer.ggml.model") == "gpt2" and f("tokenizer.ggml.pre") == "gpt-2"
    types = {t.name: t.tensor_type.name for t in r.tensors}
    layer = [f"{n}.{k}" for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
             for k in ("weight", "bias")]
    want = ({f"blk.{i}.{n}" for i in range(2) for n in layer}
            | {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias", "output.weight"})
    assert set(types) == want
    assert types["blk.0.attn_qkv.weight"] == "Q8_0" and types["output.weight"] == "Q8_0"
    assert types["blk.1.attn_qkv.bias"] == "F32" and types["output_norm.bias"] == "F32"
    assert types["position_embd.weight"] == "F32"  # the converter and llama-quantize never quantize it
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # ggml order {ne0, ne1}
    assert shapes["blk.0.attn_qkv.weight"] == (64, 192) and shapes["position_embd.weight"] == (64, 128)
    pos = {t.name: np.array(t.data) for t in r.tensors}["position_embd.weight"]
    np.testing.assert_array_equal(pos, setup["untied"]["model"].positions.weight.detach().numpy())
    tied = gguf.GGUFReader(str(setup["tied"]["files"]["f32"]))
    assert "output.weight" not in {t.name for t in tied.tensors}  # llama.cpp falls back to token_embd


@pytest.mark.parametrize("kind", list(KINDS))
def test_f32_equals_transformers(setup, kind):
    diff = (hf_logits(setup, kind, "f32") - setup[kind]["ref"]).abs().max().item()
    print(f"{kind} f32 max|Δlogit| vs transformers: {diff:.2e}")
    assert diff <= 1e-5


def test_q8_0_equals_transformers_on_rounded_weights(setup):
    ref_q = logits_of(rounded(setup["tied"]["model"], "q8_0"), setup["ids"])
    diff = (hf_logits(setup, "tied", "q8_0") - ref_q).abs().max().item()
    moved = (ref_q - setup["tied"]["ref"]).abs().max().item()
    print(f"tied q8_0 max|Δlogit| vs transformers: {diff:.2e} (rounding moved the logits by {moved:.2e})")
    assert diff <= 1e-5 and moved > 100 * diff


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip(setup, kind):
    """F32 back exactly, with its config and tokenizer; Q8_0 as the rounded reference."""
    s, ids = setup[kind], setup["ids"]
    back, tok = read_gguf(s["files"]["f32"])
    diff = (logits_of(back, ids) - s["ref"]).abs().max().item()
    want, got = s["model"].config, back.config
    assert (got.d_ff, got.max_positions, got.norm_eps, got.tie_embeddings) == (want.d_ff, want.max_positions,
                                                                               want.norm_eps, want.tie_embeddings)
    assert got.tie_embeddings == (back.lm_head.weight is back.embed.weight)
    assert tok.encode(EN) == setup["tok"].encode(EN) and tok.encode(ZH) == setup["tok"].encode(ZH)
    q8 = lmzoo.load(s["files"]["q8_0"])
    diff_q = (logits_of(q8, ids) - logits_of(rounded(s["model"], "q8_0"), ids)).abs().max().item()
    print(f"{kind} round trip max|Δlogit|: f32 {diff:.2e}, q8_0 vs rounded {diff_q:.2e}")
    assert diff <= 1e-6 and diff_q <= 1e-6


# -- llama.cpp itself ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llamacpp():
    return need_llamacpp()


def test_llamacpp_logits_greedy_and_tokens(setup, llamacpp):
    """llama.cpp on the F32 files (F32 KV cache). Untied (GELU inputs past ±10): within 1e-4 of lmzoo.
    Tied (GELU in its working range): within 1e-3 of lmzoo with llama.cpp's F16 GELU, ~1e-3 of the exact
    one (see the module docstring). The same 16 greedy ids as lmzoo.generate, the same token ids."""
    ids, tok = setup["ids"], setup["tok"]
    ops = [{"op": "logits", "ids": ids}, {"op": "greedy", "ids": ids[:8], "n": 16},
           {"op": "tokenize", "texts": [EN, ZH], "add_bos": False, "special": False}]
    (lg_t, ids_t, toks), (lg_u, ids_u, _) = (llamacpp.run(setup[k]["files"]["f32"], ops, n_threads=1) for k in KINDS)
    untied = np.abs(llamacpp._unpack(lg_u) - setup["untied"]["ref"].numpy()).max()
    tied = setup["tied"]["model"]
    gelu16 = np.abs(llamacpp._unpack(lg_t) - logits_of(fp16_gelu(tied), ids).numpy()).max()
    exact = np.abs(llamacpp._unpack(lg_t) - setup["tied"]["ref"].numpy()).max()
    print(f"max|Δlogit| vs llama.cpp: untied (exact GELU range) {untied:.2e}; tied {gelu16:.2e} with llama.cpp's "
          f"F16 GELU, {exact:.2e} with the exact one")
    assert untied <= 1e-4 and gelu16 <= 1e-3 and exact <= 5e-3
    for kind, got in (("tied", ids_t), ("untied", ids_u)):
        want = lmzoo.generate(setup[kind]["model"], torch.tensor([ids[:8]]), max_new_tokens=16)[0, 8:].tolist()
        assert got == want, kind
    assert len(set(ids_t)) > 4  # the untied model's saturated MLP repeats one token: the tied one is the real check
    assert toks == [tok.encode(EN), tok.encode(ZH)]


def test_llamacpp_q8_0_close_to_rounded_weights(setup, llamacpp):
    """llama.cpp rounds the activations to 8 bits in its Q8_0 matmuls too: near, not at, the rounded reference."""
    ref_q = logits_of(rounded(setup["untied"]["model"], "q8_0"), setup["ids"]).numpy()
    got = llamacpp.logits(setup["untied"]["files"]["q8_0"], setup["ids"], n_threads=1)
    diff, moved = np.abs(got - ref_q).max(), np.abs(ref_q - setup["untied"]["ref"].numpy()).max()
    print(f"untied q8_0 max|Δlogit| vs llama.cpp: {diff:.2e} (rounding moved the logits by {moved:.2e})")
    assert diff <= 0.05


# -- bad input --------------------------------------------------------------------------------------
def test_configs_llamacpp_cannot_run_are_refused_before_writing(setup, tmp_path):
    out, base = tmp_path / "x.gguf", dict(SMALL, n_layers=1, d_ff=64, max_positions=32)
    for extra, msg in ((dict(act="gelu"), "gpt2 act 'gelu' has no llama.cpp equivalent; its gpt2 graph runs the tanh"),
                       (dict(act="relu"), "gpt2 act 'relu' has no llama.cpp equivalent"),
                       (dict(scale_attn_weights=False), "scale_attn_weights=False has no llama.cpp equivalent"),
                       (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True has no")):
        with pytest.raises(ConfigError, match=msg):
            export_gguf(lmzoo.build(GPT2Config(**base, **extra)), setup["tok"], out)
    uni = lmzoo.train_tokenizer("unigram", texts=TEXTS, vocab_size=200)
    with pytest.raises(ConfigError, match="cannot be expressed in GGUF"):
        export_gguf(setup["tied"]["model"], uni, out)
    with pytest.raises(CheckpointError, match="no llama.cpp name for the lmzoo tensor 'layers.0.attn.rotary.weight'"):
        gpt2_gguf.NAMES.gguf("layers.0.attn.rotary.weight")
    assert os.listdir(tmp_path) == []


def test_files_lmzoo_cannot_build_are_refused(setup, tmp_path, monkeypatch):
    """Files written with one metadata key changed: grouped K/V heads; a context_length that is not the
    number of position_embd rows (llama.cpp refuses to load that too)."""
    meta = gpt2_gguf.metadata
    for name, write, err, msg in (
            ("kv", lambda w, cfg: (meta(w, cfg), w.add_head_count_kv(2)), ConfigError,
             r"grouped K/V heads \(head_count_kv 2"),
            ("ctx", lambda w, cfg: meta(w, cfg.replace(max_positions=256)), CheckpointError,
             "context_length 256 but position_embd has 128 rows")):
        monkeypatch.setattr(gpt2_gguf, "metadata", write)
        export_gguf(setup["untied"]["model"], None, tmp_path / f"{name}.gguf")
        monkeypatch.setattr(gpt2_gguf, "metadata", meta)
        with pytest.raises(err, match=msg):
            read_gguf(tmp_path / f"{name}.gguf")
