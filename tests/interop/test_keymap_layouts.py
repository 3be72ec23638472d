"""KeyMap extensions: rules restricted to some layers, and a rule that reads either of two layouts."""

import pytest
import torch

from lmzoo.errors import CheckpointError
from lmzoo.interop.convert import KeyMap, Rule, either, rename


def _stack(keys, ours):
    return Rule(keys, [ours], lambda ts: [torch.stack(ts)], lambda ts: list(ts[0].unbind(0)))


def _map():
    per_expert = _stack([f"l.{{i}}.experts.{e}.w" for e in range(3)], "layers.{i}.w")
    fused = rename("l.{i}.experts.w", "layers.{i}.w")
    dense = rename("l.{i}.mlp.w", "layers.{i}.mlp")
    dense.layers = [0]
    moe = either(per_expert, fused)
    moe.layers = [1, 2]
    return KeyMap([dense, moe], n_layers=3)


def test_layers_and_either_layout():
    km = _map()
    w = {i: torch.randn(3, 2) for i in (1, 2)}
    per = {"l.0.mlp.w": torch.ones(2)} | {f"l.{i}.experts.{e}.w": w[i][e] for i in (1, 2) for e in range(3)}
    fused = {"l.0.mlp.w": torch.ones(2)} | {f"l.{i}.experts.w": w[i] for i in (1, 2)}
    mixed = {"l.0.mlp.w": torch.ones(2), "l.1.experts.w": w[1]} | {f"l.2.experts.{e}.w": w[2][e] for e in range(3)}
    for src in (per, fused, mixed):  # each layer picks the layout it finds
        out = km.to_lmzoo(src)
        assert sorted(out) == ["layers.0.mlp", "layers.1.w", "layers.2.w"]
        assert torch.equal(out["layers.1.w"], w[1]) and torch.equal(out["layers.2.w"], w[2])
    assert sorted(km.to_hf(km.to_lmzoo(fused))) == sorted(per)  # saving writes the primary layout


def test_neither_layout_is_named_in_the_error():
    km = _map()
    with pytest.raises(CheckpointError, match=r"l\.1\.experts\.0\.w.*other layout.*l\.1\.experts\.w"):
        km.to_lmzoo({"l.0.mlp.w": torch.ones(2), "l.2.experts.w": torch.ones(3, 2)})
    with pytest.raises(CheckpointError, match="unexpected"):  # both layouts at once: the unread one is not dropped
        km.to_lmzoo({"l.0.mlp.w": torch.ones(2), "l.1.experts.w": torch.ones(3, 2), "l.2.experts.w": torch.ones(3, 2),
                     "l.2.experts.0.w": torch.ones(2)})


def test_either_refuses_layouts_of_different_tensors():
    with pytest.raises(ValueError, match="alternative"):
        either(rename("a", "x"), rename("b", "y"))
