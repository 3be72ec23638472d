"""DeepSeek-V2 against transformers' DeepseekV2ForCausalLM: logits, padding, cached decode (absorbed MLA),
greedy generation and the save round trip, with and without the low-rank query path, with group-limited
routing and a dense first layer; both expert layouts; the training loss; the presets' sizes."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

import lmzoo  # noqa: E402
from lmzoo.errors import CheckpointError, ConfigError  # noqa: E402
from lmzoo.models.deepseek_v2.config import PRESETS, DeepseekV2Config  # noqa: E402
from lmzoo.nn.mla import MLA  # noqa: E402
from lmzoo.nn.moe import MoE  # noqa: E402
from lmzoo.nn.transformer import causal_lm_loss  # noqa: E402
from tests.parity import check_cached_decode, check_logits, max_diff, run_all  # noqa: E402

V = 97
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
            n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
            max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=None)

CONFIGS = {
    # DeepSeek-V2-Lite's shape: one full-rank q_proj, plain top-k
    "lite": dict(q_lora_rank=None, topk_method="greedy"),
    # DeepSeek-V2's shape: low-rank queries, group-limited routing, scaled gates, yarn with mscale
    "v2": dict(q_lora_rank=12, topk_method="group_limited_greedy", n_group=4, topk_group=2,
               routed_scaling_factor=2.5, attention_bias=True, mlp_bias=True,
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
                                "rope_theta": 10000.0}),
}


def _hf(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**{**BASE, **CONFIGS[name]})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the default init (std 0.02) leaves the router near a tie and the experts near zero
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                # a sharp router; a mild head keeps the logits O(1), so the round trip's 1e-6 bound is ulps
                scale = 3.0 if n.endswith("mlp.gate.weight") else 0.2 if n == "lm_head.weight" else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_deepseek_v2_parity(name, tmp_path):
    ours = run_all(_hf(name), tmp_path, transformers.AutoModelForCausalLM, V)
    assert isinstance(ours.layers[0].attn, MLA)
    assert not isinstance(ours.layers[0].mlp, MoE) and all(isinstance(layer.mlp, MoE) for layer in ours.layers[1:])
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:  # run_all's lmzoo.save output
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys  # lmzoo.save writes the per-expert layout
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)


def test_fused_expert_layout_loads(tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj (E, 2I, d), experts.down_proj (E, d, I))."""
    hf = _hf("v2", seed=1)
    hf.save_pretrained(tmp_path / "per_expert")
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert state["model.layers.2.mlp.experts.gate_up_proj"].shape == (8, 32, 32)
    save_file(state, tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
    a, b = lmzoo.load(tmp_path / "per_expert"), lmzoo.load(tmp_path / "fused")
    for (k, x), (_, y) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert torch.equal(x, y), k
    check_logits(b, hf, V)
    # a checkpoint with neither layout names both
    del state["model.layers.2.mlp.experts.gate_up_proj"]
    save_file(state, tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="experts.0.gate_proj.weight.*other layout.*experts.gate_up_proj"):
        lmzoo.load(tmp_path / "fused")


def test_absorbed_equals_naive_in_the_whole_model(tmp_path):
    hf = _hf("v2", seed=2)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, V, (2, 10))
    logits = {}
    for mode in ("naive", "absorbed"):
        ours = lmzoo.load(tmp_path)
        for layer in ours.layers:
            layer.attn.mode = mode
        check_cached_decode(ours, V)  # token by token through the latent cache == one full forward
        with torch.no_grad():
            cache = ours.new_cache(2, 10)
            logits[mode] = torch.cat([ours(ids[:, :4], cache=cache).logits] +
                                     [ours(ids[:, t:t + 1], cache=cache).logits for t in range(4, 10)], 1)
    assert max_diff(logits["naive"], logits["absorbed"]) <= 1e-5


def test_training_adds_the_balance_loss(tmp_path):
    hf = _hf("lite", seed=3)
    hf.save_pretrained(tmp_path)
    ours = lmzoo.load(tmp_path)
    ids = torch.randint(0, V, (2, 9))
    assert ours(ids, labels=ids).aux_loss is None  # eval: no balance loss
    ours.train()
    out = ours(ids, labels=ids)
    assert out.aux_loss is not None and 0.5 < out.aux_loss.item() < 2 * 8 / 3  # 2 MoE layers, each >= ~1 when mixed
    expected = causal_lm_loss(out.logits, ids) + ours.config.aux_loss_alpha * out.aux_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert ours.layers[1].mlp.router.weight.grad.abs().sum() > 0


