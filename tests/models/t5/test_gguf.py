"""GGUF export/import of tiny T5s (v1.0: ReLU, tied and rescaled head; v1.1: GeGLU, own head, a shallower
decoder), checked by transformers' GGUF loader and by llama.cpp itself (``llama_encode`` + ``llama_decode``
through lmzoo/interop/llamacpp.py's seq2seq ops).

transformers is given the config: its GGUF loader reads every t5 file as gated (is_gated_act) with
ReLU and one decoder depth, so only its tensor mapping is the independent part here. llama.cpp needs
a vocabulary to load a file: the files carry the speedrun's sp-bpe tokenizer (the converter writes a
SentencePiece BPE T5 such as Pile-T5 the same way); lmzoo's unigram tokenizer is not expressible.
"""

import copy
import os

import numpy as np
import pytest
import torch

import lmzoo
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.interop.gguf import export_gguf, read_gguf
from lmzoo.models.t5.config import T5Config
from tests.gguf_cases import one_thread, TEXTS, EN, ZH, llamacpp_gelu  # noqa: F401 (one_thread: a fixture)
from tests.shared_data import need_llamacpp

gguf = pytest.importorskip("gguf")

SMALL = dict(vocab_size=320, d_model=64, n_heads=4, head_dim=16, d_ff=96, max_positions=128)
KINDS = {"v1_0": dict(n_layers=2, ffn="relu", tie_embeddings=True, scale_head=True),
         "v1_1": dict(n_layers=3, n_decoder_layers=2, ffn="gated-gelu", tie_embeddings=False, scale_head=False)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = lmzoo.train_tokenizer("sp-bpe", texts=TEXTS, vocab_size=300)
    d = tmp_path_factory.mktemp("t5gguf")
    enc = tok.encode(EN + ZH)
    dec = [0] + tok.encode(EN)[:9]  # the decoder start token, then some ids
    out = {"tok": tok, "dir": d, "enc": enc, "dec": dec}
    for seed, (kind, extra) in enumerate(KINDS.items()):
        torch.manual_seed(seed)
        model = lmzoo.build(T5Config(**SMALL, **extra)).eval()
        files = {t: d / f"{kind}-{t}.gguf" for t in ("f32", "q8_0")}
        for t, f in files.items():
            export_gguf(model, tok, f, type=t)
        out[kind] = dict(model=model, files=files, ref=logits_of(model, enc, dec))
    return out


def logits_of(model, enc, dec):
    with torch.no_grad():
        return model(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([dec])).logits[0]


def rounded(model, type):
    """``model`` as a q8_0 file holds it, built in lmzoo's layout: the head scale folded into an untied head
    (what the file stores), every matrix through ``type`` and back; a matrix whose rows do not split into
    32-element blocks (the (buckets, heads) bias tables) through F16, as the converter falls back."""
    qtype, f16 = getattr(gguf.GGMLQuantizationType, type.upper()), gguf.GGMLQuantizationType.F16
    out = copy.deepcopy(model)
    out.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * model.head_scale)
    out.head_scale = 1.0
    with torch.no_grad():
        for _, p in out.named_parameters():
            if p.ndim == 2:
                a = p.numpy().astype(np.float32)
                try:
                    back = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
                except gguf.QuantError:
                    back = gguf.quants.dequantize(gguf.quants.quantize(a, f16), f16)
                p.copy_(torch.from_numpy(back.reshape(p.shape).copy()))
    return out


def fp16_gelu(model):
    """A copy whose GELU is llama.cpp's CPU GELU: a table of F16 values indexed by the F16-rounded input
    (GGML_GELU_FP16), exact past |x| >= 10."""
    act, out = llamacpp_gelu("gelu_new"), copy.deepcopy(model)
    for m in out.modules():
        if getattr(m, "act_name", None) == "gelu_new":
            m.act = act
    return out


def hf_logits(setup, kind, type):
    import transformers

    cfg = setup[kind]["model"].config.replace(tie_embeddings=False, scale_head=False)  # the file's head: own, unscaled
    hf = transformers.T5ForConditionalGeneration.from_pretrained(
        setup["dir"], gguf_file=setup[kind]["files"][type].name, config=transformers.T5Config(**cfg.to_hf()),
        dtype=torch.float32)
    with torch.no_grad():
        return hf(input_ids=torch.tensor([setup["enc"]]), decoder_input_ids=torch.tensor([setup["dec"]])).logits[0]


