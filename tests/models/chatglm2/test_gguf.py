"""GGUF export/import of tiny ChatGLM2s (GQA-2 with q/k/v bias, untied head, GLM-4's theta 10000·500, half
of each head rotating; MQA without bias, tied head, ChatGLM2-32k's linear position interpolation, a quarter
rotating, GLM-4's eps 1.5625e-7), checked by llama.cpp itself (llama-cpp-python, in a subprocess) and by
the round trip: transformers has no GGUF loader for chatglm.

Weights are N(0, 0.15²), biases N(0, 0.1²) and the RMSNorm gains 1 + N(0, 0.1²), so that a bias, a gain,
a swapped gate/up or a wrong RoPE pairing moves the logits by far more than the tolerance; the llama.cpp
test measures how far lmzoo's logits move under each of those mistakes, next to the real difference.
The files carry the speedrun's sp-bpe tokenizer (written as ``llama``, as the converter writes ChatGLM3's
SentencePiece vocabulary).
"""

import copy
import dataclasses
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lmzoo
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.interop.gguf import export_gguf, read_gguf
from lmzoo.models.chatglm2 import gguf as glm_gguf
from lmzoo.models.chatglm2.config import PRESETS, ChatGLM2Config
from lmzoo.nn.position import RopeConfig
from tests.gguf_cases import one_thread, TEXTS, EN, ZH, rounded as rounded_copy  # noqa: F401 (one_thread: a fixture)
from tests.shared_data import need_llamacpp

gguf = pytest.importorskip("gguf")

SMALL = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, head_dim=16, d_ff=96, max_positions=128)
KINDS = {"gqa": dict(n_kv_heads=2, attention_bias=True, tie_embeddings=False,
                     rope=RopeConfig(theta=10000.0 * 500, rotary_fraction=0.5, interleaved=True)),
         "mqa": dict(n_kv_heads=1, attention_bias=False, tie_embeddings=True, norm_eps=1.5625e-7,
                     rope=RopeConfig(theta=10000.0, rotary_fraction=0.25, interleaved=True, scaling_type="linear",
                                     scaling={"factor": 4.0}))}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(kind, seed):
    torch.manual_seed(seed)
    model = lmzoo.build(ChatGLM2Config(**SMALL, **KINDS[kind])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.15 if p.ndim == 2 else 0.1)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = lmzoo.train_tokenizer("sp-bpe", texts=TEXTS, vocab_size=300)
    d = tmp_path_factory.mktemp("chatglm2gguf")
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
    """``model`` as the file rounds it (tests/gguf_cases.py)."""
    return rounded_copy(model, type)


def variant(model, **changes):
    """``model``'s weights in a model built from a changed config (another RoPE)."""
    other = lmzoo.build(model.config.replace(**changes)).eval()
    other.load_state_dict(model.state_dict())
    return other


