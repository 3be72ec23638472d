"""Position schemes (lmzoo/nn/layout.py): a new kind of position or mask is a part given to DecoderLM,
with no edit to the stack. The test-local part here is a sliding-window mask over RoPE (Mistral's
layout), checked against a hand-built mask and against what a window means for the outputs."""

import pytest
import torch
from torch import nn

from lmzoo.nn.attention import Attention
from lmzoo.nn.layout import NoPositions, Step
from lmzoo.nn.masks import build_mask
from lmzoo.nn.mlp import GatedMLP
from lmzoo.nn.norms import RMSNorm
from lmzoo.nn.position import ALiBi, LearnedPositions, RopeConfig, Rotary2D, RotaryEmbedding
from lmzoo.nn.transformer import DecoderLM, TransformerLayer

V, D, H = 50, 32, 4


class SlidingWindowRope(RotaryEmbedding):
    """RoPE with each query seeing only its last ``window`` keys (itself included)."""

    def __init__(self, head_dim: int, window: int):
        super().__init__(head_dim, RopeConfig())
        self.window = window

    def mask(self, step: Step) -> torch.Tensor:
        causal = build_mask("causal", step.q_len, step.k_len, attention_mask=step.attention_mask, device=step.device)
        q = torch.arange(step.past, step.k_len, device=step.device)[:, None]  # (Tq, 1) key-index of each query
        k = torch.arange(step.k_len, device=step.device)[None, :]  # (1, Tk)
        return causal & (q - k < self.window)

    def describe(self) -> str:
        return f"{super().describe()}, sliding window {self.window}"


def _model(positions, n_layers: int = 2, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    rope = positions if isinstance(positions, RotaryEmbedding) else None
    layers = [TransformerLayer(Attention(D, H, rope=rope), GatedMLP(D, 64), RMSNorm(D), RMSNorm(D))
              for _ in range(n_layers)]
    model = DecoderLM(None, embed=nn.Embedding(V, D), layers=layers, final_norm=RMSNorm(D), positions=positions)
    for p in model.parameters():  # sharp attention, so that which keys are seen shows in the outputs
        if p.ndim == 2:
            nn.init.normal_(p, std=0.5)
    return model.eval()


def test_the_window_part_builds_the_hand_built_mask():
    part, T, w = SlidingWindowRope(D // H, window=3), 7, 3
    inp, pos = part.attn_inputs(Step(q_len=T, past=0, dtype=torch.float32, device=torch.device("cpu")))
    want = torch.tensor([[j <= i and i - j < w for j in range(T)] for i in range(T)])
    assert torch.equal(inp.mask[0, 0], want) and not inp.is_causal
    assert pos.tolist() == [list(range(T))] and inp.rope is not None
    inp, pos = part.attn_inputs(Step(q_len=1, past=T - 1, dtype=torch.float32, device=torch.device("cpu")))
    assert torch.equal(inp.mask[0, 0], want[-1:]) and pos.tolist() == [[T - 1]]  # a decode step


def test_a_window_changes_what_the_stack_computes_and_nothing_else():
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    w = 4
    windowed, plain = _model(SlidingWindowRope(D // H, w), n_layers=1), _model(RotaryEmbedding(D // H, RopeConfig()), 1)
    with torch.no_grad():
        # RoPE is relative: with one layer, the last token under a window of w equals the plain model
        # reading only the last w tokens
        last = windowed(ids).logits[:, -1]
        assert torch.allclose(last, plain(ids[:, -w:]).logits[:, -1], atol=1e-4)
        assert (last - plain(ids).logits[:, -1]).abs().max() > 1e-2  # and the window did cut something
        # a window as long as the input is no window
        assert torch.allclose(_model(SlidingWindowRope(D // H, 9), 1)(ids).logits, plain(ids).logits, atol=1e-5)


def test_a_windowed_cached_decode_equals_the_full_forward():
    model = _model(SlidingWindowRope(D // H, 3))
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 8)
        steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                            for t in range(5, 8)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_every_part_describes_itself():
    assert NoPositions().describe() == "none"
    assert LearnedPositions(8, D).describe() == "learned absolute"
    assert ALiBi(H).describe() == "ALiBi"
    assert RotaryEmbedding(8, RopeConfig(rotary_fraction=0.5, interleaved=True)).describe() == "RoPE 0.5 of head interleaved"
    assert Rotary2D(8).describe() == "2D RoPE (position + block)"
    assert SlidingWindowRope(8, 16).describe() == "RoPE, sliding window 16"


@pytest.mark.parametrize("make", [lambda: LearnedPositions(6, D), lambda: RotaryEmbedding(D // H, RopeConfig()),
                                  lambda: ALiBi(H), NoPositions])
def test_the_context_check_is_the_stacks_for_every_part(make):
    part = make()
    part.max_positions = 6  # a learned table has it from its size; any part may declare one
    model = _model(part)
    ids = torch.zeros(1, 7, dtype=torch.long)
    with pytest.raises(ValueError, match="longer than the model's context of 6"):
        model(ids)
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(ids[:, :6], cache=cache)
    with pytest.raises(ValueError, match="7 tokens is longer"):  # counted with the cache
        model(ids[:, :1], cache=cache)
    assert model.max_positions == 6
