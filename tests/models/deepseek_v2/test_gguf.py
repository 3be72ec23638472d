"""GGUF export/import of tiny DeepSeek-V2s (llama.cpp's ``deepseek2``): "v2" (low-rank queries, yarn with
mscale, scaled routed gates), "lite" (one q_proj, tied head, renormalised top-k) and "dense" (no experts),
each d_model 64, 2 layers (a dense first layer, then a MoE one: 4 experts, top-2, 1 shared expert).

transformers has no GGUF loader for deepseek2, so the oracles are the round trip and llama.cpp itself
(F32 KV cache: its MLA path caches (c_KV | k_R) per token, the latent). The rounded reference for Q8_0
is built in lmzoo's layout here, with the file's one transform that changes what is rounded redone
independently: ``attn_k_b`` is W_UK transposed per head (ggml {d_h, d_c, n_head}), so its blocks of 32 run
along d_h, not along kv_b_proj's rows; the router stays F32.
"""

import copy
import os

import numpy as np
import pytest
import torch

import lmzoo
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.interop.gguf import export_gguf, gguf_tensors, read_gguf
from lmzoo.models.deepseek_v2.config import DeepseekV2Config
from lmzoo.nn.position import RopeConfig
from tests.gguf_cases import one_thread, TEXTS, EN, ZH  # noqa: F401 (one_thread: a fixture)
from tests.shared_data import need_llamacpp

gguf = pytest.importorskip("gguf")

SMALL = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, d_ff=96, max_positions=128, norm_eps=1e-6,
             kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
             n_routed_experts=4, n_shared_experts=1, top_k=2, d_expert=32, first_k_dense_replace=1)
YARN = dict(factor=4.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1, mscale=0.707,
            mscale_all_dim=0.707)  # the prompt (84 tokens) runs past the original 32: yarn's ramp and mscale matter
