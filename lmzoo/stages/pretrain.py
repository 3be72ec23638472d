"""Pretraining, the thin way: a YAML run config wires a tokenizer, data, a family's model and its
objective into the shared training loop (``lmzoo.train``). Nothing here names a family.

A run config has five sections (``configs/<family>/tiny.yaml`` are complete examples; the reference
is docs/training.md):

  model:      family: llama | preset: <name> (optional) | any field of the family's config |
              init_std: 0.02 (N(0, std²) matrices, zero biases; null keeps the builder's init).
              ``vocab_size: tokenizer`` takes the tokenizer's size; a ``*_token_id`` given as a string
              ("<|endoftext|>", "[gMASK]") is that token's id in the tokenizer.
              | init_from: <a directory lmzoo.save wrote, e.g. a run's final/>: continue pretraining
              those weights; the architecture is the checkpoint's (fields given beside it must agree
              with it) and so is the tokenizer, unless ``tokenizer.path`` names one of the same size.
  tokenizer:  train: <kind> (bpe | wordpiece | unigram | sp-bpe), vocab_size, special_tokens, max_chars
              | path: <a tokenizer file or folder>
  objective:  name (default: the family's recipe), step: {options}, transform: {options}
  data:       files: [...] (empty: the built-in corpus, builtin_scale of it), field, seq_len,
              batch_size (global rows per micro-batch, split across ranks), val_fraction
  train:      every TrainConfig field (lmzoo/train/config.py)

The run folder: tokenizer/ (trained once, reused on --resume), checkpoints/, metrics.jsonl,
run.json, loss.png and, at the end, final/ (``lmzoo.load`` and ``lmzoo.load_tokenizer`` read it).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

import lmzoo
from lmzoo.errors import ConfigError
from lmzoo.models.config_base import check_integer, check_integer_fields
from lmzoo.models.registry import get_family, get_preset
from lmzoo.train import TrainConfig, Trainer, TrainResult
from lmzoo.train.checkpoint import list_checkpoints, load_model_tensors, tied_free
from lmzoo.train.distributed import DistEnv, barrier, setup
from lmzoo.train.init import init_weights

SECTIONS = ("model", "tokenizer", "objective", "data", "train")
DATA_KEYS = {"files", "field", "builtin_scale", "seq_len", "batch_size", "val_fraction", "cache_dir"}
TOKENIZER_KEYS = {"train", "path", "vocab_size", "special_tokens", "max_chars"}
OBJECTIVE_KEYS = {"name", "step", "transform"}
INTEGER_KEYS = {"data": ("seq_len", "batch_size"), "tokenizer": ("vocab_size", "max_chars")}  # each >= 1


@dataclass
class PretrainResult:
    train: TrainResult
    final_dir: Path | None
    model_config: object
    n_parameters: int


# -- the run config -------------------------------------------------------------------------------


def load_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the run config ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    check_config(cfg, str(path))
    return cfg


def check_config(cfg: dict, source: str = "config") -> None:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: a run config is a mapping with sections {list(SECTIONS)}")
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    for name, keys in (("data", DATA_KEYS), ("tokenizer", TOKENIZER_KEYS), ("objective", OBJECTIVE_KEYS)):
        extra = sorted(set(cfg.get(name) or {}) - keys)
        if extra:
            raise ConfigError(f"{source}: unknown key(s) {extra} in '{name}'; known: {sorted(keys)}")
    for name, keys in INTEGER_KEYS.items():
        for k in keys:
            if k in (cfg.get(name) or {}):
                _positive_integer(f"{source}: {name}.{k}", cfg[name][k])
    model = cfg.get("model") or {}
    if not isinstance(model, dict) or not (model.get("family") or model.get("preset") or model.get("init_from")):
        raise ConfigError(f"{source}: 'model' needs a 'family' (one of the registry's), a 'preset' or 'init_from'")
    _check_model_integers(model, source)
    TrainConfig.from_dict(cfg.get("train"), f"{source}: train")  # fails early on a bad training option


def _positive_integer(where: str, value) -> None:
    check_integer(where, value)
    if value < 1:
        raise ConfigError(f"{where} must be an integer >= 1, got {value!r}")


def _check_model_integers(section: dict, source: str) -> None:
    """The integer fields of the model section, by the family config's own annotations (nested ones too)."""
    if section.get("preset"):
        cls = type(get_preset(section["preset"])[1])
    elif section.get("family"):
        cls = get_family(section["family"]).config_cls
    else:
        return  # init_from: checked against the checkpoint's config later
    _check_integers_of(cls, section, f"{source}: model")


