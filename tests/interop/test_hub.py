"""Hub ids as model names (lmzoo/interop/hub.py), offline: a Hub cache laid out as huggingface_hub writes
it (tests/hub_cache.py) holds tiny models transformers and PEFT saved; ``lmzoo.load("org/name")`` finds
them there with their logits, and what cannot be found is one clear line."""

import pytest
import torch

import lmzoo
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.interop import hub
from tests.hub_cache import DEV, IDS, MAIN


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# -- which files come down -------------------------------------------------------------------------
LISTINGS = {  # Hub repositories' files as the Hub lists them, and those lmzoo reads
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": (
        [".gitattributes", "README.md", "config.json", "eval_results.json", "generation_config.json",
         "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"],
        ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
         "tokenizer.model", "tokenizer_config.json"]),
    "THUDM/chatglm2-6b": (  # pickled weights and remote code: neither comes down
        ["config.json", "configuration_chatglm.py", "modeling_chatglm.py", "pytorch_model-00001-of-00007.bin",
         "pytorch_model.bin.index.json", "quantization.py", "tokenization_chatglm.py", "tokenizer.model",
         "tokenizer_config.json"],
        ["config.json", "tokenizer.model", "tokenizer_config.json"]),
    "a Mistral-style repository": (  # consolidated.safetensors: the same weights again, for Mistral's own code
        ["config.json", "consolidated.safetensors", "model-00001-of-00002.safetensors",
         "model-00002-of-00002.safetensors", "model.safetensors.index.json", "params.json", "tokenizer.json",
         "original/tokenizer.model", "original/model.safetensors"],
        ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
         "model.safetensors.index.json", "tokenizer.json"]),
}


