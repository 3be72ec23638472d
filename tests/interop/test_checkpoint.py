"""Bad checkpoints fail loudly with one lmzoo error that names the file, key and expectation;
sharded and atomic saves behave."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmzoo
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.models.llama.config import LlamaConfig


def tiny(**kw):
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_positions=64)
    return LlamaConfig(**{**base, **kw})


@pytest.fixture
def saved(tmp_path):
    model = lmzoo.build(tiny())
    path = lmzoo.save(model, tmp_path / "ckpt")
    return model, path


def _edit_state(path, fn):
    f = path / "model.safetensors"
    state = load_file(f)
    fn(state)
    save_file(state, f)


def test_missing_key_is_named(saved):
    _, path = saved
    _edit_state(path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing key.*model\.layers\.1\.mlp\.up_proj\.weight"):
        lmzoo.load(path)


def test_unexpected_key_is_named(saved):
    _, path = saved
    _edit_state(path, lambda s: s.__setitem__("model.layers.0.mystery.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected key.*model\.layers\.0\.mystery\.weight"):
        lmzoo.load(path)


def test_wrong_shape_names_key_file_and_expected(saved):
    _, path = saved
    _edit_state(path, lambda s: s.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(8, 32)))
    with pytest.raises(CheckpointError) as e:
        lmzoo.load(path)
    msg = str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "(16, 32)" in msg and "model.safetensors" in msg


def test_truncated_file_names_file(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        lmzoo.load(path)


def test_unknown_model_type(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "frobnicator"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="frobnicator"):
        lmzoo.load(path)


def test_malformed_config(saved, tmp_path):
    _, path = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        lmzoo.load(path)
    cfg = tiny().to_hf()
    cfg["num_key_value_heads"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="n_kv_heads"):
        lmzoo.load(path)
    with pytest.raises(CheckpointError, match="config.json"):
        lmzoo.load(tmp_path)  # a directory without config.json


def test_pickle_checkpoints_are_refused(saved):
    _, path = saved
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        lmzoo.load(path)


def test_sharded_save_and_load(tmp_path):
    model = lmzoo.build(tiny())
    path = lmzoo.save(model, tmp_path / "sharded", max_shard_size=20_000)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 2 and (path / "model.safetensors.index.json").exists()
    again = lmzoo.load(path)
    ids = torch.randint(0, 64, (1, 7))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)
    # a shard the index names but that is gone
    (path / shards[0]).unlink()
    with pytest.raises(CheckpointError, match=shards[0]):
        lmzoo.load(path)


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import lmzoo.interop.safetensors_io as io

    calls = {"n": 0}
    real = io.save_file

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(io, "save_file", failing)
    with pytest.raises(OSError):
        lmzoo.save(lmzoo.build(tiny()), tmp_path / "out", max_shard_size=20_000)
    assert list(tmp_path.iterdir()) == []


def test_save_over_existing_directory_replaces_it(tmp_path):
    a, b = lmzoo.build(tiny()), lmzoo.build(tiny())
    lmzoo.save(a, tmp_path / "m")
    lmzoo.save(b, tmp_path / "m")
    again = lmzoo.load(tmp_path / "m")
    assert torch.equal(again.embed.weight, b.embed.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_load_dtype_override(saved):
    model, path = saved
    bf = lmzoo.load(path, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert torch.equal(bf.embed.weight, model.embed.weight.to(torch.bfloat16))


def test_meta_build_is_free_and_counts_parameters():
    import time

    t = time.perf_counter()
    m = lmzoo.build("llama2-70b", device="meta")
    assert time.perf_counter() - t < 30  # generous: this only guards against real allocation
    assert m.num_parameters() == 68_976_648_192  # the published LLaMA-2-70B count
    assert lmzoo.build("llama2-7b", device="meta").num_parameters() == 6_738_415_616


@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_directory_follows_the_umask(tmp_path, mask, dir_mode, file_mode):
    """Issue 11: mkdtemp made every output folder 0700; what lmzoo writes gets the umask's modes."""
    import os
    import stat

    from lmzoo.models.llama.config import LlamaConfig

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer_config.json").write_text("{}")
    os.chmod(tok_dir / "tokenizer_config.json", 0o600)  # a copied file takes the umask's mode, not its source's
    model = lmzoo.build(LlamaConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4, d_ff=48))
    old = os.umask(mask)
    try:
        out = lmzoo.save(model, tmp_path / "m", tokenizer=tok_dir)
        sharded = lmzoo.save(model, tmp_path / "s", max_shard_size=2000)
    finally:
        os.umask(old)
    for d in (out, sharded):
        assert stat.S_IMODE(d.stat().st_mode) == dir_mode
        files = sorted(p for p in d.iterdir())
        assert len(files) >= 2 and all(stat.S_IMODE(p.stat().st_mode) == file_mode for p in files), \
            {p.name: oct(p.stat().st_mode) for p in files}
    assert (out / "tokenizer_config.json").exists() and len(list(sharded.glob("model-*.safetensors"))) > 1