def _check_integers_of(cls, section: dict, where: str) -> None:
    known = {f.name: f for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in section.items() if k in known and not (k == "vocab_size" and v == "tokenizer")
              and not (k.endswith("_token_id") and isinstance(v, (str, list)))}  # resolved by the tokenizer
    check_integer_fields(cls, where, fields)
    for k, v in fields.items():
        if isinstance(v, dict) and known[k].default_factory is not dataclasses.MISSING:
            nested = type(known[k].default_factory())
            if dataclasses.is_dataclass(nested):
                check_integer_fields(nested, f"{where}.{k}", v)


def set_path(cfg: dict, dotted: str, value) -> None:
    """``set_path(cfg, "train.lr", 1e-3)``: what ``--set train.lr=1e-3`` does."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
    node[leaf] = value


def apply_overrides(cfg: dict, args, overrides: dict[str, str]) -> None:
    """A command's flags onto its run config: each ``overrides`` attribute that was given (``--steps`` ->
    ``train.steps``), ``--no-progress``, then every ``--set SECTION.KEY=VALUE`` (the value read as YAML)."""
    for attr, dotted in overrides.items():
        if getattr(args, attr, None) is not None:
            set_path(cfg, dotted, getattr(args, attr))
    if getattr(args, "no_progress", False):
        set_path(cfg, "train.progress", False)
    for item in getattr(args, "set", None) or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        set_path(cfg, key, yaml.safe_load(value))


def check_sections(cfg, sections: dict, source: str, what: str, integers: dict | None = None) -> None:
    """A stage's run config: a mapping of the known ``sections`` (name -> its keys, None: checked
    elsewhere), each a mapping of known keys; ``integers`` (section -> keys) must be integers >= 1."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: {what} run config is a mapping with sections {sorted(sections)}")
    unknown = sorted(set(cfg) - set(sections))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; {what} config has {sorted(sections)}")
    for name, keys in sections.items():
        section = cfg.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: {name} must be a mapping, got {type(section).__name__}")
        if keys is not None and set(section) - keys:
            raise ConfigError(f"{source}: {name}: unknown key(s) {sorted(set(section) - keys)}; known: {sorted(keys)}")
        for key in (integers or {}).get(name, ()):
            if section.get(key) is not None:
                check_integer(f"{name}.{key}", section[key])
                if section[key] < 1:
                    raise ConfigError(f"{source}: {name}.{key} must be at least 1, got {section[key]}")


def check_resume(out_dir: Path, resume: bool, resume_or_start: bool) -> bool:
    """Before any work: a folder with checkpoints needs --resume, and --resume needs a checkpoint unless
    --resume-or-start. Returns whether checkpoints were found."""
    found = bool(list_checkpoints(out_dir / "checkpoints"))
    if found and not (resume or resume_or_start):
        raise ConfigError(f"{out_dir / 'checkpoints'} already holds checkpoints: resume them (--resume) or choose "
                          "another output directory")
    if resume and not resume_or_start and not found:
        raise ConfigError(f"--resume: {out_dir / 'checkpoints'} holds no checkpoint to resume; start a new run "
                          "without --resume, or pass --resume-or-start to start when there is none")
    return found


