"""LLaMA-2/3 against transformers' LlamaForCausalLM: logits, padding, cache, generate, round trip."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.parity import run_all  # noqa: E402

# initializer_range 0.1 instead of transformers' 0.02: with σ = 0.02 the attention is nearly flat and
# removing RoPE moves the logits by only ~5e-3, so a wrong frequency band would pass; at 0.1 it moves
# them by ~1.2 (test_positions_matter_at_this_init).
BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1)

CONFIGS = {
    "mha-untied": dict(num_key_value_heads=4),
    "gqa2-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mqa": dict(num_key_value_heads=1),
    "bias-headdim": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True, head_dim=24),
    "rope-linear": dict(num_key_value_heads=2, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    "rope-dynamic": dict(num_key_value_heads=2, max_position_embeddings=8,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    "rope-llama3": dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0}),
    "rope-yarn": dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_llama_parity(name, tmp_path):
    cfg = transformers.LlamaConfig(**{**BASE, **CONFIGS[name]})
    hf = transformers.LlamaForCausalLM(cfg)
    if name == "rope-dynamic":
        # Dynamic NTK changes frequencies with length, so cached decode legitimately differs from a
        # full forward past max_position_embeddings; compare the logits on long inputs only.
        from tests.parity import check_logits, save_hf
        import lmzoo
        save_hf(hf.eval(), tmp_path / "hf")
        ours = lmzoo.load(tmp_path / "hf")
        check_logits(ours, hf, BASE["vocab_size"], T=20)
        return
    run_all(hf, tmp_path, transformers.AutoModelForCausalLM, BASE["vocab_size"])


def test_positions_matter_at_this_init(tmp_path):
    import lmzoo

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE, num_key_value_heads=2)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = lmzoo.load(tmp_path / "hf")
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = ours(ids).logits
        no_rope = ours(ids, position_ids=torch.zeros(1, 12, dtype=torch.long)).logits  # angle 0: no rotation
        ours.positions.inv_freq = ours.positions.inv_freq ** (torch.log(torch.tensor(500.0)) / torch.log(torch.tensor(1e4)))
        wrong_band = ours(ids).logits  # theta 500 instead of 10000
    assert (base - no_rope).abs().max() > 0.3 and (base - wrong_band).abs().max() > 0.3


def test_legacy_rope_fields_read_the_same(tmp_path):
    """Older checkpoints spell rope settings rope_theta + rope_scaling{type}; both generations load equal."""
    import json
    import lmzoo
    cfg = transformers.LlamaConfig(**BASE, num_key_value_heads=2,
                                   rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    new = lmzoo.load(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    c.pop("rope_parameters")
    c["rope_theta"], c["rope_scaling"] = 500.0, {"type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(c))
    old = lmzoo.load(tmp_path)
    assert old.config.rope == new.config.rope
    ids = torch.randint(0, 97, (1, 10))
    torch.testing.assert_close(old(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
