"""GGUF export/import of tiny Blooms (6 heads, tied head: ALiBi slopes for a head count that is not a power
of two; 4 heads, own head), checked by transformers' GGUF loader (which undoes the converter's q|k|v
regrouping itself) and by llama.cpp (llama-cpp-python, in a subprocess).

Weights: lmzoo's init with the norms and biases moved off 1 and 0 (so each one's name is tested) and
the embedding at std 0.1, so the tied head's logits are O(1) (the embedding LayerNorm makes the body
blind to that scale). llama.cpp's CPU GELU is a table of F16 values indexed by the F16-rounded input:
a float32-level difference in an MLP input flips that rounding and moves these logits by ~1e-4 (a 1e-7
relative perturbation of the inputs does as much in lmzoo), so the 1e-4 check runs on a copy whose
MLP output weights are zero, and the whole model is compared with lmzoo running llama.cpp's F16 GELU.
"""

import copy
import os

import numpy as np
import pytest
import torch

import lmzoo
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.interop.gguf import export_gguf, read_gguf
from lmzoo.models.bloom import gguf as bloom_gguf
from lmzoo.models.bloom.config import BloomConfig
from lmzoo.nn.position import alibi_slopes
from tests.gguf_cases import one_thread, EN, ZH, rounded as rounded_copy, llamacpp_gelu  # noqa: F401 (one_thread: a fixture)
from tests.shared_data import need_llamacpp

gguf = pytest.importorskip("gguf")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is a small test of tokenizers.",
         "我们今天去公园散步，天气很好。", "机器学习是人工智能的一个分支。", 'He said "yes." Then: "no!" (maybe).'] * 20
QUOTE = 'He said "yes." Then: "no!"'  # GPT-2's split keeps ." and !" whole (merges of them exist); bloom's cuts them
MODELS = {"tied6": dict(d_model=96, n_heads=6, tie_embeddings=True),
          "untied4": dict(d_model=64, n_heads=4, tie_embeddings=False)}


pytestmark = pytest.mark.usefixtures("one_thread")