# -- the pieces -----------------------------------------------------------------------------------


def _texts(data: dict, seed: int) -> tuple[list[str] | None, list[Path] | None]:
    files = [Path(f) for f in (data.get("files") or [])]
    if files:
        for f in files:
            if not f.exists():
                raise ConfigError(f"data: {f}: no such file or folder")
        return None, files
    from lmzoo.data import builtin_corpus

    return builtin_corpus(float(data.get("builtin_scale", 1.0)), seed=seed), None


def _tokenizer_texts(texts, files, field, max_chars: int) -> list[str]:
    from lmzoo.data import read_documents

    out, n = [], 0
    docs = texts if texts is not None else (d for f in files for d in read_documents(f, field=field))
    for d in docs:
        out.append(d)
        n += len(d)
        if n >= max_chars:
            break
    return out


def prepare_tokenizer(section: dict, texts, files, field, out_dir: Path, env: DistEnv, resume: bool):
    """Load the configured tokenizer, or train one (rank 0) into ``out_dir/tokenizer``; reused on resume."""
    target = out_dir / "tokenizer"
    if section.get("path"):
        return lmzoo.load_tokenizer(section["path"])
    if not section.get("train"):
        raise ConfigError("tokenizer: give 'train: <kind>' (bpe, wordpiece, unigram, sp-bpe) or 'path: <tokenizer>'")
    if env.is_main and not (resume and target.is_dir()):
        sample = _tokenizer_texts(texts, files, field, int(section.get("max_chars", 2_000_000)))
        tok = lmzoo.train_tokenizer(section["train"], texts=sample, vocab_size=int(section.get("vocab_size", 8000)),
                                    special_tokens=section.get("special_tokens") or ())
        tmp = out_dir / ".tmp-tokenizer"
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    barrier()
    return lmzoo.load_tokenizer(target)


def _token_id(value, tokenizer, field: str):
    if isinstance(value, list):
        return [_token_id(v, tokenizer, field) for v in value]
    if not isinstance(value, str):
        return value
    i = tokenizer.token_to_id(value)
    if i is None:
        raise ConfigError(f"model: {field}: {value!r} is not a token of the tokenizer ({tokenizer.name})")
    return i


def model_config(section: dict, tokenizer, base=None):
    """The family's config from the YAML fields (on top of a preset's numbers when one is named, or
    of ``base``, the config of an ``init_from`` checkpoint)."""
    fields = dict(section)
    preset, family = fields.pop("preset", None), fields.pop("family", None)
    fields.pop("init_std", None)  # how to initialise, not what to build: read by run()
    init_from = fields.pop("init_from", None)
    if base is not None:
        fam = get_family(type(base).family)
        if family and fam.name != family:
            raise ConfigError(f"model: init_from {init_from} is a {fam.name} model, not {family}")
    else:
        fam, base = get_preset(preset) if preset else (get_family(family), None)
        if family and fam.name != family:
            raise ConfigError(f"model: preset '{preset}' is a {fam.name} model, not {family}")
    known = {f.name: f for f in dataclasses.fields(fam.config_cls)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ConfigError(f"model: unknown {fam.name} config field(s) {unknown}; known: {sorted(known)}")
    _check_integers_of(fam.config_cls, fields, "model")
    if fields.get("vocab_size") == "tokenizer":
        fields["vocab_size"] = tokenizer.vocab_size
    for k, v in fields.items():
        if k.endswith("_token_id"):
            fields[k] = _token_id(v, tokenizer, k)
        elif isinstance(v, dict):  # a nested config (RoPE settings): its fields on top of the default
            default = getattr(base, k) if base is not None else known[k].default_factory()
            fields[k] = dataclasses.replace(default, **v)
    try:
        cfg = dataclasses.replace(base, **fields) if base is not None else fam.config_cls(**fields)
    except TypeError as e:
        raise ConfigError(f"model: {e}") from e
    if init_from is not None:
        differ = [f"{k}: {getattr(cfg, k)!r} here, {getattr(base, k)!r} there" for k in fields
                  if getattr(cfg, k) != getattr(base, k)]
        if differ:
            raise ConfigError(f"model: init_from {init_from} fixes the architecture, and the run config disagrees "
                              f"({'; '.join(differ)}); remove those fields or make them match")
        return fam, base
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"model: vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; "
                          "use 'vocab_size: tokenizer' or a larger vocabulary")
    return fam, cfg


