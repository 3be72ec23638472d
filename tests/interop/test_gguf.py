"""GGUF export/import of a tiny LLaMA, checked by two independent readers: transformers' GGUF loader
(which undoes llama.cpp's Q/K permutation itself) and llama.cpp (llama-cpp-python, in a subprocess).

The rounded reference for the quantized types is built in lmzoo's own layout: blocks of 32 run along
a row (the input features) and the permutation only reorders rows, so quantizing lmzoo's matrices
directly rounds the same numbers without using the exporter's permutation code.
"""

import copy
import os

import numpy as np
import pytest
import torch

import lmzoo
from lmzoo.cli.main import main
from lmzoo.errors import ConfigError
from lmzoo.interop.gguf import export_gguf, read_gguf
from lmzoo.models.llama.config import LlamaConfig
from tests.gguf_cases import one_thread, TEXTS, EN, ZH, rounded as rounded_copy  # noqa: F401 (one_thread: a fixture)
from tests.shared_data import need_llamacpp

gguf = pytest.importorskip("gguf")



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_positions=128)
    model = lmzoo.build(cfg).eval()
    tok = lmzoo.train_tokenizer("bpe", texts=TEXTS, vocab_size=300)
    d = tmp_path_factory.mktemp("gguf")
    files = {t: d / f"{t}.gguf" for t in ("f32", "q8_0", "q4_0")}
    for t, f in files.items():
        export_gguf(model, tok, f, type=t)
    ids = tok.encode(EN + ZH)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0]
    return dict(model=model, tok=tok, dir=d, files=files, ids=ids, ref=ref)


def rounded(model, type):
    """``model`` as the file rounds it (tests/gguf_cases.py)."""
    return rounded_copy(model, type)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def hf_logits(setup, type):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(setup["dir"], gguf_file=setup["files"][type].name, dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor([setup["ids"]])).logits[0]