def _params(model, cfg: DeepseekV2Config) -> tuple[int, int]:
    total = model.num_parameters()
    idle = (cfg.n_routed_experts - cfg.top_k) * 3 * cfg.d_model * cfg.d_expert  # routed experts a token skips
    return total, total - idle * sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))


def test_presets_match_the_published_sizes():
    big = lmzoo.build("deepseek-v2", device="meta")
    total, active = _params(big, PRESETS["deepseek-v2"])
    assert abs(total - 236e9) / 236e9 < 0.005, total  # "236B total parameters"
    assert abs(active - 21e9) / 21e9 < 0.03, active  # "21B activated for each token"
    lite = lmzoo.build("deepseek-v2-lite", device="meta")
    assert abs(lite.num_parameters() - 15.7e9) < 0.05e9, lite.num_parameters()  # "15.7B"
    # the latent cache per token: (512 + 64) · 60 layers · 2 bytes
    assert big.kv_bytes_per_token(2) == (512 + 64) * 60 * 2 and lite.kv_bytes_per_token(2) == (512 + 64) * 27 * 2


# deepseek-ai/DeepSeek-V2's config.json as released (remote-code fields included)
ORIGINAL_V2 = {
    "architectures": ["DeepseekV2ForCausalLM"], "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"},
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "ep_size": 1,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 5120, "intermediate_size": 12288,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1536,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 160, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 128, "num_experts_per_tok": 6, "num_hidden_layers": 60, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "routed_scaling_factor": 16.0, "scoring_func": "softmax", "seq_aux": True, "tie_word_embeddings": False,
    "topk_group": 3, "topk_method": "group_limited_greedy", "torch_dtype": "bfloat16", "v_head_dim": 128,
    "vocab_size": 102400,
}


def test_original_release_config_reads_as_the_preset():
    cfg = DeepseekV2Config.from_hf(ORIGINAL_V2)
    preset = PRESETS["deepseek-v2"]
    for f in ("d_model", "n_layers", "n_heads", "d_ff", "d_expert", "q_lora_rank", "kv_lora_rank", "n_routed_experts",
              "top_k", "topk_method", "n_group", "topk_group", "routed_scaling_factor", "max_positions"):
        assert getattr(cfg, f) == getattr(preset, f), f
    assert cfg.rope.scaling_type == "yarn" and cfg.rope.scaling["factor"] == 40 and cfg.rope.interleaved
    assert cfg.hf_extra == {"ep_size": 1}  # auto_map is dropped: lmzoo.save writes transformers' layout
    hf = cfg.to_hf()
    assert hf["rope_parameters"]["rope_type"] == "yarn" and "auto_map" not in hf
    transformers.DeepseekV2Config(**{k: v for k, v in hf.items() if k != "architectures"})  # accepted as is


def test_unsupported_configs_are_refused():
    with pytest.raises(ConfigError, match="moe_layer_freq"):
        DeepseekV2Config.from_hf({**ORIGINAL_V2, "moe_layer_freq": 2})
    with pytest.raises(ConfigError, match="scoring_func"):
        DeepseekV2Config.from_hf({**ORIGINAL_V2, "scoring_func": "sigmoid"})
    with pytest.raises(ConfigError, match="group_limited_greedy"):
        DeepseekV2Config.from_hf({**ORIGINAL_V2, "n_group": 7})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        DeepseekV2Config.from_hf({**ORIGINAL_V2, "num_key_value_heads": 16})


def test_beam_search_equals_transformers(tmp_path):
    """Beam search reorders the latent cache's rows (LatentCache.reorder) every step."""
    hf = _hf("v2", seed=4)
    hf.save_pretrained(tmp_path)
    ours = lmzoo.load(tmp_path)
    ids = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(4))
    a = lmzoo.generate(ours, ids, max_new_tokens=8, num_beams=3)
    b = hf.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b), f"\nlmzoo {a.tolist()}\nhf    {b.tolist()}"