def bytes_per_token(token_file, span: tuple[int, int], tokenizer, limit: int = 200_000) -> float | None:
    """UTF-8 bytes of text per token over (the start of) the validation span, for bits per byte."""
    ids = [int(i) for i in token_file.tokens[span[0]:min(span[1], span[0] + limit)]]
    if not ids:
        return None
    return len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8")) / len(ids)


# -- the run --------------------------------------------------------------------------------------


def load_init_from(model_section: dict, tok_section: dict):
    """(model, tokenizer) of an ``init_from`` directory: its weights in float32, and its own tokenizer
    unless ``tokenizer.path`` names one (which must then have the model's vocabulary size)."""
    directory = Path(model_section["init_from"])
    if model_section.get("preset") or "init_std" in model_section:
        clash = "preset" if model_section.get("preset") else "init_std"
        raise ConfigError(f"model: init_from and {clash} exclude each other (the checkpoint gives the architecture "
                          "and the weights)")
    if tok_section.get("train"):
        raise ConfigError("tokenizer: train: a model continued from init_from keeps the tokenizer it was trained "
                          "with; remove tokenizer.train (or give tokenizer.path)")
    extra = sorted(set(tok_section) - {"path"})
    if extra:
        raise ConfigError(f"tokenizer: {extra} apply to training a tokenizer; with init_from only 'path' does")
    if not (directory / "config.json").is_file():
        raise ConfigError(f"model: init_from {directory}: no config.json there (expected a directory written by "
                          "lmzoo.save, e.g. a run's final/)")
    if not tok_section.get("path"):
        return load_with_tokenizer(directory, "model: init_from", "give tokenizer.path")
    model = lmzoo.load(directory, dtype="float32")
    tokenizer = lmzoo.load_tokenizer(tok_section["path"])
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ConfigError(f"tokenizer: path {tok_section['path']} has {tokenizer.vocab_size} tokens, the model in "
                          f"{directory} has vocab_size {model.config.vocab_size}")
    return model, tokenizer


def load_with_tokenizer(directory, where: str, hint: str):
    """(model in float32, its own tokenizer) of a directory ``lmzoo.save`` wrote: the tokenizer must be
    there and fit the model's vocabulary. ``where`` names the option in the errors, ``hint`` the remedy."""
    model = lmzoo.load(directory, dtype="float32")
    try:
        tokenizer = lmzoo.load_tokenizer(directory)
    except ConfigError as e:
        raise ConfigError(f"{where} {directory} holds no tokenizer; {hint} ({e})") from e
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"{where} {directory}: its tokenizer has {tokenizer.vocab_size} tokens, more than the "
                          f"model's vocab_size {model.config.vocab_size}")
    return model, tokenizer


