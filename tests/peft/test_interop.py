"""lmzoo adapters against PEFT itself: an adapter lmzoo trained and saved runs in
``peft.PeftModel.from_pretrained(transformers_model, dir)`` with lmzoo's logits, and an adapter PEFT
wrote runs in lmzoo with PEFT's, for every decoder family (DeepSeek-V2: the attention projections;
see docs/lora.md for why its MLP projections do not travel with this PEFT)."""

import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lmzoo  # noqa: E402
import lmzoo.peft as lp  # noqa: E402
from lmzoo.nn.transformer import causal_lm_loss  # noqa: E402
from tests.parity import check_cached_decode, max_diff  # noqa: E402
from tests.peft.families import HF_TARGETS, V, tiny_hf  # noqa: E402

TOL = 1e-5
MLA_ATTN = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
# lmzoo -> PEFT: the targets given to apply_lora (None: every attention and MLP projection)
OURS_TARGETS = {"llama": None, "gpt2": None, "bloom": None, "chatglm2": None, "deepseek_v2": MLA_ATTN}
PEFT_TARGETS = {**HF_TARGETS, "deepseek_v2": MLA_ATTN}


def _ids(seed: int = 0, B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _train(model, steps: int = 5, lr: float = 2e-2) -> list[float]:
    """A few Adam steps on a fixed batch: the adapter moves away from its no-op start."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids, losses = _ids(7, 4, 16), []
    model.train()
    for _ in range(steps):
        loss = causal_lm_loss(model(ids).logits, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _peft_logits(family: str, adapter_dir) -> torch.Tensor:
    pm = peft.PeftModel.from_pretrained(tiny_hf(family), str(adapter_dir)).eval()
    with torch.no_grad():
        return pm(_ids()).logits


@pytest.mark.parametrize("family", sorted(OURS_TARGETS))
def test_lmzoo_adapter_runs_in_peft(family, tmp_path):
    tiny_hf(family).save_pretrained(tmp_path / "base")
    ours = lmzoo.load(tmp_path / "base")
    with torch.no_grad():
        before = ours(_ids()).logits
    lp.apply_lora(ours, r=4, alpha=8, dropout=0.05, targets=OURS_TARGETS[family])
    _train(ours)
    ours.eval()
    with torch.no_grad():
        after = ours(_ids()).logits
    assert max_diff(after, before) > 1e-2, "training left the adapter a no-op: the comparison would be trivial"
    lp.save_adapter(ours, tmp_path / "adapter")
    d = max_diff(after, _peft_logits(family, tmp_path / "adapter"))
    print(f"{family} lmzoo -> PEFT: max |dlogits| {d:.2e} (adapter moved logits by {max_diff(after, before):.2f})")
    assert d <= TOL


@pytest.mark.parametrize("family", sorted(PEFT_TARGETS))
def test_peft_adapter_runs_in_lmzoo(family, tmp_path):
    hf = tiny_hf(family)
    hf.save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS[family], init_lora_weights=False,
                          task_type="CAUSAL_LM")  # init_lora_weights=False: B random, not zero
    pm = peft.get_peft_model(hf, cfg).eval()
    pm.save_pretrained(tmp_path / "adapter")
    ours = lp.load_adapter(lmzoo.load(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        theirs, base = pm(_ids()).logits, tiny_hf(family)(_ids()).logits
        mine = ours(_ids()).logits
    d = max_diff(mine, theirs)
    print(f"{family} PEFT -> lmzoo: max |dlogits| {d:.2e} (adapter moved logits by {max_diff(theirs, base):.2f})")
    assert max_diff(theirs, base) > 1e-2
    assert d <= TOL
    # and written back, the file holds PEFT's tensors under PEFT's names
    lp.save_adapter(ours, tmp_path / "again")
    a, b = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_key_names_and_config_are_peft_s(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path / "base")
    ours = lp.apply_lora(lmzoo.load(tmp_path / "base"), r=4, alpha=8, targets=["q_proj", "v_proj"])
    lp.save_adapter(ours, tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (32, 4)  # GQA: 2 kv heads of 16
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["fan_in_fan_out"]) == (4, 8, ["q_proj", "v_proj"], False)
    # the same LoraConfig in PEFT names the same tensors
    pm = peft.get_peft_model(tiny_hf("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(tmp_path / "theirs")
    assert sorted(load_file(tmp_path / "theirs" / "adapter_model.safetensors")) == sorted(keys)


def test_gpt2_fused_c_attn_is_shared_A_and_row_split_B(tmp_path):
    """lmzoo names on GPT-2: q and v are rows 0:64 and 128:192 of c_attn; they share one A, and the
    saved lora_B has zero rows for k. Conv1D: fan_in_fan_out is written true."""
    tiny_hf("gpt2").save_pretrained(tmp_path / "base")
    ours = lp.apply_lora(lmzoo.load(tmp_path / "base"), r=4, alpha=8, targets=["attn.q_proj", "attn.v_proj"])
    q, v = ours.layers[0].attn.q_proj.lora, ours.layers[0].attn.v_proj.lora
    assert q.lora_A is v.lora_A and not hasattr(ours.layers[0].attn.k_proj, "lora")
    _train(ours)
    lp.save_adapter(ours, tmp_path / "adapter")
    t = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    B = t["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert B.shape == (192, 4) and torch.equal(B[:64], q.lora_B.detach()) and torch.equal(B[128:], v.lora_B.detach())
    assert not B[64:128].any()
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["target_modules"] == ["c_attn"]
    ours.eval()
    with torch.no_grad():
        mine = ours(_ids()).logits
    assert max_diff(mine, _peft_logits("gpt2", tmp_path / "adapter")) <= TOL


def test_only_some_layers_are_written_by_full_name(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path / "base")
    ours = lp.apply_lora(lmzoo.load(tmp_path / "base"), r=2, alpha=4, targets=["layers.1.attn.q_proj"])
    lp.save_adapter(ours, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("family,targets", [("llama", None), ("deepseek_v2", ["kv_b_proj", "q_proj"])])
def test_cached_decode_sees_the_adapter(family, targets, tmp_path):
    """Token-by-token decode through the KV cache (DeepSeek-V2: absorbed MLA, which reads kv_b_proj's
    weight itself) equals the full forward with an unmerged adapter."""
    tiny_hf(family).save_pretrained(tmp_path / "base")
    ours = lp.apply_lora(lmzoo.load(tmp_path / "base"), r=4, alpha=8, dropout=0.0, targets=targets)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    check_cached_decode(ours.eval(), V)