def make(seed, **kw):
    torch.manual_seed(seed)
    model = lmzoo.build(BloomConfig(vocab_size=320, n_layers=2, max_positions=128, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            elif name in ("embed.weight", "lm_head.weight"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = lmzoo.train_tokenizer("bpe", texts=TEXTS, vocab_size=300)
    d = tmp_path_factory.mktemp("bloomgguf")
    ids = tok.encode(EN + ZH)
    out = {"tok": tok, "dir": d, "ids": ids}
    for seed, (kind, kw) in enumerate(MODELS.items()):
        model = make(seed, **kw)
        files = {t: d / f"{kind}-{t}.gguf" for t in ("f32", "q8_0")}
        for t, f in files.items():
            export_gguf(model, tok, f, type=t)
        out[kind] = dict(model=model, files=files, ref=logits_of(model, ids))
    return out


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def rounded(model, type):
    """``model`` as the file rounds it (tests/gguf_cases.py)."""
    return rounded_copy(model, type)


def fp16_gelu(model):
    """A copy whose GELU is llama.cpp's CPU one: F16 table of the F16-rounded input, exact past |x| >= 10."""
    act, out = llamacpp_gelu("gelu_tanh"), copy.deepcopy(model)
    for m in out.modules():
        if getattr(m, "act_name", None) == "gelu_tanh":
            m.act = act
    return out


def hf_logits(setup, kind, type):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(setup["dir"], gguf_file=setup[kind]["files"][type].name,
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([setup["ids"]])).logits[0]


def test_metadata_names_and_types(setup, tmp_path):
    r = gguf.GGUFReader(str(setup["tied6"]["files"]["q8_0"]))
    f = lambda k: r.get_field(k).contents()  # noqa: E731
    assert f("general.architecture") == "bloom" and f("bloom.block_count") == 2 and f("bloom.context_length") == 128
    assert f("bloom.embedding_length") == 96 and f("bloom.feed_forward_length") == 384
    assert f("bloom.attention.head_count") == 6 and f("bloom.attention.head_count_kv") == 6
    assert f("bloom.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert f("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f("tokenizer.ggml.model") == "gpt2" and f("tokenizer.ggml.pre") == "gpt-2"
    types = {t.name: t.tensor_type.name for t in r.tensors}
    layer = [f"blk.{i}.{n}.{k}" for i in range(2) for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm",
                                                             "ffn_up", "ffn_down") for k in ("weight", "bias")]
    top = ["token_embd.weight", "token_embd_norm.weight", "token_embd_norm.bias", "output_norm.weight",
           "output_norm.bias"]
    assert set(types) == set(top + layer)  # tied: no output.weight, llama.cpp reuses token_embd
    assert types["blk.1.attn_qkv.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.1.attn_qkv.bias"] == "F32" and types["token_embd_norm.weight"] == "F32"
    untied = {t.name for t in gguf.GGUFReader(str(setup["untied4"]["files"]["f32"])).tensors}
    assert "output.weight" in untied
    # attn_qkv is the converter's regrouping of transformers' per-head query_key_value: (H, 3, hd, d) -> q|k|v
    from safetensors.torch import load_file

    lmzoo.save(setup["tied6"]["model"], tmp_path)
    hf = load_file(tmp_path / "model.safetensors")
    t = {x.name: np.array(x.data) for x in gguf.GGUFReader(str(setup["tied6"]["files"]["f32"])).tensors}
    for kind in ("weight", "bias"):
        fused = hf[f"transformer.h.1.self_attention.query_key_value.{kind}"]
        grouped = fused.reshape(6, 3, 16, *fused.shape[1:])
        want = torch.cat([grouped[:, j].reshape(96, *fused.shape[1:]) for j in range(3)])
        np.testing.assert_array_equal(t[f"blk.1.attn_qkv.{kind}"], want.numpy())
        assert not torch.equal(want, fused)  # the regrouping moved rows


@pytest.mark.parametrize("kind", list(MODELS))
def test_f32_equals_transformers(setup, kind):
    diff = (hf_logits(setup, kind, "f32") - setup[kind]["ref"]).abs().max().item()
    print(f"{kind} f32 max|Δlogit| vs transformers: {diff:.2e} (logit std {setup[kind]['ref'].std():.2f})")
    assert diff <= 1e-5


def test_q8_0_equals_transformers_on_rounded_weights(setup):
    s = setup["tied6"]
    ref_q = logits_of(rounded(s["model"], "q8_0"), setup["ids"])
    diff = (hf_logits(setup, "tied6", "q8_0") - ref_q).abs().max().item()
    moved = (ref_q - s["ref"]).abs().max().item()
    print(f"q8_0 max|Δlogit| vs transformers: {diff:.2e} (rounding moved the logits by {moved:.2e})")
    assert diff <= 1e-5 and moved > 100 * diff


@pytest.mark.parametrize("kind", list(MODELS))
def test_round_trip(setup, kind):
    s = setup[kind]
    back, tok = read_gguf(s["files"]["f32"])
    got, want = back.config, s["model"].config
    assert (got.d_model, got.n_heads, got.n_layers, got.d_ff, got.max_positions, got.tie_embeddings) == \
        (want.d_model, want.n_heads, 2, want.d_ff, 128, want.tie_embeddings)
    assert tok.encode(EN + ZH) == setup["ids"]
    diff = (logits_of(back, setup["ids"]) - s["ref"]).abs().max().item()
    q8 = lmzoo.load(s["files"]["q8_0"])  # lmzoo.load routes a .gguf to read_gguf
    diff_q = (logits_of(q8, setup["ids"]) - logits_of(rounded(s["model"], "q8_0"), setup["ids"])).abs().max().item()
    print(f"{kind} round trip max|Δlogit|: f32 {diff:.2e}, q8_0 vs rounded {diff_q:.2e}")
    assert diff <= 1e-6 and diff_q <= 1e-6


def ggml_slopes(n_head, max_bias=8.0):
    """ALiBi slopes as ggml_soft_max_ext computes them (ggml-cpu/ops.cpp), in float32; llama.cpp's bloom
    sets max_bias = 8."""
    n2 = 1 << int(np.floor(np.log2(n_head)))
    m0, m1 = np.float32(2.0) ** np.float32(-max_bias / n2), np.float32(2.0) ** np.float32(-max_bias / 2 / n2)
    return np.array([m0 ** (h + 1) if h < n2 else m1 ** (2 * (h - n2) + 1) for h in range(n_head)], np.float32)


def test_alibi_slopes_are_llamacpps():
    """Every head count, the power-of-two ones and the rest (6: 2^-2, 2^-4, 2^-6, 2^-8, then 2^-1, 2^-3)."""
    worst = max(np.abs(ggml_slopes(n) / alibi_slopes(n).numpy() - 1).max() for n in range(1, 129))
    print(f"ALiBi slopes, n_head 1..128: max relative difference to ggml's {worst:.1e}")
    assert worst <= 1e-6
    assert alibi_slopes(6).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]


# -- llama.cpp itself ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llamacpp():
    return need_llamacpp()


def test_llamacpp_logits_greedy_and_tokens(setup, llamacpp, tmp_path):
    """llama.cpp on the F32 files (F32 KV cache): within 1e-4 of lmzoo with the MLPs' output at zero, within
    the F16-GELU noise (~1e-4) of lmzoo with llama.cpp's GELU, 1e-3 of lmzoo's exact one; a 6-head ALiBi
    with the slopes of a ceil(log2 n) rule is far off. The same 16 greedy ids, the same EN and ZH token ids."""
    ids, tok, s = setup["ids"], setup["tok"], setup["tied6"]
    quiet = copy.deepcopy(s["model"])
    with torch.no_grad():
        for layer in quiet.layers:
            layer.mlp.down_proj.weight.zero_()
    export_gguf(quiet, tok, tmp_path / "quiet.gguf")
    lg, toks = llamacpp.run(s["files"]["f32"], [
        {"op": "logits", "ids": ids}, {"op": "tokenize", "texts": [EN, ZH], "add_bos": False, "special": False}],
        n_threads=1)
    lg = llamacpp._unpack(lg)
    quiet_lg = llamacpp.logits(tmp_path / "quiet.gguf", ids, n_threads=1)
    quiet_diff = np.abs(quiet_lg - logits_of(quiet, ids).numpy()).max()
    # greedy on the untied model: a random tied head mostly predicts the token just read (its embedding
    # is still in the residual stream), so the tied model would repeat one id
    u = setup["untied4"]
    lg_u, ids16 = llamacpp.run(u["files"]["f32"], [{"op": "logits", "ids": ids},
                                                   {"op": "greedy", "ids": ids[:8], "n": 16}], n_threads=1)
    untied = np.abs(llamacpp._unpack(lg_u) - logits_of(fp16_gelu(u["model"]), ids).numpy()).max()
    gelu16 = np.abs(lg - logits_of(fp16_gelu(s["model"]), ids).numpy()).max()
    exact = np.abs(lg - s["ref"].numpy()).max()
    ceil = copy.deepcopy(s["model"])
    ceil.positions.slopes = torch.tensor([2.0 ** -(h + 1) for h in range(6)])  # n' = 8: 2^(-8/8 (h+1))
    wrong = np.abs(lg - logits_of(ceil, ids).numpy()).max()
    print(f"max|Δlogit| vs llama.cpp: MLP output zero {quiet_diff:.2e}; with llama.cpp's F16 GELU {gelu16:.2e} "
          f"(untied 4-head {untied:.2e}); exact GELU {exact:.2e}; ceil-rule slopes {wrong:.2e}")
    assert quiet_diff <= 1e-4 and gelu16 <= 3e-4 and untied <= 3e-4 and exact <= 2e-3 and wrong > 0.05
    want = lmzoo.generate(u["model"], torch.tensor([ids[:8]]), max_new_tokens=16)[0, 8:].tolist()
    print(f"greedy ids: {want}")
    assert ids16 == want and len(set(want)) >= 3  # a random model falls into a short cycle; the same one
    assert toks == [tok.encode(EN), tok.encode(ZH)]


def test_bloom_pre_tokenizer_is_not_lmzoos_split(setup, llamacpp, tmp_path, monkeypatch):
    """Why the file says ``gpt-2``: written as ``bloom`` (BigScience's regex), llama.cpp cuts the ." and !"
    that lmzoo's byte-level BPE (GPT-2's split) keeps whole; EN and ZH happen to agree either way."""
    tok = setup["tok"]
    monkeypatch.setattr(bloom_gguf, "BPE_PRE", "bloom")
    export_gguf(setup["tied6"]["model"], tok, tmp_path / "bloom-pre.gguf")
    assert gguf.GGUFReader(str(tmp_path / "bloom-pre.gguf")).get_field("tokenizer.ggml.pre").contents() == "bloom"
    as_bloom = llamacpp.tokenize(tmp_path / "bloom-pre.gguf", [EN, ZH, QUOTE], n_threads=1)
    as_gpt2 = llamacpp.tokenize(setup["tied6"]["files"]["f32"], [QUOTE], n_threads=1)
    ours = tok.encode(QUOTE)
    print(f"{QUOTE!r}: lmzoo {len(ours)} ids, llama.cpp gpt-2 {len(as_gpt2[0])}, bloom {len(as_bloom[2])}")
    assert as_bloom[:2] == [tok.encode(EN), tok.encode(ZH)]
    assert as_gpt2[0] == ours and as_bloom[2] != ours
    assert [tok.id_to_token(i) for i in as_bloom[2]].count('"') > [tok.id_to_token(i) for i in ours].count('"')


def test_llamacpp_q8_0_close_to_rounded_weights(setup, llamacpp):
    """llama.cpp also rounds the activations to 8 bits in its Q8_0 matmuls: near, not at, the rounded reference."""
    ref_q = logits_of(fp16_gelu(rounded(setup["tied6"]["model"], "q8_0")), setup["ids"]).numpy()
    got = llamacpp.logits(setup["tied6"]["files"]["q8_0"], setup["ids"], n_threads=1)
    diff = np.abs(got - ref_q).max()
    unrounded = np.abs(got - logits_of(fp16_gelu(setup["tied6"]["model"]), setup["ids"]).numpy()).max()
    print(f"q8_0 max|Δlogit| vs llama.cpp: {diff:.2e} (vs the unrounded weights {unrounded:.2e})")
    assert diff <= 0.05


# -- bad input --------------------------------------------------------------------------------------
def test_refused_before_writing(setup, tmp_path):
    from tokenizers import Regex, Tokenizer as HF, pre_tokenizers

    from lmzoo.tokenizers import Tokenizer
    from lmzoo.tokenizers.backends import TokenizersBackend

    out, model, tok = tmp_path / "x.gguf", setup["tied6"]["model"], setup["tok"]
    with pytest.raises(ConfigError, match="unsupported type 'q3_k'"):
        export_gguf(model, tok, out, type="q3_k")
    # BigScience's own tokenizer: its regex Split, then ByteLevel without the GPT-2 regex
    hf = HF.from_str(tok.backend.tok.to_str())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bigscience = Tokenizer(TokenizersBackend(hf), roles={}, name="bigscience-style")
    with pytest.raises(ConfigError, match="cannot be expressed in GGUF"):
        export_gguf(model, bigscience, out)
    small = lmzoo.build(BloomConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4))
    with pytest.raises(ConfigError, match="more than the model's vocab_size 256"):
        export_gguf(small, tok, out)
    assert os.listdir(tmp_path) == []
    with pytest.raises(CheckpointError, match="no llama.cpp name for the lmzoo tensor 'layers.0.attn.rotary.weight'"):
        bloom_gguf.NAMES.gguf("layers.0.attn.rotary.weight")
    with pytest.raises(CheckpointError, match="unknown GGUF tensor 'blk.0.attn_q.weight' for bloom"):
        bloom_gguf.state({"blk.0.attn_q.weight": torch.zeros(4, 4)}, setup["untied4"]["model"].config)


def rewrite(src, dst, changes):
    """A copy of the GGUF file ``src`` with some metadata values replaced."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "bloom")
    for key, field in r.fields.items():
        if key.startswith("bloom.") or key == "tokenizer.ggml.model":
            w.add_key_value(key, changes.get(key, field.contents()), field.types[0])
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_files_lmzoo_cannot_build_are_refused(setup, tmp_path):
    src = setup["untied4"]["files"]["f32"]
    with pytest.raises(ConfigError, match="feed_forward_length 128; lmzoo's Bloom has 4·embedding_length = 256"):
        read_gguf(rewrite(src, tmp_path / "ff.gguf", {"bloom.feed_forward_length": 128}))
    with pytest.raises(ConfigError, match=r"grouped K/V heads \(head_count_kv 2 != head_count 4\)"):
        read_gguf(rewrite(src, tmp_path / "gqa.gguf", {"bloom.attention.head_count_kv": 2}))
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")