def run(cfg: dict, out_dir: str | Path, *, resume: bool = False, resume_or_start: bool = False,
        source: str = "config") -> PretrainResult:
    """Train as ``cfg`` says into ``out_dir``. ``resume``: from its newest valid checkpoint (none is an
    error); ``resume_or_start``: the same, but with none it starts from scratch."""
    from lmzoo.data import pretraining_batches, split_tokens
    from lmzoo.objectives import make_step_fn, make_transform, objective_for

    cfg = copy.deepcopy(cfg)
    check_config(cfg, source)
    tcfg = TrainConfig.from_dict(cfg.get("train"), f"{source}: train")
    env = setup(tcfg.parallel, tcfg.device)
    out_dir = Path(out_dir)
    check_resume(out_dir, resume, resume_or_start)  # before the tokenizer is retrained over its own
    resume = resume or resume_or_start
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    data, tok_section, obj = cfg.get("data") or {}, cfg.get("tokenizer") or {}, cfg.get("objective") or {}
    texts, files = _texts(data, tcfg.seed)
    init_from = cfg["model"].get("init_from")
    if init_from:
        model, tokenizer = load_init_from(cfg["model"], tok_section)
        fam, mcfg = model_config(cfg["model"], tokenizer, base=model.config)
    else:
        tokenizer = prepare_tokenizer(tok_section, texts, files, data.get("field"), out_dir, env, resume)
        fam, mcfg = model_config(cfg["model"], tokenizer)
    name = obj.get("name") or objective_for(fam.name)
    step_fn = make_step_fn(name, config=mcfg, **(obj.get("step") or {}))
    transform = make_transform(name, config=mcfg, tokenizer=tokenizer, **(obj.get("transform") or {}))
    seq_len, batch = data.get("seq_len", 256), data.get("batch_size", 16)  # integers: check_config
    if batch % env.world_size:
        raise ConfigError(f"data: batch_size {batch} (the global batch) is not divisible by {env.world_size} ranks")
    kw = dict(val_fraction=float(data.get("val_fraction", 0.05)), seed=tcfg.seed, transform=transform,
              rank=env.rank, world_size=env.world_size, cache_dir=data.get("cache_dir"),
              progress=env.is_main and tcfg.progress)
    where = dict(files=files, field=data.get("field")) if files else dict(texts=texts)
    for turn in ("main", "others"):  # rank 0 tokenises into the cache first; the others then read it
        if env.is_main == (turn == "main"):
            train_batches, eval_batches, token_file = pretraining_batches(tokenizer, seq_len, batch // env.world_size,
                                                                          **where, **kw)
        barrier()
    bpt = bytes_per_token(token_file, split_tokens(token_file, kw["val_fraction"], seq_len)[1], tokenizer)
    torch.manual_seed(tcfg.seed)  # the same initial weights on every rank and every resume
    if not init_from:
        model = lmzoo.build(mcfg)
        init_std = cfg["model"].get("init_std", 0.02)
        if init_std is not None:
            init_weights(model, float(init_std))
    n_params = model.num_parameters() if hasattr(model, "num_parameters") else sum(p.numel() for p in model.parameters())
    if env.is_main:
        print(f"{fam.name}: {n_params:,} parameters" + (f" from {init_from}" if init_from else "") +
              f", objective {name}, {token_file.n_tokens:,} tokens, {env.world_size} process(es), "
              f"parallel {env.parallel}", file=sys.stderr)
    tcfg.extra = {**tcfg.extra, "family": fam.name, "objective": name, "n_parameters": n_params,
                  **({"init_from": str(init_from)} if init_from else {})}
    trainer = Trainer(model, train_batches, step_fn, tcfg, out_dir, eval_batches=eval_batches, bytes_per_token=bpt,
                      env=env)
    result = trainer.fit(resume=resume, start_if_missing=resume_or_start)
    final = save_final(trainer, mcfg, tokenizer, out_dir / "final", env)
    return PretrainResult(result, final, mcfg, n_params)


def save_final(trainer: Trainer, mcfg, tokenizer, target: Path, env: DistEnv) -> Path | None:
    """``final/``: the weights in the Hugging Face layout ``lmzoo.load`` reads, plus the tokenizer."""
    state = trainer.full_state_dict()  # a collective under FSDP: every rank calls it
    if env.is_main:
        model = lmzoo.build(mcfg)
        load_model_tensors(model, tied_free(state, model), "the trained weights")
        lmzoo.save(model, target)
        tokenizer.save(target)
    barrier()
    return target if env.is_main else None
