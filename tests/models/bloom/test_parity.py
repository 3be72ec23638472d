"""Bloom against transformers' BloomForCausalLM: logits, padding, cache, generate, round trip; the
prefix-less BigScience layout; published parameter counts; config spellings and refusals."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmzoo  # noqa: E402
from lmzoo.models.bloom.config import PRESETS, BloomConfig  # noqa: E402
from lmzoo.nn.position import ALiBi  # noqa: E402
from tests.parity import check_logits, max_diff, run_all  # noqa: E402

VOCAB = 97
# initializer_range 0.1 instead of 0.02: with tiny weights the attention scores are so flat that a
# q/k mix-up moves the logits by only ~1e-4; at 0.1 it moves them by ~0.3.
BASE = dict(vocab_size=VOCAB, n_layer=2, layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2,
            initializer_range=0.1)

CONFIGS = {
    "6-heads": dict(hidden_size=48, n_head=6),  # ALiBi slopes for a head count that is not a power of 2
    "4-heads": dict(hidden_size=64, n_head=4),
    "8-heads-untied": dict(hidden_size=64, n_head=8, tie_word_embeddings=False),
}


def _hf(name: str):
    torch.manual_seed(0)
    return transformers.BloomForCausalLM(transformers.BloomConfig(**BASE, **CONFIGS[name])).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bloom_parity(name, tmp_path):
    hf = _hf(name)
    # Random init leaves the LayerNorms at identity and biases at zero; perturb them so the key map
    # of every bias and norm is actually tested.
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "layernorm" in n or "ln_f" in n or n.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    ours = run_all(hf, tmp_path, transformers.AutoModelForCausalLM, VOCAB)
    assert isinstance(ours.positions, ALiBi) and ours.max_positions is None


def test_long_input_has_no_context_limit(tmp_path):
    """ALiBi has no position table: inputs past seq_length run, and still match transformers."""
    hf = _hf("6-heads")
    hf.save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    c["seq_length"] = 8
    (tmp_path / "config.json").write_text(json.dumps(c))
    ours = lmzoo.load(tmp_path)
    assert ours.config.max_positions == 8
    check_logits(ours, hf, VOCAB, B=1, T=24)


def test_qkv_split_is_per_head(tmp_path):
    """The fused rows are (head, q|k|v, head_dim): head h's query is rows [3h·hd, 3h·hd + hd)."""
    hf = _hf("4-heads")
    hf.save_pretrained(tmp_path)
    ours = lmzoo.load(tmp_path)
    fused = hf.transformer.h[1].self_attention.query_key_value.weight  # (3·64, 64), hd = 16
    attn = ours.layers[1].attn
    for h in range(4):
        for j, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
            rows = fused[(3 * h + j) * 16:(3 * h + j + 1) * 16]
            assert torch.equal(proj.weight[h * 16:(h + 1) * 16], rows)


def test_prefixless_bigscience_layout_loads(tmp_path):
    """The BigScience releases were saved from BloomModel: keys lack 'transformer.'."""
    from safetensors import safe_open

    hf = _hf("6-heads")
    hf.transformer.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "word_embeddings.weight" in keys and not any(k.startswith("transformer.") for k in keys)
    ours = lmzoo.load(tmp_path)
    check_logits(ours, hf, VOCAB)
    # Save writes the BloomForCausalLM layout, which transformers reads back as a causal LM.
    lmzoo.save(ours, tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert max_diff(again(ids).logits, hf(ids).logits) <= 1e-6


def test_missing_key_fails_loudly(tmp_path):
    from safetensors.torch import load_file, save_file

    _hf("4-heads").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["transformer.h.1.mlp.dense_4h_to_h.bias"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(lmzoo.CheckpointError, match=r"transformer\.h\.1\.mlp\.dense_4h_to_h\.bias"):
        lmzoo.load(tmp_path)


def test_misshaped_fused_qkv_fails_loudly(tmp_path):
    from safetensors.torch import load_file, save_file

    _hf("4-heads").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = "transformer.h.0.self_attention.query_key_value.weight"
    state[key] = state[key][:-2]  # (190, 64): not (n_head, 3, head_dim) rows
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    expected = r"model\.safetensors.*query_key_value\.weight.*\(190, 64\).*\(64, 64\)"  # file, key, shapes
    with pytest.raises(lmzoo.CheckpointError, match=expected):
        lmzoo.load(tmp_path)


# Published parameter counts (model cards of bigscience/bloom-*), tied head counted once.
PUBLISHED = {"bloom-560m": 559_214_592, "bloom-1b1": 1_065_314_304, "bloom-1b7": 1_722_408_960,
             "bloom-3b": 3_002_557_440, "bloom-7b1": 7_069_016_064, "bloom-176b": 176_247_271_424}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    model = lmzoo.build(name, device="meta")
    assert model.num_parameters() == PUBLISHED[name]


def test_config_spellings_and_round_trip():
    # The 176B release spells the width n_embed and the heads num_attention_heads.
    a = BloomConfig.from_hf({"model_type": "bloom", "vocab_size": 250880, "n_embed": 14336, "n_layer": 70,
                             "num_attention_heads": 112, "layer_norm_epsilon": 1e-5, "pretraining_tp": 4,
                             "offset_alibi": 100, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
                             "dtype": "bfloat16"})
    assert a == PRESETS["bloom-176b"].replace(hf_extra={"offset_alibi": 100})
    assert a.d_ff == 4 * 14336 and a.max_positions == 2048 and a.tie_embeddings
    b = BloomConfig.from_hf(a.to_hf())
    assert b == a and b.hf_extra == {"offset_alibi": 100}
    hf = transformers.BloomConfig(**a.to_hf())
    assert (hf.hidden_size, hf.n_layer, hf.n_head, hf.pretraining_tp) == (14336, 70, 112, 4)


def test_unsupported_config_values_are_refused():
    with pytest.raises(lmzoo.ConfigError, match="apply_residual_connection_post_layernorm"):
        BloomConfig.from_hf({"vocab_size": 10, "hidden_size": 8, "n_layer": 1, "n_head": 2,
                             "apply_residual_connection_post_layernorm": True})
    with pytest.raises(lmzoo.ConfigError, match="n_embed"):
        BloomConfig.from_hf({"vocab_size": 10, "n_layer": 1, "n_head": 2})
    with pytest.raises(lmzoo.ConfigError, match="d_ff"):
        BloomConfig(d_model=8, n_heads=2, d_ff=24)
