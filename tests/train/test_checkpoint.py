"""The checkpoint format piece by piece: sealing and verifying, pruning, leftovers, optimizer and RNG round trips."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from lmzoo.errors import CheckpointError
from lmzoo.train import TrainConfig, Trainer, atomic
from lmzoo.train.checkpoint import (latest_valid, list_checkpoints, load_model_weights, optimizer_files,
                                    optimizer_state, prune, rng_files, set_rng)
from tests.train.tiny import ProgressionBatches, causal_step, tiny_model


def _sealed(root, name, payload=b"abc"):
    tmp = root / f".tmp-{name}"
    tmp.mkdir(parents=True)
    (tmp / "a.bin").write_bytes(payload)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.json").write_text("{}")
    return atomic.seal(tmp, root / name, {"format": "lmzoo-train-checkpoint"})


def test_seal_writes_a_manifest_last_and_verify_catches_every_change(tmp_path):
    d = _sealed(tmp_path, "step_00000001")
    assert not (tmp_path / ".tmp-step_00000001").exists()
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["files"]) == {"a.bin", "sub/b.json"}
    assert manifest["files"]["a.bin"]["bytes"] == 3
    atomic.verify(d)
    (d / "a.bin").write_bytes(b"abd")  # same size, different content
    with pytest.raises(CheckpointError, match="a.bin: SHA-256"):
        atomic.verify(d)
    (d / "a.bin").write_bytes(b"ab")
    with pytest.raises(CheckpointError, match="a.bin: 2 bytes, the manifest says 3"):
        atomic.verify(d)
    (d / "sub" / "b.json").unlink()
    (d / "a.bin").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="b.json: listed in the manifest but missing"):
        atomic.verify(d)


def test_prune_keeps_the_newest_and_leftovers_are_cleaned(tmp_path):
    for s in (1, 2, 3, 10):
        _sealed(tmp_path, f"step_{s:08d}")
    prune(tmp_path, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 3]
    (tmp_path / ".tmp-step_00000011").mkdir()
    (tmp_path / ".trash-step_00000002").mkdir()
    assert len(atomic.clean_leftovers(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000010"]
    assert latest_valid(tmp_path).name == "step_00000010"


def test_optimizer_state_round_trips_exactly():
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(input_ids=torch.arange(10)[None], labels=torch.arange(10)[None]).loss.backward()
    opt.step()
    tensors, meta = optimizer_files(opt)
    json.dumps(meta)  # everything that is not a tensor is JSON
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    fresh.load_state_dict(optimizer_state(tensors, json.loads(json.dumps(meta))))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"] and b["param_groups"][0]["betas"] == (0.8, 0.9)
    for pid in a["state"]:
        for k in a["state"][pid]:
            assert torch.equal(a["state"][pid][k], b["state"][pid][k])


def test_rng_states_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    tensors, meta = rng_files(torch.device("cpu"))
    meta = json.loads(json.dumps(meta))
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng(tensors, meta, torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_a_checkpoint_holds_no_pickle_and_reloads_into_a_plain_model(tmp_path):
    tr = Trainer(tiny_model(tie_embeddings=True), ProgressionBatches(4), causal_step,
                 TrainConfig(steps=2, progress=False, plot=False), tmp_path)
    tr.fit()
    (d,) = [p for _, p in list_checkpoints(tmp_path / "checkpoints")]
    names = sorted(p.name for p in d.iterdir())
    assert names == ["manifest.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rank_00000.json", "rank_00000.safetensors", "trainer.json"]
    assert json.loads((d / "rank_00000.json").read_text())["data"] == {"index": 2}
    assert json.loads((d / "trainer.json").read_text())["step"] == 2
    plain = load_model_weights(d, tiny_model(seed=9, tie_embeddings=True))
    assert plain.lm_head.weight is plain.embed.weight  # the tied head was stored once and stays tied
    for k, v in tr.full_state_dict().items():
        assert torch.equal(plain.state_dict()[k], v)
