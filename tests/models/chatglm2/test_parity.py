"""ChatGLM2/3 and GLM-4 against transformers' GlmForCausalLM: logits, padding, cache, generate, round
trip; THUDM's original checkpoint layout (written here from a GlmForCausalLM by an independent key
map); RoPE against a transcription of the original apply_rotary_pos_emb; refused variants; sizes."""

import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

import lmzoo  # noqa: E402
from lmzoo.errors import CheckpointError, ConfigError  # noqa: E402
from lmzoo.models.chatglm2.config import ChatGLM2Config, claims  # noqa: E402
from lmzoo.nn.position import RopeConfig, RotaryEmbedding  # noqa: E402
from tests.parity import ATOL, check_cached_decode, check_logits, max_diff, run_all  # noqa: E402

V = 97
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=None,
            initializer_range=0.1)  # larger than the default 0.02, so attention is far from uniform

CONFIGS = {
    "gqa2-bias": dict(num_key_value_heads=2, attention_bias=True),
    "mqa-nobias": dict(num_key_value_heads=1, attention_bias=False),
    "mha-bias": dict(num_key_value_heads=4, attention_bias=True),
    "theta-tied": dict(num_key_value_heads=2, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}),
    "headdim24": dict(num_key_value_heads=2, head_dim=24),  # head_dim != hidden/heads; rotary_dim 12
}


def _glm(**over):
    torch.manual_seed(0)
    return transformers.GlmForCausalLM(transformers.GlmConfig(**{**BASE, **over})).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_glm_parity(name, tmp_path):
    ours = run_all(_glm(**CONFIGS[name]), tmp_path, transformers.AutoModelForCausalLM, V)
    head_dim = CONFIGS[name].get("head_dim", BASE["head_dim"])
    assert ours.positions.rotary_dim == head_dim // 2 and ours.positions.cfg.interleaved
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "glm" and saved["architectures"] == ["GlmForCausalLM"]


# -- THUDM's original layout ------------------------------------------------------------------------


def _write_original(hf_model, path, *, multi_query: bool, rope_ratio: float, drop: str | None = None):
    """THUDM's ChatGLM2/3 layout, from a GlmForCausalLM, mapped here independently of lmzoo's converter."""
    c, sd = hf_model.config, hf_model.state_dict()
    H, G, hd, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
           "transformer.output_layer.weight": sd["lm_head.weight"],
           "transformer.rotary_pos_emb.inv_freq": torch.rand(hd // 4)}  # a stale buffer the loader must skip
    for i in range(c.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias") if c.attention_bias else ("weight",):
            q, k, v = (sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv")
            if multi_query:  # all query heads, then the groups' keys, then the groups' values
                fused = torch.cat([q, k, v], 0)
            else:  # one (q, k, v) block of rows per head
                fused = torch.stack([t.reshape(H, hd, -1) for t in (q, k, v)], 1).reshape(3 * H * hd, -1)
                fused = fused.squeeze(-1) if kind == "bias" else fused
            out[dst + f"self_attention.query_key_value.{kind}"] = fused
        out[dst + "self_attention.dense.weight"] = sd[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.dense_h_to_4h.weight"] = sd[src + "mlp.gate_up_proj.weight"]  # gate rows, then up rows
        out[dst + "mlp.dense_4h_to_h.weight"] = sd[src + "mlp.down_proj.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"]
    if drop:
        del out[drop]
    cfg = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "_name_or_path": "THUDM/chatglm3-6b",
           "hidden_size": D, "num_layers": c.num_hidden_layers, "num_attention_heads": H, "kv_channels": hd,
           "ffn_hidden_size": c.intermediate_size, "multi_query_attention": multi_query,
           "multi_query_group_num": G if multi_query else 1, "padded_vocab_size": c.vocab_size,
           "seq_length": 64, "layernorm_epsilon": c.rms_norm_eps, "add_qkv_bias": c.attention_bias,
           "add_bias_linear": False, "rmsnorm": True, "post_layer_norm": True,
           "apply_residual_connection_post_layernorm": False, "apply_query_key_layer_scaling": True,
           "attention_softmax_in_fp32": True, "original_rope": True, "rope_ratio": rope_ratio,
           "fp32_residual_connection": False, "hidden_dropout": 0.0, "attention_dropout": 0.0, "pre_seq_len": None,
           "quantization_bit": 0, "tie_word_embeddings": False, "torch_dtype": "float32", "eos_token_id": 2,
           "pad_token_id": 0}
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))


ORIGINAL = {  # name: (GlmConfig overrides, multi_query_attention)
    "mq-groups2-bias": (dict(num_key_value_heads=2, attention_bias=True), True),
    "per-head-nobias": (dict(num_key_value_heads=4, attention_bias=False), False),
}


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_original_layout(name, tmp_path):
    over, multi_query = ORIGINAL[name]
    ratio = 3.0  # theta = 10000 · rope_ratio
    hf = _glm(**over, rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * ratio,
                                       "partial_rotary_factor": 0.5})
    _write_original(hf, tmp_path / "orig", multi_query=multi_query, rope_ratio=ratio)
    ours = lmzoo.load(tmp_path / "orig")
    assert ours.config.rope.theta == 30000.0 and ours.layers[0].attn.n_kv_heads == hf.config.num_key_value_heads
    assert check_logits(ours, hf, V) <= ATOL
    check_cached_decode(ours, V)
    # saved in GlmForCausalLM's layout, which transformers loads with the same logits
    lmzoo.save(ours, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "glm"
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert max_diff(again(ids).logits, hf(ids).logits) <= ATOL


def test_original_layout_missing_tensor_is_named(tmp_path):
    key = "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"
    _write_original(_glm(num_key_value_heads=2), tmp_path / "orig", multi_query=True, rope_ratio=1.0, drop=key)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        lmzoo.load(tmp_path / "orig")


def test_rope_matches_original_chatglm_formula():
    """Our RotaryEmbedding (partial 0.5, interleaved) vs ChatGLM's rope cache + apply_rotary_pos_emb, transcribed:
    n_elem = kv_channels // 2, theta_i = 1 / (10000·rope_ratio)^(2i/n_elem), adjacent channel pairs rotate."""
    hd, ratio, T = 32, 50.0, 11
    x = torch.randn(2, 3, T, hd)  # (B, H, T, hd)
    n_elem = hd // 2
    theta = 1.0 / ((10000 * ratio) ** (torch.arange(0, n_elem, 2, dtype=torch.float32) / n_elem))
    angles = torch.outer(torch.arange(T, dtype=torch.float32), theta)  # (T, n_elem/2)
    cos, sin = angles.cos(), angles.sin()
    pairs = x[..., :n_elem].reshape(2, 3, T, n_elem // 2, 2)
    rotated = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                           pairs[..., 1] * cos + pairs[..., 0] * sin], -1).flatten(-2)
    expected = torch.cat([rotated, x[..., n_elem:]], -1)

    cfg = ChatGLM2Config.from_hf({"model_type": "chatglm", "hidden_size": 3 * hd, "num_layers": 1,
                                  "num_attention_heads": 3, "kv_channels": hd, "ffn_hidden_size": 8,
                                  "padded_vocab_size": 8, "multi_query_attention": True, "multi_query_group_num": 1,
                                  "rope_ratio": ratio, "seq_length": 16})
    rope = RotaryEmbedding(cfg.head_dim, cfg.rope)
    c, s = rope(torch.arange(T)[None], torch.float32)
    torch.testing.assert_close(rope.rotate(x, c, s), expected, atol=1e-5, rtol=0)


