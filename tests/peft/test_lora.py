"""LoRA on lmzoo models: a fresh adapter is a no-op, the base is frozen, merge equals the unmerged
forward, the rsLoRA scale, activation checkpointing, dtypes, and the errors at the boundary."""

import math

import pytest
import torch

import lmzoo
import lmzoo.peft as lp
from lmzoo.errors import CheckpointError, ConfigError, LmzooError
from lmzoo.models.llama.config import LlamaConfig
from lmzoo.nn.transformer import causal_lm_loss
from lmzoo.train.loop import enable_activation_checkpointing
from tests.parity import max_diff

V = 97


def _llama(**over):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_positions=64)
    return lmzoo.build(cfg, **over).eval()


def _ids(seed=0, B=2, T=12):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _randomize(model, std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_fresh_adapter_is_an_exact_no_op_and_initialised_as_peft():
    model = _llama()
    with torch.no_grad():
        before = model(_ids()).logits
    lp.apply_lora(model, r=8, alpha=16)
    with torch.no_grad():
        after = model(_ids()).logits
    assert torch.equal(before, after)  # B = 0: exactly nothing is added
    q = model.layers[0].attn.q_proj.lora
    assert not q.lora_B.any()
    # kaiming_uniform(a=√5) on (r, in): U(-1/√in, 1/√in), nn.Linear's own init
    bound = 1 / math.sqrt(64)
    assert q.lora_A.abs().max() <= bound and q.lora_A.abs().max() > 0.9 * bound
    # default targets: every attention and MLP projection, nothing else
    assert sorted(n.split(".", 2)[2] for n in lp.adapters(model) if n.startswith("layers.0.")) == \
        ["attn.k_proj", "attn.o_proj", "attn.q_proj", "attn.v_proj", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]


def test_only_adapters_train():
    model = lp.apply_lora(_llama(), r=4, alpha=8, targets=["q_proj", "v_proj"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    # q: A 4x64 + B 64x4; v: A 4x64 + B 32x4 (GQA: 2 kv heads of 16); two layers
    report = lp.trainable_parameters(model)
    assert report.trainable == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert "trainable params: 1,792" in str(report)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        loss = causal_lm_loss(model(_ids()).logits, _ids())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.layers[0].attn.q_proj.lora.lora_B.abs().sum() > 0


def test_merge_equals_unmerged_and_unmerge_restores(tmp_path):
    model = lp.apply_lora(_llama(), r=4, alpha=8, dropout=0.0)
    _randomize(model)
    w0 = model.layers[1].mlp.down_proj.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(_ids()).logits
    lp.merge_lora(model)
    ad = model.layers[1].mlp.down_proj.lora
    # W' = W + (α/r)·B·A, by hand
    want = w0 + (8 / 4) * ad.lora_B.detach() @ ad.lora_A.detach()
    assert max_diff(model.layers[1].mlp.down_proj.weight, want) <= 1e-6
    with torch.no_grad():
        merged = model(_ids()).logits
    assert max_diff(merged, unmerged) <= 1e-5
    lp.unmerge_lora(model)
    assert max_diff(model.layers[1].mlp.down_proj.weight, w0) <= 1e-6
    with torch.no_grad():
        assert max_diff(model(_ids()).logits, unmerged) <= 1e-5
    # merge and unload: a plain lmzoo model that saves and loads as any checkpoint
    lp.unload_lora(model)
    assert not lp.adapters(model) and not hasattr(model.layers[0].attn.q_proj, "lora")
    lmzoo.save(model, tmp_path / "merged", tokenizer=False)
    with torch.no_grad():
        assert max_diff(lmzoo.load(tmp_path / "merged")(_ids()).logits, unmerged) <= 1e-5


def test_rslora_scale_is_alpha_over_sqrt_r():
    x = torch.randn(3, 64)
    deltas = {}
    for rs in (False, True):
        model = lp.apply_lora(_llama(), r=16, alpha=8, dropout=0.0, rslora=rs, targets=["layers.0.attn.q_proj"])
        _randomize(model)
        q = model.layers[0].attn.q_proj
        assert q.lora.scaling == (8 / 4 if rs else 8 / 16)
        with torch.no_grad():
            deltas[rs] = q(x) - x @ q.weight.t()
            by_hand = (8 / math.sqrt(16) if rs else 8 / 16) * (x @ q.lora.lora_A.t() @ q.lora.lora_B.t())
        assert max_diff(deltas[rs], by_hand) <= 1e-5
    assert max_diff(deltas[True], deltas[False] * math.sqrt(16)) <= 1e-4  # same A, B: the ratio is √r


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointed in (False, True):
        model = lp.apply_lora(_llama(), r=4, alpha=8, dropout=0.0)
        _randomize(model)
        if checkpointed:
            assert enable_activation_checkpointing(model) == 2
        model.train()
        causal_lm_loss(model(_ids()).logits, _ids()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    assert all(max_diff(grads[0][n], grads[1][n]) <= 1e-6 for n in grads[0])


@pytest.mark.parametrize("adapter_dtype", [None, "float32"])
def test_bf16_base(adapter_dtype):
    model = lp.apply_lora(_llama(dtype="bfloat16"), r=4, alpha=8, dtype=adapter_dtype)
    want = torch.bfloat16 if adapter_dtype is None else torch.float32
    assert model.layers[0].attn.q_proj.lora.lora_A.dtype == want
    _randomize(model, std=0.05)
    model.train()
    logits = model(_ids()).logits
    assert logits.dtype == torch.bfloat16
    causal_lm_loss(logits.float(), _ids()).backward()
    assert model.layers[0].attn.q_proj.lora.lora_A.grad.dtype == want
    assert model.layers[0].attn.q_proj.lora.lora_A.grad.abs().sum() > 0


def test_targets_that_match_nothing_name_what_exists():
    with pytest.raises(LmzooError) as e:
        lp.apply_lora(_llama(), targets=["q_proj", "v_prj"])
    msg = str(e.value)
    assert "\n" not in msg and "['v_prj']" in msg and "'q_proj'" in msg and "'mlp.down_proj'" in msg
    with pytest.raises(LmzooError, match="match no linear"):
        lp.apply_lora(_llama(), targets=r"layers\.\d+\.attn\.c_attn")


def test_bad_settings_and_misuse():
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        lp.apply_lora(_llama(), r=0)
    with pytest.raises(ConfigError, match="dropout"):
        lp.apply_lora(_llama(), dropout=1.0)
    model = lp.apply_lora(_llama())
    with pytest.raises(LmzooError, match="already has LoRA adapters"):
        lp.apply_lora(model)
    with pytest.raises(LmzooError, match="no LoRA adapters"):
        lp.merge_lora(_llama())
    with pytest.raises(LmzooError, match="no LoRA adapters"):
        lp.save_adapter(_llama(), "unused")


def test_load_adapter_refuses_what_it_cannot_honour(tmp_path):
    model = lp.apply_lora(_llama(), r=4, alpha=8, targets=["q_proj"])
    lp.save_adapter(model, tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    text = cfg_path.read_text()
    cfg_path.write_text(text.replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(ConfigError, match="use_dora"):
        lp.load_adapter(_llama(), tmp_path / "a")
    cfg_path.write_text(text)
    # an adapter for a wider model: the shapes say so
    wide = LlamaConfig(vocab_size=V, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_positions=64)
    with pytest.raises(CheckpointError, match="expects"):
        lp.load_adapter(lmzoo.build(wide), tmp_path / "a")
    # round trip into a fresh model of the same shape: same tensors
    again = lp.load_adapter(_llama(), tmp_path / "a")
    assert torch.equal(again.layers[1].attn.q_proj.lora.lora_A, model.layers[1].attn.q_proj.lora.lora_A)
    with pytest.raises(CheckpointError, match="missing"):
        lp.load_adapter(_llama(), tmp_path / "nowhere")


def test_disable_adapters_gives_the_base_and_switches_back():
    base = _llama()
    with torch.no_grad():
        want = base(_ids()).logits
    model = lp.apply_lora(_llama(), r=4, alpha=8, dropout=0.0)
    _randomize(model)  # the adapters now change the output
    with torch.no_grad():
        adapted = model(_ids()).logits
        assert max_diff(adapted, want) > 1e-2
        with lp.disable_adapters(model):
            assert max_diff(model(_ids()).logits, want) <= 1e-6  # the frozen base alone
        assert max_diff(model(_ids()).logits, adapted) == 0
    lp.merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        with lp.disable_adapters(model):
            pass