def test_metadata_names_and_types(setup):
    r = gguf.GGUFReader(str(setup["v1_1"]["files"]["q8_0"]))
    f = lambda k: r.get_field(k).contents()  # noqa: E731
    assert f("general.architecture") == "t5" and f("t5.block_count") == 3 and f("t5.decoder_block_count") == 2
    assert f("t5.embedding_length") == 64 and f("t5.feed_forward_length") == 96 and f("t5.context_length") == 128
    assert f("t5.attention.head_count") == 4 and f("t5.attention.key_length") == 16
    assert f("t5.attention.relative_buckets_count") == 32 and f("t5.decoder_start_token_id") == 0
    assert f("t5.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert f("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0 and f("tokenizer.ggml.model") == "llama"
    types = {t.name: t.tensor_type.name for t in r.tensors}
    layer = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_o", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}
    cross = {"cross_attn_norm", "cross_attn_q", "cross_attn_k", "cross_attn_v", "cross_attn_o"}
    want = ({f"enc.blk.{i}.{n}.weight" for i in range(3) for n in layer}
            | {f"dec.blk.{i}.{n}.weight" for i in range(2) for n in layer | cross}
            | {"token_embd.weight", "output.weight", "enc.output_norm.weight", "dec.output_norm.weight",
               "enc.blk.0.attn_rel_b.weight", "dec.blk.0.attn_rel_b.weight"})
    assert set(types) == want
    assert types["enc.blk.0.attn_q.weight"] == "Q8_0" and types["dec.blk.1.cross_attn_k.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "Q8_0" and types["dec.blk.1.cross_attn_norm.weight"] == "F32"
    assert types["enc.blk.0.attn_rel_b.weight"] == "F16"  # rows of n_heads = 4: the converter's F16 fallback
    # v1.0: no ffn_gate, and the tied head written as embedding * d_model**-0.5 (llama.cpp applies no scale)
    r0 = gguf.GGUFReader(str(setup["v1_0"]["files"]["f32"]))
    t0 = {t.name: np.array(t.data) for t in r0.tensors}
    assert "enc.blk.0.ffn_gate.weight" not in t0
    emb = setup["v1_0"]["model"].embed.weight.detach().numpy()
    np.testing.assert_array_equal(t0["output.weight"], (torch.from_numpy(emb) * 64 ** -0.5).numpy())
    np.testing.assert_array_equal(t0["enc.blk.0.attn_rel_b.weight"],
                                  setup["v1_0"]["model"].encoder.position_bias.weight.detach().numpy())


@pytest.mark.parametrize("kind", list(KINDS))
def test_f32_equals_transformers(setup, kind):
    diff = (hf_logits(setup, kind, "f32") - setup[kind]["ref"]).abs().max().item()
    print(f"{kind} f32 max|Δlogit| vs transformers: {diff:.2e}")
    assert diff <= 1e-5


def test_q8_0_equals_transformers_on_rounded_weights(setup):
    ref_q = logits_of(rounded(setup["v1_1"]["model"], "q8_0"), setup["enc"], setup["dec"])
    diff = (hf_logits(setup, "v1_1", "q8_0") - ref_q).abs().max().item()
    moved = (ref_q - setup["v1_1"]["ref"]).abs().max().item()
    print(f"v1_1 q8_0 max|Δlogit| vs transformers: {diff:.2e} (rounding moved the logits by {moved:.2e})")
    assert diff <= 1e-5 and moved > 100 * diff


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip(setup, kind):
    """F32 back exactly (v1.0 as an untied, unscaled model with the folded head); Q8_0 as the rounded reference."""
    s = setup[kind]
    back = lmzoo.load(s["files"]["f32"])
    diff = (logits_of(back, setup["enc"], setup["dec"]) - s["ref"]).abs().max().item()
    want = s["model"].config
    got = back.config
    assert (got.ffn, got.n_decoder_layers, got.head_dim, got.num_buckets) == (want.ffn, want.n_decoder_layers, 16, 32)
    assert not got.tie_embeddings and not got.scale_head
    q8, _ = read_gguf(s["files"]["q8_0"])
    ref_q = logits_of(rounded(s["model"], "q8_0"), setup["enc"], setup["dec"])
    diff_q = (logits_of(q8, setup["enc"], setup["dec"]) - ref_q).abs().max().item()
    print(f"{kind} round trip max|Δlogit|: f32 {diff:.2e}, q8_0 vs rounded {diff_q:.2e}")
    assert diff <= 1e-6 and diff_q <= 1e-6


# -- llama.cpp itself ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llamacpp():
    return need_llamacpp()


def test_llamacpp_logits_greedy_and_tokens(setup, llamacpp):
    """llama.cpp's encoder + decoder on the F32 files (F32 KV cache). ReLU: within 1e-4 of lmzoo. GeGLU:
    llama.cpp's CPU GELU is an F16 table (~1e-3 relative), so lmzoo with that GELU is the 1e-4 reference
    and the plain one is ~1e-4 away. The same 16 greedy ids as lmzoo.generate, the same token ids."""
    enc, dec, tok = setup["enc"], setup["dec"], setup["tok"]
    ops = [{"op": "seq2seq_logits", "encoder_ids": enc, "decoder_ids": dec},
           {"op": "seq2seq_greedy", "encoder_ids": enc, "n": 16},
           {"op": "tokenize", "texts": [EN, ZH], "add_bos": False, "special": False}]
    (lg0, _, toks), (lg1, ids16, _) = (llamacpp.run(setup[k]["files"]["f32"], ops, n_threads=1) for k in KINDS)
    relu = np.abs(llamacpp._unpack(lg0) - setup["v1_0"]["ref"].numpy()).max()
    v11 = setup["v1_1"]["model"]
    gelu16 = np.abs(llamacpp._unpack(lg1) - logits_of(fp16_gelu(v11), enc, dec).numpy()).max()
    exact = np.abs(llamacpp._unpack(lg1) - setup["v1_1"]["ref"].numpy()).max()
    print(f"max|Δlogit| vs llama.cpp: relu {relu:.2e}; gated-gelu {gelu16:.2e} with llama.cpp's F16 GELU, "
          f"{exact:.2e} with the exact one")
    assert relu <= 1e-4 and gelu16 <= 1e-4 and exact <= 1e-3
    want = lmzoo.generate(v11, torch.tensor([enc]), max_new_tokens=16)[0, 1:].tolist()
    assert ids16 == want and len(set(want)) > 8
    assert toks == [tok.encode(EN), tok.encode(ZH)]


def test_llamacpp_q8_0_close_to_rounded_weights(setup, llamacpp):
    """llama.cpp rounds the activations to 8 bits in its Q8_0 matmuls too: near, not at, the rounded reference."""
    ref_q = logits_of(rounded(setup["v1_0"]["model"], "q8_0"), setup["enc"], setup["dec"]).numpy()
    got = llamacpp.seq2seq_logits(setup["v1_0"]["files"]["q8_0"], setup["enc"], setup["dec"], n_threads=1)
    diff = np.abs(got - ref_q).max()
    print(f"v1_0 q8_0 max|Δlogit| vs llama.cpp: {diff:.2e}")
    assert diff <= 0.05


# -- bad input --------------------------------------------------------------------------------------
def test_configs_llamacpp_cannot_run_are_refused_before_writing(setup, tmp_path):
    out = tmp_path / "x.gguf"
    deep = lmzoo.build(T5Config(**SMALL, n_layers=1, n_decoder_layers=2))
    with pytest.raises(ConfigError, match=r"more decoder layers \(2\) than encoder layers \(1\)"):
        export_gguf(deep, None, out)
    far = lmzoo.build(T5Config(**SMALL, n_layers=1, max_distance=64))
    with pytest.raises(ConfigError, match="max_distance=64; llama.cpp's relative position buckets are fixed at"):
        export_gguf(far, None, out)
    silu = lmzoo.build(T5Config(**SMALL, n_layers=1, ffn="gated-silu"))
    with pytest.raises(ConfigError, match="ffn 'gated-silu' has no llama.cpp equivalent"):
        export_gguf(silu, None, out)
    uni = lmzoo.train_tokenizer("unigram", texts=TEXTS, vocab_size=200, sentinels=10)
    with pytest.raises(ConfigError, match="cannot be expressed in GGUF"):
        export_gguf(setup["v1_1"]["model"], uni, out)
    assert os.listdir(tmp_path) == []


def test_file_without_output_is_refused(setup, tmp_path):
    """The converter leaves a tied head out; whether it was rescaled is then not in the file."""
    r = gguf.GGUFReader(str(setup["v1_0"]["files"]["f32"]))
    w = gguf.GGUFWriter(str(tmp_path / "tied.gguf"), "t5")
    for key in ("t5.block_count", "t5.embedding_length", "t5.attention.head_count", "t5.feed_forward_length",
                "t5.attention.layer_norm_rms_epsilon"):
        field = r.get_field(key)
        w.add_key_value(key, field.contents(), field.types[0])
    for t in r.tensors:
        if t.name != "output.weight":
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="without output.weight"):
        read_gguf(tmp_path / "tied.gguf")
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")
