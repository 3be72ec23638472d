"""Helpers shared by the subcommands: resolving ``--model`` (a checkpoint directory, a preset name or a
Hugging Face Hub id), refusing models that cannot do what the command asks, and refusing models that do
not fit in memory."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import lmzoo
from lmzoo.errors import LmzooError
from lmzoo.models.registry import Family, family_for_hf, presets

# Family.shape values whose models predict the next token (and so generate and keep a KV cache)
DECODER_SHAPES = ("causal decoder", "prefix decoder", "encoder-decoder")


def add_model_argument(p, required: bool = True, shapes: tuple[str, ...] | None = None) -> None:
    """``--model`` and ``--revision``; the help lists the presets whose ``Family.shape`` is in ``shapes``
    (None: every preset), so a command that refuses encoders (``DECODER_SHAPES``) does not offer them."""
    names = sorted(n for n, (fam, _) in presets().items() if shapes is None or fam.shape in shapes)
    p.add_argument("--model", required=required,
                   help="a checkpoint directory (Hugging Face layout) or a preset name "
                        f"({', '.join(names)}) or a Hub id (org/name), in that order; a preset gets random weights")
    add_revision_argument(p)
    add_memory_argument(p)
    takes_model(p, "model", allow_presets=True)


def add_memory_argument(p) -> None:
    p.add_argument("--skip-memory-check", action="store_true",
                   help="build the model even when its estimated size exceeds the memory available")


# -- names: a directory, a preset or a Hub id ----------------------------------------------------
def add_revision_argument(p) -> None:
    p.add_argument("--revision", help="with a Hub id as --model: its branch, tag or commit (default: main)")


def takes_model(p, dest: str, *, allow_presets: bool = False, kind: str = "model", strict: bool = True) -> None:
    """Mark the argument ``dest`` of the command parser ``p`` as a model's name: before the command runs,
    ``main`` puts the local snapshot of a Hub id given there in its place (``resolve_names``). ``allow_presets``:
    the command builds presets too (they come before Hub ids); ``kind``: the files it reads
    (``lmzoo.interop.hub.FILES``); ``strict=False``: a name that is no org/name Hub id is left to the command
    (``--reward task:add``)."""
    marked = dict(p.get_default("model_names") or {})
    marked[dest] = (allow_presets, kind, strict)
    p.set_defaults(model_names=marked)


def resolve_names(args) -> None:
    """Every argument ``takes_model`` marked, resolved in place; ``--revision`` goes with ``--model``."""
    marked = getattr(args, "model_names", None) or {}
    revision = getattr(args, "revision", None)
    if "model" in marked and revision is not None and args.model is None:
        raise LmzooError(f"--revision {revision} goes with a Hub id as --model")
    for dest, (allow_presets, kind, strict) in marked.items():
        value, flag = getattr(args, dest, None), "--" + dest.replace("_", "-")
        how = dict(allow_presets=allow_presets, kind=kind, strict=strict)
        if isinstance(value, list):  # --compare DIR DIR ...
            setattr(args, dest, [resolve_name(v, flag, **how) for v in value])
        elif value is not None:
            setattr(args, dest, resolve_name(value, flag, revision=revision if dest == "model" else None, **how))


def resolve_name(spec: str, flag: str = "--model", *, revision: str | None = None, allow_presets: bool = True,
                 kind: str = "model", strict: bool = True) -> str:
    """``spec`` when it is a local path or a preset, in that order; else the local snapshot of the Hub id
    ``spec`` (lmzoo/interop/hub.py), with a note on stderr saying which was used."""
    from lmzoo.interop import hub

    what = "a local directory" if Path(spec).is_dir() else "a local file" if Path(spec).exists() else \
        "a preset" if allow_presets and spec in presets() else None
    if what is not None:
        if revision is not None:
            raise LmzooError(f"--revision {revision} applies to a Hub id, and {flag} '{spec}' is {what}")
        if what != "a preset" and "/" in spec and hub.is_repo_id(spec):  # spelled like org/name: say which
            print(f"note: '{spec}' is {what}, read instead of the Hub id of that name", file=sys.stderr)
        return spec
    neither = "neither a directory nor a preset" if allow_presets else "not a directory"
    if not hub.is_repo_id(spec) or (not strict and "/" not in spec):
        if not strict:  # a bare word is the command's to judge (--reward nonsense: not a reward spec either)
            return spec
        listed = f"; presets: {sorted(presets())}" if allow_presets else ""
        raise LmzooError(f"{flag} '{spec}' is {neither}, nor a Hub id (org/name){listed}")
    path = hub.resolve(spec, revision=revision, kind=kind, who=f"{flag} '{spec}' is {neither}, and as a Hub id it")
    print(f"note: '{spec}' is a Hub id: {path} (revision {revision or 'main'})", file=sys.stderr)
    return str(path)


def family_of(spec: str) -> Family:
    """The family of a preset or a checkpoint directory, read without building anything."""
    from lmzoo.interop.checkpoint import read_hf_config

    if Path(spec).is_dir():
        return family_for_hf(read_hf_config(spec), str(Path(spec) / "config.json"))
    if spec in presets():
        return presets()[spec][0]
    raise LmzooError(f"--model '{spec}' is neither a directory nor a preset; presets: {sorted(presets())}")


def require_decoder(spec: str, what: str) -> Family:
    """``spec``'s family, or an error when it is an encoder (BERT, ViT) or a dual encoder (CLIP)."""
    fam = family_of(spec)
    if fam.shape not in DECODER_SHAPES:
        raise LmzooError(f"'{spec}' is a {fam.name} {fam.shape}, not a decoder: it has no next-token head and keeps no KV cache, so "
                         f"{what} does not apply (decoders: {', '.join(DECODER_SHAPES)})")
    return fam