def test_chatglm2_32k_rope_ratio_interpolates_positions():
    """ChatGLM2-6B-32K's code divides positions by rope_ratio; ChatGLM3/GLM-4 multiply the base by it."""
    base = {"model_type": "chatglm", "hidden_size": 64, "num_layers": 1, "num_attention_heads": 4,
            "kv_channels": 16, "ffn_hidden_size": 8, "padded_vocab_size": 8, "rope_ratio": 16}
    v2 = ChatGLM2Config.from_hf({**base, "_name_or_path": "THUDM/chatglm2-6b-32k"})
    v3 = ChatGLM2Config.from_hf({**base, "_name_or_path": "THUDM/chatglm3-6b-32k"})
    assert (v2.rope.theta, v2.rope.scaling_type, v2.rope.scaling) == (10000.0, "linear", {"factor": 16.0})
    assert (v3.rope.theta, v3.rope.scaling_type) == (160000.0, "default")
    r = RotaryEmbedding(16, v2.rope)
    cos, _ = r(torch.tensor([[32]]), torch.float32)
    plain = RotaryEmbedding(16, RopeConfig(rotary_fraction=0.5, interleaved=True))
    cos_at_2, _ = plain(torch.tensor([[2]]), torch.float32)  # position 32 / 16
    torch.testing.assert_close(cos, cos_at_2)


# -- refusals ---------------------------------------------------------------------------------------

CHATGLM_MIN = {"model_type": "chatglm", "hidden_size": 64, "num_layers": 1, "num_attention_heads": 4,
               "kv_channels": 16, "ffn_hidden_size": 8, "padded_vocab_size": 8}


def test_chatglm_v1_is_not_claimed(tmp_path):
    v1 = {"model_type": "chatglm", "position_encoding_2d": True, "hidden_size": 64, "num_layers": 1,
          "num_attention_heads": 4, "inner_hidden_size": 256, "vocab_size": 8}
    assert not claims(v1) and claims(CHATGLM_MIN) and claims({"model_type": "glm"})
    with pytest.raises(ConfigError, match="position_encoding_2d"):
        ChatGLM2Config.from_hf(v1)
    (tmp_path / "config.json").write_text(json.dumps(v1))
    with pytest.raises(ConfigError, match="chatglm"):  # no family claims ChatGLM-6B v1 yet
        lmzoo.load(tmp_path)


@pytest.mark.parametrize("field,value", [("rmsnorm", False), ("apply_residual_connection_post_layernorm", True),
                                         ("add_bias_linear", True), ("post_layer_norm", False),
                                         ("pre_seq_len", 128), ("quantization_bit", 4)])
def test_unsupported_chatglm_variants_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ChatGLM2Config.from_hf({**CHATGLM_MIN, field: value}, source="x/config.json")


# -- presets ----------------------------------------------------------------------------------------


def _count(V, d, L, H, G, hd, ff):
    """Parameters of a ChatGLM2 by hand: embedding + untied head, per layer fused qkv (+bias), dense,
    dense_h_to_4h (2·ff rows), dense_4h_to_h, two norms; one final norm."""
    qkv = (H + 2 * G) * hd
    return 2 * V * d + L * (d * qkv + qkv + H * hd * d + 3 * d * ff + 2 * d) + d


@pytest.mark.parametrize("preset,expected", [
    ("chatglm2-6b", 6_243_584_000),  # THUDM calls it 6B; 6.24B with the 65024-row embedding and head
    ("chatglm3-6b", 6_243_584_000),  # same architecture as ChatGLM2-6B
    ("glm-4-9b", 9_399_951_360),  # the model card's "9.4B"
])
def test_preset_sizes(preset, expected):
    model = lmzoo.build(preset, device="meta")
    c = model.config
    assert model.num_parameters() == expected
    assert expected == _count(c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff)
    assert model.positions.rotary_dim == 64 and model.layers[0].attn.kind == "GQA-2"