@pytest.mark.parametrize("repo", sorted(LISTINGS))
def test_only_the_files_lmzoo_reads_come_down(repo):
    """snapshot_download filters a repository's listing with huggingface_hub's own filter_repo_objects."""
    from huggingface_hub.utils import filter_repo_objects

    listing, expected = LISTINGS[repo]
    got = sorted(filter_repo_objects(listing, allow_patterns=list(hub.FILES["model"]), ignore_patterns=list(hub.SKIP)))
    assert got == sorted(expected)
    adapter = ["README.md", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
    assert sorted(filter_repo_objects(adapter, allow_patterns=list(hub.FILES["adapter"]))) == adapter[1:3]
    everything = [*listing, "adapter_config.json", "x.bin", "x.pt", "x.py", "sub/tokenizer.json"]
    kept = list(filter_repo_objects(everything, allow_patterns=list(hub.FILES["all"]), ignore_patterns=list(hub.SKIP)))
    assert not [f for f in kept if f.endswith((".bin", ".pt", ".py")) or "/" in f]


def test_the_test_cache_is_laid_out_as_huggingface_hub_s(offline_hub):
    """huggingface_hub's own scanner reads the cache tests/hub_cache.py writes: repos, refs and revisions."""
    from huggingface_hub import scan_cache_dir

    info = {r.repo_id: r for r in scan_cache_dir(offline_hub.cache).repos}
    assert sorted(info) == ["org/adapter", "org/name", "org/pickled"]
    revs = {r.commit_hash: r for r in info["org/name"].revisions}
    assert sorted(revs) == sorted([MAIN, DEV])
    assert revs[MAIN].refs == {"main"} and revs[DEV].refs == {"dev"}
    assert "model.safetensors" in {f.file_name for f in revs[MAIN].files}


def test_is_repo_id():
    for name in ("org/name", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "gpt2"):
        assert hub.is_repo_id(name)
    for name in ("runs/sft/final", "/abs/dir", "./x", "task:add", "mod.rewards:fn", "a--b", "", None):
        assert not hub.is_repo_id(name)


# -- lmzoo.load by Hub id --------------------------------------------------------------------------
def test_load_by_hub_id_gives_the_directory_s_and_transformers_logits(offline_hub):
    model = lmzoo.load("org/name", dtype="float32")
    assert model.source_directory == str(offline_hub.cache / "models--org--name" / "snapshots" / MAIN)
    torch.testing.assert_close(_logits(model), _logits(lmzoo.load(offline_hub.source["main"], dtype="float32")))
    torch.testing.assert_close(_logits(model), offline_hub.logits["main"], atol=1e-5, rtol=1e-5)
    tok = lmzoo.load_tokenizer("org/name")  # the tokenizer of the same snapshot
    assert tok.encode("hello 床前明月光") == lmzoo.load_tokenizer(offline_hub.source["main"]).encode("hello 床前明月光")


def test_revision_by_branch_and_by_commit(offline_hub):
    dev = lmzoo.load("org/name", revision="dev", dtype="float32")
    torch.testing.assert_close(_logits(dev), offline_hub.logits["dev"], atol=1e-5, rtol=1e-5)
    assert (offline_hub.logits["dev"] - offline_hub.logits["main"]).abs().max() > 0.1  # two different models
    by_commit = lmzoo.load("org/name", revision=MAIN, dtype="float32")
    torch.testing.assert_close(_logits(by_commit), offline_hub.logits["main"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="applies to a Hub id"):
        lmzoo.load(offline_hub.source["main"], revision="dev")


def test_a_missing_id_and_a_missing_revision_are_one_line(offline_hub):
    with pytest.raises(CheckpointError) as e:
        lmzoo.load("org/missing")
    msg = str(e.value)
    assert msg == (f"'org/missing' is not a local path, and as a Hub id it is not in the local Hub cache "
                   f"({offline_hub.cache}) and HF_HUB_OFFLINE is set")
    with pytest.raises(CheckpointError) as e:
        lmzoo.load("org/name", revision="v9")
    msg = str(e.value)
    assert "\n" not in msg and "but not at revision 'v9'" in msg and "HF_HUB_OFFLINE is set" in msg
    assert f"cached: dev, main, commit {DEV[:12]}, commit {MAIN[:12]}" in msg


def test_a_repository_without_safetensors_is_refused_by_name(offline_hub):
    with pytest.raises(CheckpointError, match="'org/pickled' is not a local path, and as a Hub id it has no "
                                              "safetensors weights at revision 'main'.*never reads pickled"):
        lmzoo.load("org/pickled")


def test_a_local_directory_named_like_the_id_comes_first(offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lmzoo.save(lmzoo.load(offline_hub.source["dev"]), tmp_path / "org" / "name")
    model = lmzoo.load("org/name", dtype="float32")
    assert model.source_directory == "org/name"
    torch.testing.assert_close(_logits(model), offline_hub.logits["dev"], atol=1e-5, rtol=1e-5)


def test_a_peft_adapter_by_hub_id(offline_hub):
    from lmzoo.peft import load_adapter

    model = load_adapter(lmzoo.load("org/name", dtype="float32"), "org/adapter", trainable=False)
    torch.testing.assert_close(_logits(model), offline_hub.logits["adapter"], atol=1e-5, rtol=1e-5)
    assert (offline_hub.logits["adapter"] - offline_hub.logits["main"]).abs().max() > 1e-2  # the adapter counts


def test_the_network_s_error_is_one_line(offline_hub, monkeypatch):
    """Online with the Hub out of reach (a closed port on this machine): the connection error, in one line."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(CheckpointError) as e:
        hub.resolve("org/missing")
    assert str(e.value).startswith(f"'org/missing' is not in the local Hub cache ({offline_hub.cache}) and the Hub "
                                   "could not be reached (") and "\n" not in str(e.value)
    # a cached branch is read from the cache when the Hub cannot be asked for its newest commit
    assert hub.resolve("org/name") == offline_hub.cache / "models--org--name" / "snapshots" / MAIN


def test_a_partly_cached_snapshot_is_used_when_it_has_what_lmzoo_needs(offline_hub, tmp_path, monkeypatch):
    """huggingface_hub 2 knows a snapshot's full listing (trees/<commit>.json) and calls one that lacks a
    requested file incomplete; transformers caches only the files it reads, so lmzoo uses what is there."""
    tree = pytest.importorskip("huggingface_hub._tree_cache")
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    from tests.hub_cache import cache_repo

    for repo, files in (("org/most", ["config.json", "model.safetensors"]), ("org/some", ["tokenizer.json"])):
        d = tmp_path / repo
        d.mkdir(parents=True)
        for f in files:
            (d / f).write_bytes((offline_hub.source["main"] / f).read_bytes())
        cache_repo(cache, repo, d, MAIN)
        listing = {f: tree.TreeCacheEntry(size=1, blob_id="0" * 40) for f in [*files, "vocab.json", "config.json"]}
        tree.write_tree_cache(str(hub.repo_folder(repo)), MAIN, listing)
    assert hub.resolve("org/most") == cache / "models--org--most" / "snapshots" / MAIN  # only vocab.json missing
    with pytest.raises(CheckpointError, match="'org/some' is only partly in the local Hub cache: .*incomplete"):
        hub.resolve("org/some", kind="config")  # config.json itself is missing
