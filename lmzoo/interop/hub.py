"""Hub ids as model names: ``lmzoo.load("org/name")``, ``--model org/name``, ``lmzoo download org/name``.

huggingface_hub (the library made for this) maps a Hub id and a revision to a snapshot folder of its
cache, ``$HF_HUB_CACHE/models--org--name/snapshots/<commit>/`` (``refs/<branch>`` holds a branch's
commit). It reads the cache when the id is there (and only there with ``HF_HUB_OFFLINE=1``, as
transformers does), downloads otherwise with progress bars on stderr, and finds the token in
``HF_TOKEN`` or the stored ``hf auth login``.

lmzoo asks only for the files it reads (``FILES``): config.json, the safetensors weights and their
index, the tokenizer and generation files ``lmzoo.save`` carries along (companions.py), PEFT adapter
files. Never a pickled ``*.bin`` (lmzoo never unpickles) and never remote code (``*.py``). Every
failure is one ``CheckpointError`` line: not cached while offline, the network's error, no such
repository or revision.
"""

from __future__ import annotations

from pathlib import Path

from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.interop.companions import PATTERNS as COMPANIONS

# the tokenizer and generation files, without the tokenization_*.py an auto_map names (ChatGLM's remote code)
# and the additional_chat_templates/ folder (copied along by lmzoo.save, never read)
TOKENIZER = tuple(p for p in COMPANIONS if not p.endswith(".py") and p != "additional_chat_templates")
WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
ADAPTER = ("adapter_config.json", "adapter_model.safetensors")
FILES = {"model": ("config.json", *WEIGHTS, *TOKENIZER), "config": ("config.json",), "tokenizer": TOKENIZER,
         "adapter": ADAPTER, "all": ("config.json", *WEIGHTS, *TOKENIZER, *ADAPTER)}
# files lmzoo would not read: a subfolder's (lmzoo reads a checkpoint's top level; Llama 3's original/ is for
# Meta's code) and Mistral's consolidated.safetensors, a second copy of the transformers shards beside them
SKIP = ("*/*", "consolidated*.safetensors")
# the file a snapshot of each kind cannot do without (a partly cached snapshot that has it is used)
ESSENTIAL = {"model": "config.json", "config": "config.json", "adapter": ADAPTER[0]}


def is_repo_id(name) -> bool:
    """``org/name`` or ``name`` as the Hub spells them (huggingface_hub's own validator)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(name, str):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def repo_folder(repo_id: str) -> Path:
    """``models--org--name`` in the cache: a Hub id's refs/, snapshots/ and blobs/."""
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")


def repo_id_of(path) -> str | None:
    """The Hub id whose cached snapshot ``path`` is (``models--org--name/snapshots/<commit>``), else None."""
    p = Path(path)
    repo = p.parent.parent.name
    if p.parent.name == "snapshots" and repo.startswith("models--"):
        return repo[len("models--"):].replace("--", "/")  # a Hub id never holds "--"
    return None


def resolve(repo_id: str, *, revision: str | None = None, kind: str = "model", include=(),
            who: str | None = None) -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision`` (default: main) with the files ``kind``
    reads (``FILES``), from the cache or downloaded; ``include``: glob patterns of more files (any folder).

    ``who`` names the id in error messages (default ``'org/name'``); each message goes on "<who> is not
    in the local Hub cache ...", "<who> has no revision ...".
    """
    import huggingface_hub
    from huggingface_hub import errors

    import lmzoo

    who = who or f"'{repo_id}'"
    if kind not in FILES:
        raise ConfigError(f"unknown kind {kind!r}; known: {sorted(FILES)}")
    if not is_repo_id(repo_id):
        raise CheckpointError(f"{who} is not a Hub id (org/name or name: letters, digits, '-', '_', '.')")
    rev = revision or "main"
    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # huggingface_hub 2: cached, but partly
    try:
        for allow, skip in [(FILES[kind], SKIP)] + ([(include, ())] if include else []):
            path = huggingface_hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=list(allow), ignore_patterns=list(skip),
                local_files_only=offline(), library_name="lmzoo", library_version=lmzoo.__version__)
    except incomplete as e:
        # e.g. transformers cached fewer files (tokenizer.json, not also vocab.json): use what is there
        path, need = getattr(e, "snapshot_path", ""), ESSENTIAL.get(kind)
        if not path or (need is not None and not (Path(path) / need).is_file()):
            raise CheckpointError(f"{who} is only partly in the local Hub cache: {_line(e)}") from e
    except errors.LocalEntryNotFoundError as e:  # not cached, and offline or the Hub out of reach
        raise CheckpointError(_not_cached(repo_id, rev, who, e)) from e
    except errors.GatedRepoError as e:
        raise CheckpointError(f"{who} is a gated repository: accept its terms on its Hub page, then log in "
                              "(hf auth login, or HF_TOKEN)") from e
    except errors.RepositoryNotFoundError as e:
        raise CheckpointError(f"{who} is not a repository on the Hub, or a private one (log in with hf auth login, "
                              "or set HF_TOKEN)") from e
    except errors.RevisionNotFoundError as e:
        raise CheckpointError(f"{who} has no revision '{rev}' on the Hub (a branch, tag or commit)") from e
    except Exception as e:  # another HTTP error, a proxy's, a token file named but missing, a full disk
        raise CheckpointError(f"{who} could not be fetched from the Hub ({type(e).__name__}: {_line(e)})") from e
    path = Path(path)
    if kind == "model" and not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{who} has no safetensors weights at revision '{rev}' ({path}): lmzoo never reads "
                              "pickled *.bin files; a repository's 'convert to safetensors' pull request often has "
                              "them (--revision refs/pr/N)")
    return path


def local(name, *, revision: str | None = None, kind: str = "model") -> Path:
    """``name`` itself when it exists on disk or cannot be a Hub id; else the Hub id's snapshot (``resolve``).
    What ``lmzoo.load``, ``lmzoo.load_tokenizer`` and ``lmzoo.peft.load_adapter`` are given."""
    path = Path(name)
    if isinstance(name, str) and not path.exists() and is_repo_id(name):
        return resolve(name, revision=revision, kind=kind, who=f"'{name}' is not a local path, and as a Hub id it")
    if revision is not None:
        raise ConfigError(f"revision={revision!r} applies to a Hub id; '{name}' is a local path")
    return path


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _not_cached(repo_id: str, rev: str, who: str, e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    why = ("HF_HUB_OFFLINE is set" if offline() else
           f"the Hub could not be reached ({type(cause).__name__}: {_line(cause)})" if cause is not None else
           f"the Hub could not be reached ({_line(e)})")
    folder = repo_folder(repo_id)
    if not folder.is_dir():
        return f"{who} is not in the local Hub cache ({cache_dir()}) and {why}"
    refs = sorted(str(p.relative_to(folder / "refs")) for p in (folder / "refs").rglob("*") if p.is_file())
    commits = sorted(p.name[:12] for p in (folder / "snapshots").glob("*") if p.is_dir())
    held = ", ".join(refs + [f"commit {c}" for c in commits]) or "nothing"
    return f"{who} is in the local Hub cache ({folder}), but not at revision '{rev}' (cached: {held}), and {why}"