# -- memory ------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes the machine can give a new allocation without swapping (None where it cannot be read)."""
    try:
        import psutil  # optional: used when installed, never required

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    return None


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check_memory(needed: int, what: str, skip: bool = False) -> None:
    """Refuse (before any weight is allocated) a model whose estimated bytes exceed the available memory."""
    avail = available_memory()
    if skip or avail is None or needed <= avail:
        return
    raise LmzooError(f"{what} needs about {gb(needed)}, and this machine has {gb(avail)} of memory available; "
                     "choose a smaller model (or --dtype bfloat16 for a checkpoint), or pass --skip-memory-check "
                     "to try anyway")


def estimate_bytes(spec: str, dtype: str | None = None) -> tuple[int, str]:
    """(bytes at the peak of materialising ``spec``, how they were counted), from a meta-device build."""
    from lmzoo.interop.checkpoint import as_dtype, build, read_hf_config

    if Path(spec).is_dir():
        stored = sum(p.stat().st_size for p in Path(spec).glob("*.safetensors"))
        hf = read_hf_config(spec)
        own = hf.get("dtype") or hf.get("torch_dtype")
        if dtype is None or own is None or as_dtype(dtype) == as_dtype(own):
            return stored, f"its safetensors files, {gb(stored)}"
        # a cast keeps the tensors read until every converted one exists
        fam = family_of(spec)
        params = build(fam.config_cls.from_hf(hf, source=str(Path(spec) / "config.json")),
                       device="meta").num_parameters()
        cast = params * as_dtype(dtype).itemsize
        return stored + cast, f"{gb(stored)} read + {gb(cast)} cast to {as_dtype(dtype)}".replace("torch.", "")
    params = build(spec, device="meta").num_parameters()
    # lmzoo.build initialises in float32 and casts afterwards, so the peak is the float32 model
    return params * 4, f"{params / 1e9:.2f}B parameters × 4 bytes: random weights start in float32"


def resolve_model(spec: str, dtype: str | None = None, seed: int = 0, device: str = "cpu",
                  skip_memory_check: bool = False):
    """The model a preset name or a checkpoint directory describes, once its estimated size fits in memory."""
    if not Path(spec).is_dir() and spec not in presets():
        raise LmzooError(f"--model '{spec}' is neither a directory nor a preset; presets: {sorted(presets())}")
    if device == "cpu":
        needed, how = estimate_bytes(spec, dtype)
        check_memory(needed, f"--model {spec} ({how})", skip_memory_check)
    if Path(spec).is_dir():
        return lmzoo.load(spec, dtype=dtype, device=device)
    print(f"note: '{spec}' is a preset: its weights are random (seed {seed})", file=sys.stderr)
    torch.manual_seed(seed)
    return lmzoo.build(spec, device=device, dtype=dtype).eval()


# -- the training stages' commands (reward, dpo, grpo, ppo) ------------------------------------------


def add_run_flags(p) -> None:
    """The flags every training stage takes after its own (its OVERRIDES map precision, device and parallel
    to train.*): precision, device, parallel, resume, --set, progress."""
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device")
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp"], help="under torchrun (train.parallel)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--resume-or-start", action="store_true", help="like --resume, but start when there is none")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any other config value (read as YAML)")
    p.add_argument("--no-progress", action="store_true")


def report(stage: str, res, keys: tuple[str, ...]) -> None:
    """One line of before -> after numbers (rank 0 only: the others have no final_dir), then final/'s path."""
    if res.final_dir is None:
        return
    parts = [f"trained {res.train.step} steps"]
    for key in keys:
        if key in res.after:
            before = f"{res.before[key]:.3f} -> " if key in res.before else ""
            parts.append(f"{key} {before}{res.after[key]:.3f}")
    print(f"lmzoo {stage}: " + "; ".join(parts) + f"; final model in {res.final_dir}", file=sys.stderr)
    print(res.final_dir)


def run_stage(stage: str, call, keys: tuple[str, ...]) -> int:
    """``call()`` a stage's run function; Ctrl-C (``TrainingInterrupted``) is exit 130 with how to resume."""
    from lmzoo.train import TrainingInterrupted

    try:
        res = call()
    except TrainingInterrupted as e:
        print(f"lmzoo {stage}: interrupted at step {e.step}; continue with --resume (checkpoint {e.checkpoint})",
              file=sys.stderr)
        return 130
    report(stage, res, keys)
    return 0
