"""``lmzoo.stages.pretrain``: every shipped config trains, a resumed run equals an uninterrupted one,
the config is checked at the boundary, and a tiny LLaMA learns real text."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import lmzoo
from lmzoo.errors import ConfigError
from lmzoo.stages import pretrain
from tests.shared_data import DATA, need
from lmzoo.train.checkpoint import load_model_weights

ROOT = Path(__file__).resolve().parents[2]
# the pretraining configs (configs/<family>/); configs/sft/ and the later stages' folders hold their own
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name in __import__(
    "lmzoo.models.registry", fromlist=["families"]).families())
CORPUS = DATA / "corpora" / "en" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


def _small(cfg: dict, cache: Path, **over) -> dict:
    """The shipped config at a test's size: a sliver of the built-in corpus, a few steps."""
    for k, v in {"data.builtin_scale": 0.02, "data.cache_dir": str(cache), "tokenizer.max_chars": 60_000,
                 "train.steps": 3, "train.log_every": 1, "train.progress": False, "train.plot": False,
                 "train.eval_every": 0, "train.save_every": 0, **over}.items():
        pretrain.set_path(cfg, k, v)
    return cfg


def test_every_family_with_a_pretraining_objective_has_a_tiny_config():
    from lmzoo.models.registry import families
    from lmzoo.objectives import objective_for

    def text_objective(family):
        try:
            return objective_for(family) in ("causal_lm", "masked_lm", "span_corruption", "glm")
        except ConfigError:  # a family without a pretraining recipe
            return False

    shipped = {p.parent.name for p in CONFIGS if p.name == "tiny.yaml"}
    text_families = {f for f in families() if text_objective(f)}
    assert text_families <= shipped, f"no configs/<family>/tiny.yaml for {sorted(text_families - shipped)}"


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_shipped_config_trains_and_writes_a_loadable_final_model(path, tmp_path, cache):
    cfg = _small(pretrain.load_config(path), cache)
    res = pretrain.run(cfg, tmp_path, source=str(path))
    if path.stem == "tiny":
        assert 0.7e6 <= res.n_parameters <= 1.3e6  # "about a million parameters"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in train)
    vocab = lmzoo.load_tokenizer(tmp_path / "final").vocab_size
    assert train[0]["loss"] < math.log(vocab) + 1.5  # a sane start: near uniform over the vocabulary
    assert math.isfinite(res.train.eval["loss"]) and res.train.eval["bpb"] > 0
    model = lmzoo.load(tmp_path / "final")
    ckpt = load_model_weights(tmp_path / "checkpoints" / "step_00000003", lmzoo.build(res.model_config))
    for k, v in ckpt.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k  # final/ holds exactly the trained weights


def test_resume_through_the_stage_is_bitwise_equal(tmp_path, cache):
    """BERT: a seeded masking transform and NSP pairs draw randomness every step, and the tokenizer
    trained at the start must be the same one after the resume."""
    cfg = _small(pretrain.load_config(ROOT / "configs" / "bert" / "tiny.yaml"), cache,
                 **{"train.steps": 6, "train.save_every": 3})
    pretrain.run(cfg, tmp_path / "a")
    pretrain.run(cfg, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")
    shutil.rmtree(tmp_path / "b" / "final")
    (tmp_path / "b" / "tokenizer" / "tokenizer.json").touch()  # reused as it is, not retrained
    res = pretrain.run(cfg, tmp_path / "b", resume=True)
    assert res.train.resumed_from.name == "step_00000003"
    a, b = lmzoo.load(tmp_path / "a" / "final"), lmzoo.load(tmp_path / "b" / "final")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
    tok_before = (tmp_path / "a" / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        pretrain.run(cfg, tmp_path / "a")  # without --resume: refused before anything is overwritten
    assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == tok_before


@pytest.mark.parametrize("change,message", [
    ({"optimizer": {}}, r"unknown section\(s\) \['optimizer'\]"),
    ({"data": {"batch": 4}}, r"unknown key\(s\) \['batch'\] in 'data'"),
    ({"train": {"lr": -1}}, "'lr' must be a positive number"),
    ({"model": {"family": "llama", "n_layer": 2}}, r"unknown llama config field\(s\) \['n_layer'\]"),
    ({"model": {"family": "llama", "bos_token_id": "<nope>"}}, "bos_token_id: '<nope>' is not a token"),
    ({"model": {"family": "llama", "vocab_size": 100}}, "vocab_size 100 is smaller than the tokenizer's"),
    ({"data": {"files": ["/no/such/file.txt"]}}, "no such file"),
])
def test_bad_configs_are_refused_with_the_key(change, message, tmp_path, cache):
    cfg = _small(pretrain.load_config(ROOT / "configs" / "llama" / "tiny.yaml"), cache)
    for section, values in change.items():
        cfg.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message):
        pretrain.run(cfg, tmp_path)


@pytest.mark.parametrize("family,dotted,value", [
    ("bert", "model.type_vocab_size", 2.0), ("t5", "model.num_buckets", "32"), ("deepseek_v2", "model.top_k", True),
    ("gpt2", "model.n_heads", 4.5), ("gpt2", "data.batch_size", 16.0), ("chatglm", "tokenizer.max_chars", "1000"),
    ("llama", "data.seq_len", "64"), ("llama", "train.eval_every", 1.5),
])
def test_one_integer_rule_for_every_section(family, dotted, value):
    """An integer field takes a YAML integer: not a float, a string or a bool, in every section."""
    cfg = pretrain.load_config(ROOT / "configs" / family / "tiny.yaml")
    pretrain.check_config(cfg)  # the shipped config passes, and the changed one does not
    pretrain.set_path(cfg, dotted, value)
    kind = type(value).__name__
    pattern = rf"{dotted.replace('.', '[.]')} must be an integer.*, got {value!r} \({kind}\)"
    with pytest.raises(ConfigError, match=pattern):
        pretrain.check_config(cfg, "tiny.yaml")


@pytest.mark.slow
def test_loss_falls_below_the_unigram_baseline_on_tinyshakespeare(tmp_path, cache):
    need(CORPUS)
    from lmzoo.data import split_tokens, tokenize_files
    from lmzoo.data.baselines import unigram_cross_entropy

    text = tmp_path / "shakespeare-300k.txt"  # the first 300,000 characters: enough, and quick to tokenise
    text.write_text(CORPUS.read_text(encoding="utf-8")[:300_000], encoding="utf-8")
    cfg = _small(pretrain.load_config(ROOT / "configs" / "llama" / "tiny.yaml"), cache, **{
        "data.files": [str(text)], "tokenizer.vocab_size": 300, "tokenizer.max_chars": 100_000,
        "data.val_fraction": 0.03, "train.steps": 40, "train.warmup_steps": 5, "train.schedule": "constant"})
    res = pretrain.run(cfg, tmp_path)
    tok = lmzoo.load_tokenizer(tmp_path / "tokenizer")
    tf = tokenize_files([text], tok, cache_dir=cache)
    train_span, val_span = split_tokens(tf, 0.03, 64)
    unigram = unigram_cross_entropy(tf.tokens[slice(*train_span)], tf.tokens[slice(*val_span)], tok.vocab_size)
    first = res.train.history[0]["loss"]
    final = res.train.eval["loss"]
    print(f"tinyshakespeare, {tok.vocab_size} tokens: first loss {first:.3f}, eval after 40 steps {final:.3f}, "
          f"unigram baseline {unigram:.3f}")
    assert final < first - 2.0, (first, final)
    assert final < unigram - 0.3, (final, unigram)  # it learnt context, not only token frequencies