def rewrite(src, dst, split_qkv=False, extra=None, keys=None):
    """``src`` written again: q|k|v split into attn_q/attn_k/attn_v (what the converter writes for a
    GlmForCausalLM), an ``extra`` tensor added, metadata ``keys`` replaced."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "chatglm")
    arch = r.get_field("general.architecture").contents()
    q, kv = (int(r.get_field(f"{arch}.attention.{k}").contents()) * SMALL["head_dim"]
             for k in ("head_count", "head_count_kv"))
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if keys and field.name in keys:
            w.add_key_value(field.name, keys[field.name], gguf.GGUFValueType.STRING)
        elif field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(field.name, field.contents(), field.types[0], sub_type=field.types[-1])
        else:
            w.add_key_value(field.name, field.contents(), field.types[0])
    for t in r.tensors:
        data = np.array(t.data)
        if split_qkv and ".attn_qkv." in t.name:
            for name, part in zip(("attn_q", "attn_k", "attn_v"), np.split(data, [q, q + kv], axis=0)):
                w.add_tensor(t.name.replace("attn_qkv", name), np.ascontiguousarray(part), raw_dtype=t.tensor_type)
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_metadata_names_and_types(setup):
    r = gguf.GGUFReader(str(setup["gqa"]["files"]["q8_0"]))
    f = lambda k: r.get_field(k).contents()  # noqa: E731
    assert f("general.architecture") == "chatglm" and f("chatglm.block_count") == 2
    assert f("chatglm.embedding_length") == 64 and f("chatglm.feed_forward_length") == 96
    assert f("chatglm.context_length") == 128 and f("chatglm.attention.head_count") == 4
    assert f("chatglm.attention.head_count_kv") == 2 and f("chatglm.rope.dimension_count") == 8
    assert f("chatglm.rope.freq_base") == 5e6 and f("chatglm.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert r.get_field("chatglm.attention.key_length") is None  # as the converter: head_dim = 64 / 4
    assert r.get_field("chatglm.rope.scaling.type") is None
    assert f("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0 and f("tokenizer.ggml.model") == "llama"
    types = {t.name: t.tensor_type.name for t in r.tensors}
    layer = ["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"]
    want = {f"blk.{i}.{n}.weight" for i in range(2) for n in layer} | {f"blk.{i}.attn_qkv.bias" for i in range(2)}
    assert set(types) == want | {"token_embd.weight", "output_norm.weight", "output.weight"}
    assert types["blk.0.attn_qkv.weight"] == "Q8_0" and types["blk.1.ffn_up.weight"] == "Q8_0"
    assert types["blk.0.attn_qkv.bias"] == "F32" and types["blk.0.ffn_norm.weight"] == "F32"
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in r.tensors}
    assert shapes["blk.0.attn_qkv.weight"] == (64 + 2 * 2 * 16, 64) and shapes["blk.0.ffn_up.weight"] == (192, 64)
    # the fused rows: all query heads, then the groups' keys, then their values; gate rows, then up rows
    r32 = gguf.GGUFReader(str(setup["gqa"]["files"]["f32"]))
    t32 = {t.name: np.array(t.data) for t in r32.tensors}
    layer1 = setup["gqa"]["model"].layers[1]
    a, m = layer1.attn, layer1.mlp
    np.testing.assert_array_equal(t32["blk.1.attn_qkv.bias"][64:96], a.k_proj.bias.detach().numpy())
    np.testing.assert_array_equal(t32["blk.1.attn_qkv.weight"][96:], a.v_proj.weight.detach().numpy())
    np.testing.assert_array_equal(t32["blk.1.ffn_up.weight"][:96], m.gate_proj.weight.detach().numpy())
    # MQA: no bias, a tied head (no output.weight), linear scaling and a quarter of each head rotating
    rm = gguf.GGUFReader(str(setup["mqa"]["files"]["f32"]))
    names = {t.name for t in rm.tensors}
    assert "output.weight" not in names and "blk.0.attn_qkv.bias" not in names
    g = lambda k: rm.get_field(k).contents()  # noqa: E731
    assert g("chatglm.rope.scaling.type") == "linear" and g("chatglm.rope.scaling.factor") == 4.0
    assert g("chatglm.rope.dimension_count") == 4 and g("chatglm.attention.head_count_kv") == 1


def test_presets_metadata():
    """ChatGLM2/3 and GLM-4's published numbers as the converter writes them (10000·rope_ratio for GLM-4)."""
    class Recorder:
        def __init__(self):
            self.kv = {}

        def __getattr__(self, name):
            return lambda value: self.kv.__setitem__(name.removeprefix("add_"), value)

    got = {}
    for name in ("chatglm3-6b", "glm-4-9b"):
        glm_gguf.check(SimpleNamespace(config=PRESETS[name]))
        w = Recorder()
        glm_gguf.metadata(w, PRESETS[name])
        got[name] = w.kv
    assert got["chatglm3-6b"]["rope_dimension_count"] == 64 and got["chatglm3-6b"]["rope_freq_base"] == 10000.0
    assert got["chatglm3-6b"]["head_count_kv"] == 2 and got["chatglm3-6b"]["feed_forward_length"] == 13696
    assert got["glm-4-9b"]["rope_freq_base"] == 5e6 and got["glm-4-9b"]["layer_norm_rms_eps"] == 1.5625e-7
    assert got["glm-4-9b"]["context_length"] == 131072 and "rope_scaling_type" not in got["glm-4-9b"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip(setup, kind):
    """F32 back exactly (same config); Q8_0 as the rounded reference."""
    s = setup[kind]
    back = lmzoo.load(s["files"]["f32"])
    diff = (logits_of(back, setup["ids"]) - s["ref"]).abs().max().item()
    want, got = s["model"].config, back.config
    for field in ("n_kv_heads", "head_dim", "d_ff", "max_positions", "tie_embeddings", "attention_bias"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.norm_eps == pytest.approx(want.norm_eps, rel=1e-7)  # GGUF stores it as float32
    assert got.rope == want.rope
    q8, _ = read_gguf(s["files"]["q8_0"])
    ref_q = logits_of(rounded(s["model"], "q8_0"), setup["ids"])
    diff_q = (logits_of(q8, setup["ids"]) - ref_q).abs().max().item()
    moved = (ref_q - s["ref"]).abs().max().item()
    print(f"{kind} round trip max|Δlogit|: f32 {diff:.2e}, q8_0 vs rounded {diff_q:.2e} (rounding moved {moved:.2e})")
    assert diff <= 1e-6 and diff_q <= 1e-6 and moved > 100 * max(diff_q, 1e-6)


@pytest.fixture(scope="module")
def split_file(setup):
    return rewrite(setup["gqa"]["files"]["f32"], setup["dir"] / "split.gguf", split_qkv=True)


def test_separate_qkv_file_reads_the_same(setup, split_file):
    """The converter writes a GlmForCausalLM with separate attn_q/attn_k/attn_v: read back the same."""
    f = split_file
    assert {"blk.0.attn_q.bias", "blk.1.attn_v.weight"} <= {t.name for t in gguf.GGUFReader(str(f)).tensors}
    model, _ = read_gguf(f)
    diff = (logits_of(model, setup["ids"]) - setup["gqa"]["ref"]).abs().max().item()
    print(f"separate q/k/v file max|Δlogit|: {diff:.2e}")
    assert diff <= 1e-6


# -- llama.cpp itself ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llamacpp():
    return need_llamacpp()


def test_llamacpp_logits_greedy_and_tokens(setup, llamacpp, tmp_path):
    """llama.cpp on the F32 files (F32 KV cache): logits within 1e-4 of lmzoo; lmzoo with the mistakes a
    wrong layout would make (half-split RoPE, gate and up swapped, linear scaling dropped) is far off;
    the same 16 greedy ids as lmzoo.generate; the same token ids for English and Chinese text, with the
    sp-bpe (``llama``) and a byte-level BPE (``gpt2``, pre-tokenizer ``gpt-2``) vocabulary."""
    ids, tok = setup["ids"], setup["tok"]
    ops = [{"op": "logits", "ids": ids}, {"op": "greedy", "ids": ids[:8], "n": 16},
           {"op": "tokenize", "texts": [EN, ZH], "add_bos": False, "special": False}]
    results = {k: llamacpp.run(setup[k]["files"]["f32"], ops, n_threads=1) for k in KINDS}
    for kind, (lg, ids16, toks) in results.items():
        got, model = llamacpp._unpack(lg), setup[kind]["model"]
        diff = np.abs(got - setup[kind]["ref"].numpy()).max()
        swapped = copy.deepcopy(model)
        for layer in swapped.layers:
            layer.mlp.gate_proj, layer.mlp.up_proj = layer.mlp.up_proj, layer.mlp.gate_proj
        rope = model.config.rope
        wrong = {"half-split RoPE": variant(model, rope=dataclasses.replace(rope, interleaved=False)),
                 "gate/up swapped": swapped}
        if kind == "mqa":
            wrong["no linear scaling"] = variant(model, rope=dataclasses.replace(rope, scaling_type="default",
                                                                                 scaling={}))
        off = {w: np.abs(got - logits_of(m, ids).numpy()).max() for w, m in wrong.items()}
        print(f"{kind} f32 max|Δlogit| vs llama.cpp: {diff:.2e}; lmzoo with "
              + ", ".join(f"{w}: {v:.2e}" for w, v in off.items()))
        assert diff <= 1e-4 and min(off.values()) > 1e-2
        want = lmzoo.generate(model, torch.tensor([ids[:8]]), max_new_tokens=16)[0, 8:].tolist()
        print(f"{kind} greedy: {len(set(want))} distinct ids of 16, equal: {ids16 == want}")
        assert ids16 == want and len(set(want)) > 4
        assert toks == [tok.encode(EN), tok.encode(ZH)]
    assert any(t >= 200 for t in results["gqa"][2][1])  # the Chinese sentence reaches learned merges
    bpe = lmzoo.train_tokenizer("bpe", texts=TEXTS, vocab_size=300)  # byte-level BPE: gpt2 + pre gpt-2
    export_gguf(setup["mqa"]["model"], bpe, tmp_path / "bpe.gguf")
    assert llamacpp.tokenize(tmp_path / "bpe.gguf", [EN, ZH], n_threads=1) == [bpe.encode(EN), bpe.encode(ZH)]


def test_llamacpp_reads_separate_qkv_file(setup, llamacpp, split_file):
    diff = np.abs(llamacpp.logits(split_file, setup["ids"], n_threads=1) - setup["gqa"]["ref"].numpy()).max()
    print(f"separate q/k/v file max|Δlogit| vs llama.cpp: {diff:.2e}")
    assert diff <= 1e-4


def q8_0_activations(model):
    """``rounded(model, "q8_0")`` whose every matmul input also goes through Q8_0 and back, along the
    input features: llama.cpp's CPU Q8_0 matmul quantizes the activations (ggml's vec_dot_type) and
    multiplies integer blocks. The embedding lookup (get_rows) and attention (F32 KV cache) are not rounded."""
    qtype, out = gguf.GGMLQuantizationType.Q8_0, rounded(model, "q8_0")

    def round_input(module, args):
        x = args[0]
        a = gguf.quants.quantize(x.detach().reshape(-1, x.shape[-1]).numpy().astype(np.float32), qtype)
        return (torch.from_numpy(gguf.quants.dequantize(a, qtype).reshape(x.shape).copy()),)

    for m in out.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(round_input)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_llamacpp_q8_0_equals_rounded_weights_and_activations(setup, llamacpp, kind):
    """llama.cpp's Q8_0 file equals lmzoo on the rounded weights with Q8_0-rounded matmul inputs; the
    activation rounding alone moves the logits by ~0.2, so the match checks the fused layout too.

    The match is exact (~1e-6) up to the first activation that sits on a Q8_0 rounding edge, where the two
    sides' float32 sums (ggml's against torch's, ~1e-7 apart) pick neighbouring integers; from that token on
    the logits differ by ~1e-2 (measured here: seeds 0-2 of three configs first flip at token 21-61 of 78,
    or never). So: most tokens (the median) match to 1e-4, and on average the file is 5x closer to the
    rounded-activation model than to the weights-only one (measured 7x-180x; a wrong layout moves ~1)."""
    ref_q = logits_of(q8_0_activations(setup[kind]["model"]), setup["ids"]).numpy()
    weights_only = logits_of(rounded(setup[kind]["model"], "q8_0"), setup["ids"]).numpy()
    got = llamacpp.logits(setup[kind]["files"]["q8_0"], setup["ids"], n_threads=1)
    diff, loose = np.abs(got - ref_q), np.abs(got - weights_only)
    per_token = diff.max(axis=1)
    print(f"{kind} q8_0 |Δlogit| vs llama.cpp with rounded activations: median token {np.median(per_token):.2e}, "
          f"max {diff.max():.2e}, mean {diff.mean():.2e} ({(per_token > 1e-4).sum()}/{len(per_token)} tokens "
          f"past a rounding edge); weights only: mean {loose.mean():.2e}, max {loose.max():.2e}")
    assert np.median(per_token) <= 1e-4 and 5 * diff.mean() < loose.mean() and diff.max() < 0.5


# -- bad input --------------------------------------------------------------------------------------
def test_configs_llamacpp_cannot_run_are_refused_before_writing(setup, tmp_path):
    out, tok = tmp_path / "x.gguf", setup["tok"]
    rope = dict(rotary_fraction=0.5, interleaved=True)
    bad = [(dict(act="gelu"), "act 'gelu' has no llama.cpp equivalent"),
           (dict(head_dim=24), r"n_heads·head_dim = 96 != d_model 64"),
           (dict(rope=RopeConfig(rotary_fraction=0.5, interleaved=False)), "rope.interleaved=False"),
           (dict(rope=RopeConfig(**rope, scaling_type="dynamic", scaling={"factor": 2.0})),
            "RoPE scaling 'dynamic' is not supported")]
    for over, what in bad:
        model = lmzoo.build(ChatGLM2Config(**{**SMALL, "n_layers": 1, **over}))
        with pytest.raises(ConfigError, match=what):
            export_gguf(model, tok, out)
    wp = lmzoo.train_tokenizer("wordpiece", texts=TEXTS, vocab_size=200)
    with pytest.raises(ConfigError, match="cannot be expressed in GGUF"):
        export_gguf(setup["gqa"]["model"], wp, out)
    assert os.listdir(tmp_path) == []


def test_unknown_names_fail_loudly(setup, tmp_path):
    with pytest.raises(CheckpointError, match="no llama.cpp name for the lmzoo tensor 'layers.0.attn.rope.x'"):
        glm_gguf.NAMES.gguf("layers.0.attn.rope.x")
    f = rewrite(setup["mqa"]["files"]["f32"], tmp_path / "extra.gguf",
                extra={"blk.0.attn_rot_embd.weight": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match="unknown GGUF tensor 'blk.0.attn_rot_embd.weight' for chatglm"):
        read_gguf(f)
    f = rewrite(setup["mqa"]["files"]["f32"], tmp_path / "yarn.gguf", keys={"chatglm.rope.scaling.type": "yarn"})
    with pytest.raises(ConfigError, match="chatglm rope scaling 'yarn' is not supported"):
        read_gguf(f)
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")
