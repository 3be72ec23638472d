"""GPT-2 against transformers' GPT2LMHeadModel: logits, padding, cache, generate, round trip; the
prefix-less OpenAI layout; the hard context limit; the published sizes."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmzoo  # noqa: E402
from lmzoo.errors import CheckpointError  # noqa: E402
from lmzoo.interop.safetensors_io import write_directory  # noqa: E402
from lmzoo.models.gpt2.config import PRESETS, GPT2Config  # noqa: E402
from tests.parity import ATOL, max_diff, run_all, save_hf  # noqa: E402

EOS = 96  # in the tiny vocabulary, so generate may stop on it
# initializer_range 0.1 instead of transformers' 0.02, so attention is not nearly flat: shuffling the
# positions moves the logits by ~3.5 here (~0.65 at 0.02).
BASE = dict(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=32, layer_norm_epsilon=1e-5,
            bos_token_id=EOS, eos_token_id=EOS, initializer_range=0.1)

CONFIGS = {
    "default": dict(),  # gelu_new, tied head
    "gelu-untied": dict(activation_function="gelu", tie_word_embeddings=False),
    "inverse-layer-idx": dict(n_layer=3, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    "unscaled-relu": dict(scale_attn_weights=False, activation_function="relu"),
    "n-inner-3-heads": dict(n_embd=48, n_head=3, n_inner=80),
}


def _hf(**over):
    cfg = transformers.GPT2Config(**{**BASE, **over})
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gpt2_parity(name, tmp_path):
    ours = run_all(_hf(**CONFIGS[name]), tmp_path, transformers.AutoModelForCausalLM, BASE["vocab_size"],
                   eos=EOS)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["architectures"] == ["GPT2LMHeadModel"]
    # unknown fields (dropouts, summary_*) travel through hf_extra and are written back
    assert saved["summary_type"] == "cls_index" and saved["attn_pdrop"] == 0.1
    if name == "inverse-layer-idx":
        # the per-layer scale is the point of this config: 1/sqrt(16) / (layer_idx + 1)
        assert [layer.attn.scale for layer in ours.layers] == [0.25, 0.125, 0.25 / 3]


def test_openai_layout_without_prefix_and_mask_buffers(tmp_path):
    """GPT2Model / OpenAI keys (no 'transformer.' prefix, no lm_head) with attn.bias/masked_bias buffers."""
    hf = _hf()
    n = BASE["n_positions"]
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}
    for i in range(BASE["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    config = json.dumps({**hf.config.to_dict(), "architectures": ["GPT2Model"]})
    write_directory(tmp_path / "openai", state, {"config.json": config})
    ours = lmzoo.load(tmp_path / "openai")
    ids = torch.randint(0, BASE["vocab_size"], (2, 12))
    with torch.no_grad():
        d = max_diff(ours(ids).logits, hf(ids).logits)
    assert d <= ATOL, f"prefix-less checkpoint gives logits {d} away"
    # the prefix is optional, nothing else is: a stray key and a mis-shaped tensor still fail loudly
    write_directory(tmp_path / "stray", {**state, "h.0.attn.rotary": torch.zeros(2)}, {"config.json": config})
    with pytest.raises(CheckpointError, match=r"unexpected key.*h\.0\.attn\.rotary"):
        lmzoo.load(tmp_path / "stray")
    state["h.1.attn.c_attn.weight"] = state["h.1.attn.c_attn.weight"][:, :-3]
    write_directory(tmp_path / "shape", state, {"config.json": config})
    with pytest.raises(CheckpointError, match=r"h\.1\.attn\.c_attn\.weight.*shape \(64, 189\)"):
        lmzoo.load(tmp_path / "shape")


def test_input_longer_than_n_positions_raises(tmp_path):
    save_hf(_hf(), tmp_path)
    ours = lmzoo.load(tmp_path)
    n = BASE["n_positions"]
    assert ours(torch.zeros(1, n, dtype=torch.long)).logits.shape == (1, n, BASE["vocab_size"])
    with pytest.raises(ValueError, match=f"33 tokens is longer than the model's context of {n}"):
        ours(torch.zeros(1, n + 1, dtype=torch.long))
    # the same limit holds one token at a time through the cache
    cache = ours.new_cache(1, n + 1)
    with torch.no_grad():
        ours(torch.zeros(1, n, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="longer than the model's context"):
            ours(torch.zeros(1, 1, dtype=torch.long), cache=cache)


PUBLISHED = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    ours = lmzoo.build(name, device="meta")
    assert ours.num_parameters() == PUBLISHED[name]
    hf_cfg = {k: v for k, v in PRESETS[name].to_hf().items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_cfg))
    assert ref.num_parameters() == PUBLISHED[name]


def test_openai_gpt2_config_json_is_the_preset():
    """The config.json published with openai-community/gpt2 reads as the 'gpt2' preset."""
    published = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
                 "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
                 "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
                 "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
                 "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
                 "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True,
                                                                                         "max_length": 50}},
                 "vocab_size": 50257}
    cfg = GPT2Config.from_hf(published)
    assert cfg.replace(hf_extra={}) == PRESETS["gpt2"]
    assert cfg.to_hf()["n_ctx"] == 1024 and cfg.to_hf()["task_specific_params"] == published["task_specific_params"]
    assert GPT2Config.from_hf(cfg.to_hf()) == cfg


def test_config_rejects_what_gpt2_cannot_be():
    with pytest.raises(lmzoo.ConfigError, match="activation_function 'swiglu'"):
        GPT2Config.from_hf({**BASE, "activation_function": "swiglu"})
    with pytest.raises(lmzoo.ConfigError, match="add_cross_attention"):
        GPT2Config.from_hf({**BASE, "add_cross_attention": True})
    with pytest.raises(lmzoo.ConfigError, match="n_kv_heads"):
        GPT2Config(d_model=64, n_heads=4, n_kv_heads=2)
