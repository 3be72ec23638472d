"""QLoRA: the frozen base in lmzoo's NF4 equals bitsandbytes' quantize_4bit code for code, gradients
reach the input through the 4-bit linears, a tiny model's loss falls on the CPU, and the peak memory
of full fine-tuning, LoRA and QLoRA on a larger model (printed, not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lmzoo
import lmzoo.peft as lp
from lmzoo.errors import ConfigError, LmzooError
from lmzoo.models.llama.config import LlamaConfig
from lmzoo.nn.transformer import causal_lm_loss
from lmzoo.quant.bnb import NF4Linear
from lmzoo.quant.linear import frozen_dequant_linear
from tests.parity import max_diff

V = 97


def _llama(d=64, layers=2, d_ff=96, seed=0):
    torch.manual_seed(seed)
    return lmzoo.build(LlamaConfig(vocab_size=V, d_model=d, n_layers=layers, n_heads=4, n_kv_heads=2, d_ff=d_ff,
                                   max_positions=64))


def _bnb_functional():
    try:
        import bitsandbytes.functional as F
    except Exception as e:  # noqa: BLE001 - any import failure (no wheel, no CPU backend) means: skip, saying why
        pytest.skip(f"bitsandbytes cannot import here ({type(e).__name__}: {e})")
    return F


def test_nf4_base_equals_bitsandbytes_code_for_code():
    F = _bnb_functional()
    model = _llama()
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n.startswith("layers.")}
    lp.prepare_qlora(model, r=4, alpha=8)
    checked = mismatched = blocks = 0
    for name, w in floats.items():
        ours = model.get_submodule(name)
        assert isinstance(ours, NF4Linear) and ours.blocksize == 64 and ours.nested
        packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(ours.weight.view(-1), packed.view(-1)), name  # the 4-bit codes, two per byte
        assert torch.equal(ours.quant_map, qs.code)  # the published NF4 table
        assert torch.equal(ours.nested_absmax, qs.state2.absmax) and torch.equal(ours.nested_quant_map, qs.state2.code)
        assert ours.nested_offset == float(qs.offset)
        # double quantization: 8-bit "dynamic" codes of (absmax - offset) / nested_absmax. bitsandbytes' CPU
        # kernel finds them with an approximate search (BinSearch's Direct2) that, within ~1e-3 of a code
        # spacing around a midpoint, returns the neighbour of the nearest code; lmzoo takes the nearest.
        # Equal everywhere else; where they differ, lmzoo's code is the nearer one, and bitsandbytes' is next to it.
        scaled = (_block_absmax(w, 64) - qs.offset) / qs.state2.absmax[
            torch.arange(qs.absmax.numel()) // 256]
        differ = (ours.absmax != qs.absmax).nonzero().view(-1)
        mismatched += len(differ)
        blocks += qs.absmax.numel()
        for i in differ.tolist():
            a, b = int(ours.absmax[i]), int(qs.absmax[i])
            assert abs(a - b) == 1, (name, i, a, b)
            assert abs(scaled[i] - qs.state2.code[a]) <= abs(scaled[i] - qs.state2.code[b]), (name, i)
        # the weights: code[nibble] · absmax[block], lmzoo's absmax codes decoded by bitsandbytes itself
        absmax = F.dequantize_blockwise(ours.absmax, qs.state2) + qs.offset
        b = packed.view(-1)
        nibbles = torch.stack([b >> 4, b & 15], 1).view(-1).long()[:w.numel()]
        assert torch.equal(ours.dequantize(), (qs.code[nibbles].view(-1, 64) * absmax[:, None]).view(w.shape))
        # (bitsandbytes' CPU dequantize_4bit misplaces blocks that straddle rows, e.g. in_features 96)
        if w.shape[1] % 64 == 0 and not len(differ):
            assert torch.equal(ours.dequantize(), F.dequantize_4bit(packed, qs))
        checked += 1
    assert checked == 2 * 7
    print(f"NF4 codes equal in all {checked} linears; double-quant codes differ in {mismatched} of {blocks} blocks")
    assert mismatched <= 0.01 * blocks


def _block_absmax(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = w.reshape(-1).float()
    return nn.functional.pad(flat, (0, (-flat.numel()) % blocksize)).view(-1, blocksize).abs().amax(1)


def test_frozen_dequant_linear_gradient_is_the_float_one():
    m = NF4Linear.from_weight(torch.randn(48, 64), torch.randn(48), 64, True)
    x = torch.randn(5, 64, requires_grad=True)
    y = frozen_dequant_linear(x, m)
    (y * torch.arange(48.0)).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = nn.functional.linear(x2, m.dequantize(), m.bias)
    (y2 * torch.arange(48.0)).sum().backward()
    assert max_diff(y, y2) <= 1e-6 and max_diff(x.grad, x2.grad) <= 1e-5
    # the module's own forward takes that path when x needs a gradient (no float W saved for backward)
    bare = NF4Linear.from_weight(torch.randn(48, 64), None, 64, True)
    assert "FrozenDequantMatmul" in bare(x).grad_fn.name()
    with torch.no_grad():
        assert bare(x).grad_fn is None


def test_qlora_loss_decreases_on_the_cpu():
    model = lp.prepare_qlora(_llama(), r=8, alpha=16, dropout=0.0)
    codes = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.uint8}
    assert codes and all(isinstance(m, NF4Linear) for m in lp.adapters(model).values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(3))
    model.train()
    losses = []
    for step in range(20):
        loss = causal_lm_loss(model(ids).logits, ids)
        opt.zero_grad()
        loss.backward()
        if step == 0:  # layer 0's adapters get a gradient through layer 1's frozen 4-bit linears (A's is 0 while B = 0)
            assert model.layers[0].attn.q_proj.lora.lora_B.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    print(f"QLoRA loss {losses[0]:.4f} -> {losses[-1]:.4f} over 20 steps")
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(b, codes[n]) for n, b in model.named_buffers() if n in codes)  # the base never moves


def test_qlora_base_and_adapter_save_and_load(tmp_path):
    """The NF4 base saves as a bitsandbytes checkpoint (lmzoo.save) and the adapter as PEFT's files; both
    load back (lmzoo.load, load_adapter onto the 4-bit model) to the same logits, bit for bit."""
    model = lp.prepare_qlora(_llama(), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    lmzoo.save(model, tmp_path / "base", tokenizer=False)
    lp.save_adapter(model, tmp_path / "adapter")
    again = lp.load_adapter(lmzoo.load(tmp_path / "base"), tmp_path / "adapter")
    assert isinstance(again.layers[0].mlp.down_proj, NF4Linear)
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, again(ids).logits)


def test_qlora_errors():
    with pytest.raises(ConfigError, match="quantize_base 'fp4' is unknown"):
        lp.apply_lora(_llama(), quantize_base="fp4")
    with pytest.raises(LmzooError, match="already quantized as IntLinear"):
        lp.prepare_qlora(lmzoo.quantize(_llama(), "rtn", bits=4, group_size=64))

    class NoLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.LayerNorm(8)])

    with pytest.raises(LmzooError, match="qlora: cannot quantize the base to nf4: .*no nn.Linear") as e:
        lp.prepare_qlora(NoLinears())
    assert "\n" not in str(e.value)
    with pytest.raises(LmzooError, match="quantized base"):
        lp.merge_lora(lp.prepare_qlora(_llama()))


# -- peak memory, one subprocess each ----------------------------------------------------------------

_MEASURE = r"""
import json, resource, sys, torch
import lmzoo, lmzoo.peft as lp
from lmzoo.models.llama.config import LlamaConfig
from lmzoo.nn.transformer import causal_lm_loss
torch.set_num_threads(1)
mode = sys.argv[1]