def test_metadata_and_names(setup):
    r = gguf.GGUFReader(str(setup["files"]["q8_0"]))
    f = lambda k: r.get_field(k).contents()  # noqa: E731
    assert f("general.architecture") == "llama" and f("llama.block_count") == 2 and f("llama.embedding_length") == 64
    assert f("llama.attention.head_count") == 4 and f("llama.attention.head_count_kv") == 2
    assert f("llama.feed_forward_length") == 96 and f("llama.rope.dimension_count") == 16
    assert f("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f("tokenizer.ggml.model") == "gpt2" and f("tokenizer.ggml.pre") == "gpt-2"
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.1.ffn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert "output.weight" in types  # untied here; test_tied_head_has_no_output covers the tied case


def test_f32_equals_transformers(setup):
    """(a) transformers' GGUF loader reverses the permutation on its own: equal logits mean it was llama.cpp's."""
    diff = (hf_logits(setup, "f32") - setup["ref"]).abs().max().item()
    print(f"f32 max|Δlogit| vs transformers: {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("type", ["q8_0", "q4_0"])
def test_quantized_equals_transformers_on_rounded_weights(setup, type):
    """(b) the same rounding: transformers' logits equal lmzoo's on the dequantized weights, far closer than
    to the float model (which Q4_0 moves by ~0.3)."""
    ref_q = logits_of(rounded(setup["model"], type), setup["ids"])
    got = hf_logits(setup, type)
    diff, moved = (got - ref_q).abs().max().item(), (ref_q - setup["ref"]).abs().max().item()
    print(f"{type} max|Δlogit| vs transformers: {diff:.2e} (rounding moved the logits by {moved:.2e})")
    assert diff <= 1e-4 and moved > 100 * diff


def test_round_trip(setup):
    """(c) lmzoo.load(x.gguf): the F32 model back exactly, Q8_0 as the rounded reference; the tokenizer too."""
    back = lmzoo.load(setup["files"]["f32"])
    assert (logits_of(back, setup["ids"]) - setup["ref"]).abs().max().item() <= 1e-6
    q8, tok = read_gguf(setup["files"]["q8_0"])
    ref_q = logits_of(rounded(setup["model"], "q8_0"), setup["ids"])
    assert (logits_of(q8, setup["ids"]) - ref_q).abs().max().item() <= 1e-6
    assert tok.encode(EN) == setup["tok"].encode(EN) and tok.encode(ZH) == setup["tok"].encode(ZH)


def test_tied_head_has_no_output_and_fallback_to_f16(tmp_path):
    """A tied head writes no output.weight; rows of 40 (not a multiple of 32) fall back to F16, as the converter does."""
    cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=40, max_positions=32, tie_embeddings=True)
    model = lmzoo.build(cfg).eval()
    written = export_gguf(model, None, tmp_path / "t.gguf", type="q4_0")
    assert "output.weight" not in written
    assert written["blk.0.ffn_down.weight"] == "F16" and written["blk.0.ffn_up.weight"] == "Q4_0"
    back = lmzoo.load(tmp_path / "t.gguf")
    assert back.config.tie_embeddings and back.lm_head.weight is back.embed.weight


# -- llama.cpp itself ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llamacpp():
    return need_llamacpp()


def test_llamacpp_logits_greedy_and_tokens(setup, llamacpp, tmp_path):
    """(d) llama.cpp on the F32 file (F32 KV cache): logits within 1e-4, the same 16 greedy ids, the same
    token ids for English and Chinese text: byte-level BPE (gpt2) and the speedrun's sp-bpe (llama)."""
    ids, tok = setup["ids"], setup["tok"]
    toks, lg, ids16 = llamacpp.run(setup["files"]["f32"], [
        {"op": "tokenize", "texts": [EN, ZH], "add_bos": False, "special": False},
        {"op": "logits", "ids": ids}, {"op": "greedy", "ids": ids[:8], "n": 16}], n_threads=1)
    diff = np.abs(llamacpp._unpack(lg) - setup["ref"].numpy()).max()
    print(f"f32 max|Δlogit| vs llama.cpp: {diff:.2e}")
    assert diff <= 1e-4
    assert ids16 == lmzoo.generate(setup["model"], torch.tensor([ids[:8]]), max_new_tokens=16)[0, 8:].tolist()
    assert toks == [tok.encode(EN), tok.encode(ZH)]
    sp = lmzoo.train_tokenizer("sp-bpe", texts=TEXTS, vocab_size=300)
    export_gguf(setup["model"], sp, tmp_path / "sp.gguf")
    assert llamacpp.tokenize(tmp_path / "sp.gguf", [EN, ZH], n_threads=1) == [sp.encode(EN), sp.encode(ZH)]


def test_llamacpp_q8_0_close_to_rounded_weights(setup, llamacpp):
    """llama.cpp also rounds the activations to 8 bits in its Q8_0 matmuls, so its Q8_0 logits sit near
    (not at) the rounded-weight reference; a wrong layout would be off by the logits' whole scale (~1)."""
    ref_q = logits_of(rounded(setup["model"], "q8_0"), setup["ids"]).numpy()
    diff = np.abs(llamacpp.logits(setup["files"]["q8_0"], setup["ids"], n_threads=1) - ref_q).max()
    print(f"q8_0 max|Δlogit| vs llama.cpp: {diff:.2e}")
    assert diff <= 0.05


def test_quantized_model_keeps_its_codes_where_blocks_allow(setup, tmp_path):
    """RTN symmetric 8-bit / 4-bit in groups of 32 map onto Q8_0 / Q4_0 blocks as they are: the file holds
    exactly the weights the quantized model computes with. Asymmetric 8-bit cannot (q - z leaves int8):
    re-quantized, so within one step of its values, not equal."""
    from lmzoo.quant.linear import QuantLinear

    for bits, sym, type, exact in ((8, True, "q8_0", True), (4, True, "q4_0", True), (8, False, "q8_0", False)):
        q = lmzoo.quantize(copy.deepcopy(setup["model"]), "rtn", bits=bits, group_size=32, sym=sym)
        kept = {}
        export_gguf(q, None, tmp_path / "q.gguf", type=type, kept=kept)
        sd = read_gguf(tmp_path / "q.gguf")[0].state_dict()
        diff = max((sd[n + ".weight"] - m.dequantize()).abs().max().item()
                   for n, m in q.named_modules() if isinstance(m, QuantLinear))
        print(f"RTN {bits}-bit sym={sym} -> {type}: {sum(kept.values())}/{len(kept)} kept, max|Δw| {diff:.1e}")
        assert len(kept) == 14 and all(kept.values()) == exact and not any(kept.values()) != exact
        assert (diff == 0) if exact else (0 < diff < 2e-3)


# -- bad input --------------------------------------------------------------------------------------
def test_unsupported_architecture_type_and_tokenizer_leave_no_file(setup, tmp_path):
    from lmzoo.models.chatglm.config import ChatGLMConfig  # ChatGLM-6B (v1): llama.cpp has no architecture for it

    glm = lmzoo.build(ChatGLMConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_positions=32,
                                    bos_token_id=60, eos_token_id=61, pad_token_id=3, mask_token_id=62,
                                    gmask_token_id=63))
    out = tmp_path / "x.gguf"
    with pytest.raises(ConfigError, match=r"^gguf export: the lmzoo family chatglm has no llama.cpp architecture to export to \(exportable families: bloom, chatglm2, deepseek_v2, gpt2, llama, t5\)$"):
        export_gguf(glm, None, out)
    with pytest.raises(ConfigError, match="unsupported type 'q3_k'"):
        export_gguf(setup["model"], setup["tok"], out, type="q3_k")
    wp = lmzoo.train_tokenizer("wordpiece", texts=TEXTS, vocab_size=200)
    with pytest.raises(ConfigError, match="cannot be expressed in GGUF"):
        export_gguf(setup["model"], wp, out)
    assert os.listdir(tmp_path) == []


def test_cli(setup, tmp_path, capsys):
    src = lmzoo.save(setup["model"], tmp_path / "ckpt", tokenizer=setup["tok"])
    assert main(["export", "gguf", "--model", str(src), "--out", str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    assert "with tokenizer" in capsys.readouterr().out
    model, tok = read_gguf(tmp_path / "m.gguf")
    assert tok is not None and model.config.n_layers == 2
    for argv, what in ((["--model", str(tmp_path / "nope")], "neither a directory nor a preset"),
                       (["--model", str(src), "--type", "q9"], "unsupported --type 'q9'"),
                       (["--model", "chatglm-6b"], "the lmzoo family chatglm has no llama.cpp architecture")):
        assert main(["export", "gguf", *argv, "--out", str(tmp_path / "bad.gguf")]) == 1
        err = capsys.readouterr().err
        assert what in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "bad.gguf").exists()
