"""The files a checkpoint directory carries beside its weights and ``config.json``: the tokenizer (in
any format ``lmzoo.load_tokenizer`` reads), its special-token maps and chat template, and
``generation_config.json``.

``lmzoo.load`` remembers the directory a model came from (``model.source_directory``), and
``lmzoo.save`` copies these files from there, or writes the tokenizer it is given, so a directory
written by lmzoo takes text prompts whenever its source did.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from lmzoo.errors import CheckpointError, ConfigError

# transformers' names and every format lmzoo.tokenizers reads; tokenization_*.py is the remote code an
# `auto_map` in tokenizer_config.json points at (ChatGLM), additional_chat_templates/ holds named templates
PATTERNS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "chat_template.jinja", "chat_template.json", "additional_chat_templates", "generation_config.json",
            "vocab.json", "merges.txt", "vocab.txt", "*.model", "*.tiktoken", "tokenization_*.py")


def companion_files(directory: str | Path) -> list[Path]:
    """The tokenizer and generation files in ``directory`` (files, and the chat-template folder)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = {p for pattern in PATTERNS for p in d.glob(pattern)}
    return sorted(p for p in found if p.is_file() or (p.is_dir() and p.name == "additional_chat_templates"))


def copy_companions(source: str | Path, target: Path) -> list[str]:
    """Copy ``source``'s companion files into ``target``; their names. New files get the umask's modes."""
    names = []
    for p in companion_files(source):
        if p.is_dir():
            shutil.copytree(p, target / p.name, copy_function=shutil.copyfile, dirs_exist_ok=True)
        else:
            shutil.copyfile(p, target / p.name)
        names.append(p.name)
    return names


def tokenizer_writer(tokenizer) -> Callable[[Path], object] | None:
    """How to put ``tokenizer`` into a directory being written: a directory to copy the files of, an
    ``lmzoo.Tokenizer`` (its ``save``) or a transformers tokenizer (its ``save_pretrained``)."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, Path)):
        if not companion_files(tokenizer):
            raise CheckpointError(f"{tokenizer}: no tokenizer or generation files to copy "
                                  f"(looked for {', '.join(PATTERNS)})")
        return lambda target: copy_companions(tokenizer, target)
    if hasattr(tokenizer, "save_pretrained"):  # transformers: tokenizer.json, tokenizer_config.json, template
        return lambda target: tokenizer.save_pretrained(str(target))
    if hasattr(tokenizer, "save") and hasattr(tokenizer, "backend"):  # lmzoo.Tokenizer
        return lambda target: tokenizer.save(target)
    raise ConfigError(f"tokenizer= takes a directory, an lmzoo.Tokenizer or a transformers tokenizer; "
                      f"got {type(tokenizer).__name__}")