def vm(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024  # MiB

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=1024, d_model=1024, n_layers=6, n_heads=16, n_kv_heads=4, d_ff=2816, max_positions=128)
model = lmzoo.build(cfg)
if mode == "lora":
    lp.apply_lora(model, r=8, alpha=16)
elif mode == "qlora":
    lp.prepare_qlora(model, r=8, alpha=16)
setup_peak = vm("VmHWM")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak: measure training alone
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
ids = torch.randint(0, 1024, (1, 128))
model.train()
for _ in range(2):
    loss = causal_lm_loss(model(ids).logits, ids)
    opt.zero_grad()
    loss.backward()
    opt.step()
print(json.dumps({"mode": mode, "setup_peak_mib": setup_peak, "train_peak_mib": vm("VmHWM"),
                  "trainable": sum(p.numel() for p in params)}))
"""


@pytest.mark.slow
def test_peak_memory_full_vs_lora_vs_qlora(tmp_path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE)
    root = Path(__file__).resolve().parents[2]
    rows = {}
    for mode in ("full", "lora", "qlora"):
        out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, cwd=root,
                             env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print("\npeak RSS (MiB), LLaMA d_model 1024, 6 layers (~80M params), batch 1 x 128, AdamW:")
    for mode, r in rows.items():
        print(f"  {mode:5s}  setup {r['setup_peak_mib']:7.0f}  training {r['train_peak_mib']:7.0f}  "
              f"trainable {r['trainable']:,}")
    assert rows["lora"]["trainable"] == rows["qlora"]["trainable"] < rows["full"]["trainable"] / 50