KINDS = {"v2": dict(q_lora_rank=32, routed_scaling_factor=2.0,
                    rope=RopeConfig(interleaved=True, scaling_type="yarn", scaling=dict(YARN))),
         "lite": dict(q_lora_rank=None, tie_embeddings=True, norm_topk_prob=True, n_group=1, topk_group=1),
         "dense": dict(q_lora_rank=None, n_routed_experts=None)}


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model, seed):
    """Norm weights near 1, matrices ~ N(0, 1/fan_in), a sharp router (3x): the default init leaves the
    router near a tie, where a 1e-7 difference could pick another expert."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            scale = 3.0 if n.endswith("router.weight") else 0.5 if n == "lm_head.weight" else 1.0
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if p.ndim == 1
                    else torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = lmzoo.train_tokenizer("bpe", texts=TEXTS, vocab_size=300)
    d = tmp_path_factory.mktemp("dsgguf")
    ids = tok.encode(EN + ZH)
    out = {"tok": tok, "dir": d, "ids": ids}
    for seed, (kind, extra) in enumerate(KINDS.items()):
        model = randomize(lmzoo.build(DeepseekV2Config(**{**SMALL, **extra})).eval(), seed)
        files = {t: d / f"{kind}-{t}.gguf" for t in ("f32", "q8_0")}
        written = {t: export_gguf(model, tok, f, type=t) for t, f in files.items()}
        out[kind] = dict(model=model, files=files, written=written, ref=logits_of(model, ids))
    return out


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def qdq(a: torch.Tensor, qtype) -> torch.Tensor:
    """Through ``qtype`` and back, blocks along the last dim."""
    back = gguf.quants.dequantize(gguf.quants.quantize(a.numpy().astype(np.float32), qtype), qtype)
    return torch.from_numpy(back.reshape(a.shape).copy())


def rounded(model, type):
    qtype, cfg, out = getattr(gguf.GGMLQuantizationType, type.upper()), model.config, copy.deepcopy(model)
    H, nope, v, c = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.ndim < 2 or name.endswith("router.weight"):
                continue
            if name.endswith("kv_b_proj.weight"):
                w = p.detach().view(H, nope + v, c)
                k = qdq(w[:, :nope].transpose(1, 2).contiguous(), qtype).transpose(1, 2)  # rounded as (H, d_c, d_h)
                p.copy_(torch.cat([k, qdq(w[:, nope:].contiguous(), qtype)], dim=1).reshape(p.shape))
            else:
                p.copy_(qdq(p.detach(), qtype))
    return out


def test_metadata_names_shapes_and_types(setup):
    r = gguf.GGUFReader(str(setup["v2"]["files"]["q8_0"]))
    f = lambda k: r.get_field(k).contents()  # noqa: E731
    a = lambda k: f(f"deepseek2.{k}")  # noqa: E731
    assert f("general.architecture") == "deepseek2" and f("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (a("block_count"), a("embedding_length"), a("feed_forward_length"), a("context_length")) == (2, 64, 96, 128)
    # MLA as llama.cpp runs it: MQA over (c_KV | k_R); the per-head widths in the _mla keys
    assert (a("attention.head_count"), a("attention.head_count_kv")) == (4, 1)
    assert (a("attention.key_length"), a("attention.value_length")) == (64 + 16, 64)
    assert (a("attention.key_length_mla"), a("attention.value_length_mla")) == (32 + 16, 32)
    assert (a("attention.q_lora_rank"), a("attention.kv_lora_rank"), a("rope.dimension_count")) == (32, 64, 16)
    assert (a("leading_dense_block_count"), a("expert_count"), a("expert_used_count")) == (1, 4, 2)
    assert (a("expert_shared_count"), a("expert_feed_forward_length"), a("expert_weights_scale")) == (1, 32, 2.0)
    assert a("expert_gating_func") == gguf.ExpertGatingFuncType.SOFTMAX
    assert r.get_field("deepseek2.expert_weights_norm") is None  # norm_topk_prob off
    assert a("rope.scaling.type") == "yarn" and a("rope.scaling.factor") == 4.0
    assert a("rope.scaling.original_context_length") == 32
    assert a("rope.scaling.yarn_log_multiplier") == pytest.approx(0.0707)  # 0.1 · mscale_all_dim, as the converter
    assert a("attention.layer_norm_rms_epsilon") == pytest.approx(1e-6) and f("tokenizer.ggml.pre") == "gpt-2"
    lite = gguf.GGUFReader(str(setup["lite"]["files"]["f32"]))
    assert lite.get_field("deepseek2.attention.q_lora_rank").contents() == 0  # required off the Lite layer counts
    assert lite.get_field("deepseek2.expert_weights_norm").contents() is True
    assert "output.weight" not in {t.name for t in lite.tensors}  # tied: llama.cpp reuses token_embd

    types = {t.name: t.tensor_type.name for t in r.tensors}
    attn = {"attn_norm", "attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv_a_mqa", "attn_kv_a_norm", "attn_k_b",
            "attn_v_b", "attn_output", "ffn_norm"}
    moe = {"ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp",
           "ffn_down_shexp"}
    want = ({f"blk.{i}.{n}.weight" for i in range(2) for n in attn}
            | {f"blk.0.{n}.weight" for n in ("ffn_gate", "ffn_up", "ffn_down")}
            | {f"blk.1.{n}.weight" for n in moe} | {"token_embd.weight", "output_norm.weight", "output.weight"})
    assert set(types) == want  # no attn_kv_b: llama.cpp's MLA path loads only the split pair
    assert types["blk.1.ffn_gate_inp.weight"] == "F32" and types["blk.0.attn_kv_a_norm.weight"] == "F32"
    assert {types[f"blk.1.{n}.weight"] for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "attn_k_b")} == {
        "Q8_0"}
    # ggml's order (what llama.cpp's create_tensor expects): {d_h, d_c, n_head}, {d_c, d_v, n_head}, {cols, rows, E}
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert shapes["blk.0.attn_k_b.weight"] == (32, 64, 4) and shapes["blk.0.attn_v_b.weight"] == (64, 32, 4)
    assert shapes["blk.1.ffn_gate_exps.weight"] == (64, 32, 4) and shapes["blk.1.ffn_down_exps.weight"] == (32, 64, 4)
    assert shapes["blk.1.ffn_gate_inp.weight"] == (64, 4) and shapes["blk.0.attn_kv_a_mqa.weight"] == (64, 64 + 16)

    # values in the F32 file, against the layout spelled out here (kv_b rows per head [k | v], gate_up [gate | up])
    m = setup["v2"]["model"]
    t = {x.name: np.array(x.data) for x in gguf.GGUFReader(str(setup["v2"]["files"]["f32"])).tensors}
    kv_b = m.layers[1].attn.kv_b_proj.weight.detach().view(4, 32 + 32, 64).numpy()
    np.testing.assert_array_equal(t["blk.1.attn_k_b.weight"], kv_b[:, :32].transpose(0, 2, 1))
    np.testing.assert_array_equal(t["blk.1.attn_v_b.weight"], kv_b[:, 32:])
    gate_up = m.layers[1].mlp.experts.gate_up_proj.detach().numpy()
    np.testing.assert_array_equal(t["blk.1.ffn_gate_exps.weight"], gate_up[:, :32])
    np.testing.assert_array_equal(t["blk.1.ffn_up_exps.weight"], gate_up[:, 32:])
    q_b = m.layers[1].attn.q_b_proj.weight.detach().numpy()
    np.testing.assert_array_equal(t["blk.1.attn_q_b.weight"], q_b)  # no permutation: both pair adjacent channels


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip(setup, kind):
    """F32 back exactly, with the same config; Q8_0 as the rounded reference; the model read back exports
    the same tensors again."""
    s = setup[kind]
    back, tok = read_gguf(s["files"]["f32"])
    diff = (logits_of(back, setup["ids"]) - s["ref"]).abs().max().item()
    fields = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
              "n_shared_experts", "top_k", "d_expert", "first_k_dense_replace", "routed_scaling_factor",
              "norm_topk_prob", "tie_embeddings", "norm_eps", "d_ff")
    if kind == "dense":  # no experts: top_k and first_k_dense_replace mean nothing (the file has every layer dense)
        fields = tuple(k for k in fields if k not in ("top_k", "first_k_dense_replace"))
    want, got = s["model"].config, back.config
    assert {k: getattr(got, k) for k in fields} == {k: getattr(want, k) for k in fields}
    assert (got.rope.scaling_type, got.rope.scaling) == (want.rope.scaling_type, want.rope.scaling)
    assert tok.encode(EN + ZH) == setup["ids"]
    again, orig = gguf_tensors(back), gguf_tensors(s["model"])
    assert again.keys() == orig.keys() and all(torch.equal(again[k], orig[k]) for k in orig)
    q8 = lmzoo.load(s["files"]["q8_0"])
    ref_q = logits_of(rounded(s["model"], "q8_0"), setup["ids"])
    diff_q = (logits_of(q8, setup["ids"]) - ref_q).abs().max().item()
    moved = (ref_q - s["ref"]).abs().max().item()
    print(f"{kind} round trip max|Δlogit|: f32 {diff:.2e}, q8_0 vs rounded {diff_q:.2e} (rounding moved {moved:.2e})")
    assert diff <= 1e-6 and diff_q <= 1e-6 and moved > 100 * max(diff_q, 1e-7)


# -- llama.cpp itself ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llamacpp():
    return need_llamacpp()


@pytest.mark.parametrize("kind", list(KINDS))
def test_llamacpp_logits_greedy_and_tokens(setup, llamacpp, kind):
    """llama.cpp on the F32 file (F32 KV cache): logits within 1e-4 of lmzoo over the 84-token prompt,
    the same 16 greedy ids as lmzoo.generate (its cached decode runs the absorbed MLA, as llama.cpp does),
    the same token ids for an English and a Chinese sentence."""
    s, ids, tok = setup[kind], setup["ids"], setup["tok"]
    lg, ids16, toks = llamacpp.run(s["files"]["f32"], [
        {"op": "logits", "ids": ids}, {"op": "greedy", "ids": ids[:12], "n": 16},
        {"op": "tokenize", "texts": [EN, ZH], "add_bos": False, "special": False}], n_threads=1)
    diff = np.abs(llamacpp._unpack(lg) - s["ref"].numpy()).max()
    print(f"{kind} f32 max|Δlogit| vs llama.cpp: {diff:.2e} (logits up to {s['ref'].abs().max().item():.2f})")
    assert diff <= 1e-4
    want = lmzoo.generate(s["model"], torch.tensor([ids[:12]]), max_new_tokens=16)[0, 12:].tolist()
    assert ids16 == want and len(set(want)) > 3
    assert toks == [tok.encode(EN), tok.encode(ZH)]


@pytest.mark.parametrize("kind", ["v2", "lite"])
def test_llamacpp_q8_0_close_to_rounded_weights(setup, llamacpp, kind):
    """llama.cpp rounds the activations to 8 bits in its Q8_0 matmuls too: near, not at, the rounded reference.
    That noise can flip a near-tied expert choice at a token, so the bound is on the typical token (median,
    95th percentile of the per-token max|Δlogit|); a mislaid tensor moves every token by O(1)."""
    ref_q = logits_of(rounded(setup[kind]["model"], "q8_0"), setup["ids"]).numpy()
    got = llamacpp.logits(setup[kind]["files"]["q8_0"], setup["ids"], n_threads=1)
    d = np.abs(got - ref_q).max(axis=1)  # per token
    print(f"{kind} q8_0 |Δlogit| vs llama.cpp per token: median {np.median(d):.2e}, "
          f"p95 {np.quantile(d, 0.95):.2e}, max {d.max():.2e}")
    assert np.median(d) <= 0.1 and np.quantile(d, 0.95) <= 0.2


# -- bad input --------------------------------------------------------------------------------------
REFUSED = {
    "attention_bias": (dict(attention_bias=True), "no bias tensors"),
    "act": (dict(act="gelu"), "act 'gelu': llama.cpp runs SiLU"),
    "norm_eps": (dict(norm_eps=1e-5), "norm_eps 1e-05: llama.cpp applies rms_norm_eps to the latent norms"),
    "no_shared": (dict(n_shared_experts=0), "n_shared_experts 0"),
    "lite_layers": (dict(n_layers=27, q_lora_rank=16), "q_lora_rank with 27 layers: llama.cpp takes it for a Lite"),
    "linear": (dict(rope=RopeConfig(interleaved=True, scaling_type="linear", scaling={"factor": 2.0})),
               "rope scaling 'linear'"),
    "mscale": (dict(rope=RopeConfig(interleaved=True, scaling_type="yarn", scaling={**YARN, "mscale": 1.0})),
               "yarn needs mscale = mscale_all_dim"),
    "groups": (dict(topk_method="group_limited_greedy", n_group=2, topk_group=1), "group_limited_greedy over 2 groups"),
}


def test_configs_llamacpp_cannot_run_are_refused_before_writing(setup, tmp_path):
    """Each refused field measured against llama.cpp with the check bypassed (see docs): norm_eps 1e-5 moved
    the logits 5e-5, mscale 1.0 vs mscale_all_dim 0.707 0.68, group-limited routing 0.31."""
    for name, (extra, msg) in REFUSED.items():
        model = lmzoo.build(DeepseekV2Config(**{**SMALL, "q_lora_rank": None, **extra}))
        with pytest.raises(ConfigError, match=msg):
            export_gguf(model, setup["tok"], tmp_path / f"{name}.gguf")
    assert os.listdir(tmp_path) == []


def test_presets():
    """DeepSeek-V2-Lite passes (27 layers, no q_lora_rank, yarn mscale = mscale_all_dim = 0.707); DeepSeek-V2's
    group-limited routing (top-3 of 8 groups) is refused."""
    from lmzoo.models.deepseek_v2.gguf import check

    check(lmzoo.build("deepseek-v2-lite", device="meta"))
    with pytest.raises(ConfigError, match="group_limited_greedy over 8 groups"):
        check(lmzoo.build("deepseek-v2", device="meta"))


def _rewrite(src, dst, drop=(), add=()):
    """A copy of the GGUF file ``src`` without the keys ``drop`` and with the (key, value, type) ``add``."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "deepseek2")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in drop or key == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for key, value, vtype in add:
        w.add_key_value(key, value, vtype)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_files_lmzoo_cannot_read_are_refused(setup, tmp_path):
    src, U32 = setup["v2"]["files"]["f32"], gguf.GGUFValueType.UINT32
    cases = [(dict(add=[("deepseek2.expert_group_count", 2, U32), ("deepseek2.expert_group_used_count", 1, U32)]),
              "expert_group_count 2: llama.cpp's group routing"),
             (dict(drop=["deepseek2.rope.scaling.yarn_log_multiplier"]),
              "yarn without rope.scaling.yarn_log_multiplier"),
             (dict(drop=["deepseek2.attention.key_length_mla"]), "legacy unsplit attn_kv_b"),
             (dict(add=[("deepseek2.expert_gating_func", 2, U32)], drop=["deepseek2.expert_gating_func"]), "sigmoid")]
    for i, (kw, msg) in enumerate(cases):
        with pytest.raises(ConfigError, match=msg):
            read_gguf(_rewrite(src, tmp_path / f"{i}.gguf", **kw))
    assert read_gguf(_rewrite(src, tmp_path / "same.gguf"))[0].config.rope.scaling == YARN  # the copy itself reads
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")
