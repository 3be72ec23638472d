"""``lmzoo.load_tokenizer(path)``: find the format, read it with its faithful reader, name the specials.

Formats (a registry: name -> how to recognise it -> how to load it), tried in this order in a
directory: tokenizer.json, a SentencePiece ``.model``, GPT-2 ``vocab.json`` + ``merges.txt``,
BERT ``vocab.txt``, a tiktoken ``*.tiktoken`` file. A file path picks its format by name.

Special-token names come from, in increasing priority: the vocabulary itself, a
``special_tokens_map.json``, ``tokenizer_config.json`` (transformers' convention, also the home
of ``chat_template`` and ``padding_side``), and what lmzoo knows about the family (flavor).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

from lmzoo.data.readers import read_utf8
from lmzoo.errors import ConfigError
from lmzoo.tokenizers.tokenizer import ROLES, Tokenizer


class Format(NamedTuple):
    find: Callable[[Path], tuple | None]   # a directory -> the files of this format, or None
    accepts: Callable[[Path], bool]        # a single file of this format?
    load: Callable                         # (files, config, flavor, options) -> Tokenizer


def _one(directory: Path, names=(), suffix: str | None = None):
    for n in names:
        if (directory / n).is_file():
            return (directory / n,)
    found = sorted(directory.glob(f"*{suffix}")) if suffix else []
    return (found[0],) if len(found) == 1 else None


def read_json(path: Path) -> dict:
    try:
        return json.loads(read_utf8(path))
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


def read_config(directory: Path) -> dict:
    """tokenizer_config.json over special_tokens_map.json (either may be absent)."""
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            config.update(read_json(directory / name))
    if (directory / "chat_template.jinja").is_file():
        config.setdefault("chat_template", read_utf8(directory / "chat_template.jinja"))
    return config


def _config_roles(config: dict) -> dict[str, str]:
    roles = {}
    for role in ROLES:
        v = config.get(f"{role}_token")
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            roles[role] = v
    return roles


def _config_template(config: dict, source: Path) -> str | None:
    t = config.get("chat_template")
    if isinstance(t, list):  # [{"name": ..., "template": ...}]: transformers picks "default"
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        if "default" not in named:
            raise ConfigError(f"{source}: chat_template is a list without a 'default' entry ({sorted(named)})")
        t = named["default"]
    if t is not None and not isinstance(t, str):
        raise ConfigError(f"{source}: chat_template must be a string, got {type(t).__name__}")
    return t


def _guess_roles(tok_backend) -> dict[str, str]:
    """Common special-token spellings present in a tokenizer.json without a config."""
    guesses = dict(bos=("<s>", "<|begin_of_text|>", "<|startoftext|>"), eos=("</s>", "<|end_of_text|>", "<|endoftext|>"),
                   unk=("<unk>", "[UNK]"), pad=("<pad>", "[PAD]", "<|pad|>"), cls=("[CLS]",), sep=("[SEP]",),
                   mask=("[MASK]", "<mask>"))
    roles = {}
    for role, names in guesses.items():
        for n in names:
            if tok_backend.token_to_id(n) is not None:
                roles[role] = n
                break
    return roles


def _finish(backend, roles, config, prefix, suffix, flavor_template, flavor, source) -> Tokenizer:
    from lmzoo.tokenizers.chat import resolve_template

    roles = {**roles, **_config_roles(config)}
    template = _config_template(config, source) or flavor_template
    return Tokenizer(backend, roles=roles, prefix=prefix, suffix=suffix,
                     chat_template=resolve_template(template) if template else None,
                     padding_side=config.get("padding_side", "right"), name=str(source), flavor=flavor)


def _load_tokenizer_json(files, config, flavor, options):
    from lmzoo.tokenizers.backends import TokenizersBackend

    _no_options(files[0], options)
    b = TokenizersBackend.from_file(files[0])
    prefix, suffix = b.post_processor_template()
    return _finish(b, _guess_roles(b), config, prefix, suffix, None, None, files[0])


def _load_sentencepiece(files, config, flavor, options):
    from lmzoo.tokenizers.sentencepiece_backend import SentencePieceBackend

    path = files[0]
    if flavor is None:
        flavor = config.get("lmzoo_flavor") or _sentencepiece_flavor(path, config)
    if "num_image_tokens" in config and "image_tokens" not in options and flavor == "chatglm-6b":
        options = {**options, "image_tokens": config["num_image_tokens"]}
    b = SentencePieceBackend.from_file(path, flavor, **options)
    roles = {**b.default_roles(), **_config_roles(config), **b.flavor.roles}
    prefix, suffix = b.template(roles)
    return _finish(b, roles, {k: v for k, v in config.items() if not k.endswith("_token")}, prefix, suffix,
                   b.flavor.chat_template, flavor, path)


def _sentencepiece_flavor(path: Path, config: dict) -> str:
    if path.name == "ice_text.model":
        return "chatglm-6b"
    if config.get("tokenizer_class") == "ChatGLMTokenizer":
        text = json.dumps(config)
        return "chatglm3" if ("chatglm3" in text.lower() or "<|user|>" in text) else "chatglm2"
    return "sentencepiece"


def _load_gpt2(files, config, flavor, options):
    from lmzoo.tokenizers.backends import TokenizersBackend
    from lmzoo.tokenizers.formats import GPT2_EOT, gpt2_byte_bpe

    _no_options(files[0], options)
    vocab = files[0] if files[0].name != "merges.txt" else files[0].with_name("vocab.json")
    b = TokenizersBackend(gpt2_byte_bpe(vocab, vocab.with_name("merges.txt")), str(vocab))
    roles = {r: GPT2_EOT for r in ("bos", "eos", "unk")} if b.token_to_id(GPT2_EOT) is not None else {}
    return _finish(b, roles, config, [], [], None, None, vocab)


def _load_bert(files, config, flavor, options):
    from lmzoo.tokenizers.backends import TokenizersBackend
    from lmzoo.tokenizers.formats import bert_lowercases, bert_wordpiece, read_bert_vocab

    vocab = read_bert_vocab(files[0])
    lower = options.pop("lowercase", config.get("do_lower_case", bert_lowercases(vocab)))
    _no_options(files[0], options)
    b = TokenizersBackend(bert_wordpiece(vocab, lowercase=bool(lower)), str(files[0]))
    prefix, suffix = b.post_processor_template()
    roles = {r: f"[{r.upper()}]" for r in ("unk", "pad", "cls", "sep", "mask") if f"[{r.upper()}]" in vocab}
    return _finish(b, roles, config, prefix, suffix, None, None, files[0])


def _load_tiktoken(files, config, flavor, options):
    from lmzoo.tokenizers.tiktoken_backend import TiktokenBackend

    b = TiktokenBackend.from_file(files[0], flavor or config.get("lmzoo_flavor"), **options)
    roles = {**b.default_roles(), **_config_roles(config)}
    return _finish(b, roles, config, [], [], b.flavor.chat_template, b.flavor.name, files[0])


def _no_options(path, options):
    if options:
        raise ConfigError(f"{path}: options {sorted(options)} do not apply to this format")


FORMATS = {
    "tokenizer.json": Format(lambda d: _one(d, ["tokenizer.json"]),
                             lambda p: p.suffix == ".json" and p.name not in ("vocab.json",) and "config" not in p.name,
                             _load_tokenizer_json),
    "sentencepiece": Format(lambda d: _one(d, ["tokenizer.model", "ice_text.model", "spiece.model"], ".model"),
                            lambda p: p.suffix == ".model", _load_sentencepiece),
    "gpt2": Format(lambda d: (d / "vocab.json",) if (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
                   else None, lambda p: p.name in ("vocab.json", "merges.txt"), _load_gpt2),
    "bert": Format(lambda d: _one(d, ["vocab.txt"]), lambda p: p.suffix == ".txt" and p.name != "merges.txt",
                   _load_bert),
    "tiktoken": Format(lambda d: _one(d, suffix=".tiktoken"), lambda p: p.suffix == ".tiktoken", _load_tiktoken),
}


def find_tokenizer(directory) -> tuple[str, tuple] | None:
    """The first format whose files are in ``directory`` (None when there is none)."""
    directory = Path(directory)
    for name, fmt in FORMATS.items():
        files = fmt.find(directory)
        if files:
            return name, files
    return None


def load_tokenizer(path, flavor: str | None = None, **options) -> Tokenizer:
    """Load any supported tokenizer from a file or a directory.

    ``flavor`` overrides what lmzoo guesses for a ``.model`` (``sentencepiece``, ``chatglm-6b``,
    ``chatglm2``, ``chatglm3``) or ``.tiktoken`` file (``qwen``, ``cl100k_base``). ``options``
    go to the reader: ``image_tokens=0`` (ChatGLM-6B's later release), ``pattern=`` and
    ``special_tokens=`` (another tiktoken file), ``lowercase=`` (a BERT vocab.txt). A Hub id
    (``"org/name"``, not a local path) reads the tokenizer files of its snapshot (lmzoo/interop/hub.py).
    """
    from lmzoo.interop.hub import local

    path = local(path, kind="tokenizer")
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    if path.is_dir():
        found = find_tokenizer(path)
        if found is None:
            raise ConfigError(f"{path}: no tokenizer here; expected one of tokenizer.json, *.model (SentencePiece), "
                              "vocab.json + merges.txt (GPT-2), vocab.txt (BERT), *.tiktoken")
        name, files = found
        config = read_config(path)
    else:
        name = next((n for n, fmt in FORMATS.items() if fmt.accepts(path)), None)
        if name is None:
            raise ConfigError(f"{path}: unknown tokenizer file; expected tokenizer.json, *.model, vocab.json "
                              "(+ merges.txt), vocab.txt or *.tiktoken")
        files, config = (path,), read_config(path.parent)
    return FORMATS[name].load(files, config, flavor, dict(options))
