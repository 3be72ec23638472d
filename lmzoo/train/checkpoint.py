"""Training checkpoints: everything needed to continue a run as if it had never stopped.

One directory per step, ``<out>/checkpoints/step_00000100/``, sealed atomically (``atomic.py``):

  model.safetensors        weights, the model's own key names (a tied head is stored once)
  optimizer.safetensors    AdamW moments and step counts, keyed "<param index>.<name>"
  optimizer.json           the optimizer's param groups (lr, betas, weight decay ...)
  dcp/                     FSDP only, instead of the three above: the sharded model and optimizer
                           written by torch.distributed.checkpoint (each rank writes its shard)
  rank_00000.safetensors   this rank's torch (and CUDA) RNG states
  rank_00000.json          this rank's numpy and python RNG states and its exact data position
  trainer.json             step, counters, scheduler and loss-scaler state, the TrainConfig
  manifest.json            size and SHA-256 of every file above; written last

Nothing is pickled: tensors go to safetensors, everything else to JSON. ``latest_valid`` picks the
newest directory whose manifest checks out and warns about every newer one it skips.
"""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmzoo.errors import CheckpointError
from lmzoo.train import atomic
from lmzoo.train.distributed import DistEnv, barrier, is_fsdp, unwrap

FORMAT = "lmzoo-train-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every directory named like a checkpoint, newest first (not yet verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def latest_valid(root: Path) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is skipped with a warning."""
    for _, path in list_checkpoints(root):
        try:
            manifest = atomic.verify(path)
            if manifest.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not an lmzoo training checkpoint (format {manifest.get('format')!r})")
            return path
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {path.name}: {e}", RuntimeWarning, stacklevel=2)
    return None


def prune(root: Path, keep: int) -> None:
    for _, path in list_checkpoints(root)[keep:]:
        atomic.remove(path)


# -- pieces ---------------------------------------------------------------------------------------


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    seen, aliases = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        (aliases.add(name) if id(p) in seen else seen.add(id(p)))
    return aliases


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    drop = _tied_aliases(model)
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in drop}


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    aliases = _tied_aliases(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in aliases}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{source}: '{k}' has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(expected[k].shape)}")
    with torch.no_grad():
        for k, v in tensors.items():
            expected[k].copy_(v)


def optimizer_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{name}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, d in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_files(device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": [py[0], list(py[1]), py[2]]}


def set_rng(tensors: dict[str, torch.Tensor], meta: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = meta["python"]
    random.setstate((version, tuple(state), gauss_next))


def _save_tensors(tensors: dict, path: Path) -> None:
    save_file(tensors, str(path))
    atomic.fsync_file(path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e


def tied_free(state: dict, model: torch.nn.Module) -> dict:
    drop = _tied_aliases(model)
    return {k: v for k, v in state.items() if k not in drop}


# -- whole checkpoints ----------------------------------------------------------------------------


def save(root: Path, step: int, *, model, optimizer, scheduler, precision, data_state: dict,
         trainer_state: dict, env: DistEnv, keep_last: int) -> Path:
    """Write checkpoint ``step`` (every rank calls this); returns its directory once it is sealed."""
    root = Path(root)
    final, tmp = root / step_name(step), root / f".tmp-{step_name(step)}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        atomic.remove(tmp)
        tmp.mkdir()
    barrier()
    r = f"rank_{env.rank:05d}"
    rng_t, rng_meta = rng_files(env.device)
    _save_tensors(rng_t, tmp / f"{r}.safetensors")
    try:
        atomic.write_json(tmp / f"{r}.json", {**rng_meta, "data": data_state})
    except TypeError as e:
        raise CheckpointError(f"the data iterator's state_dict() must hold JSON types only ({e})") from e
    if is_fsdp(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": tied_free(msd, model), "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    elif env.is_main:
        _save_tensors(model_tensors(unwrap(model)), tmp / "model.safetensors")
        opt_t, opt_meta = optimizer_files(optimizer)
        _save_tensors(opt_t, tmp / "optimizer.safetensors")
        atomic.write_json(tmp / "optimizer.json", opt_meta)
    barrier()
    if env.is_main:
        atomic.write_json(tmp / "trainer.json", {**trainer_state, "scheduler": scheduler.state_dict(),
                                                 "scaler": precision.state_dict()})
        atomic.seal(tmp, final, {"format": FORMAT, "version": VERSION, "step": step, "world_size": env.world_size,
                                 "parallel": env.parallel})
        prune(root, keep_last)
    barrier()
    return final


def load(directory: Path, *, model, optimizer, scheduler, precision, env: DistEnv) -> tuple[dict, dict]:
    """Restore everything from a verified checkpoint; returns (trainer state, this rank's data state)."""
    directory = Path(directory)
    manifest = atomic.read_json(directory / atomic.MANIFEST)
    if manifest.get("world_size") != env.world_size or manifest.get("parallel") != env.parallel:
        raise CheckpointError(f"{directory}: written by {manifest.get('world_size')} process(es) with parallel "
                              f"'{manifest.get('parallel')}', resumed with {env.world_size} and '{env.parallel}'; "
                              "resume with the same launch (or read the weights alone with load_model_weights)")
    if is_fsdp(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        state = {"model": tied_free(msd, model), "optim": osd}
        dcp.load(state, checkpoint_id=str(directory / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        load_model_tensors(unwrap(model), _load_tensors(directory / "model.safetensors"), str(directory))
        opt = optimizer_state(_load_tensors(directory / "optimizer.safetensors"),
                              atomic.read_json(directory / "optimizer.json"))
        optimizer.load_state_dict(opt)
    trainer = atomic.read_json(directory / "trainer.json")
    scheduler.load_state_dict(trainer.pop("scheduler"))
    precision.load_state_dict(trainer.pop("scaler"))
    r = f"rank_{env.rank:05d}"
    meta = atomic.read_json(directory / f"{r}.json")
    set_rng(_load_tensors(directory / f"{r}.safetensors"), meta, env.device)
    return trainer, meta["data"]


def load_model_weights(directory: Path, model: torch.nn.Module) -> torch.nn.Module:
    """Only the weights, into a plain (unwrapped, single-process) model; either layout, resharded."""
    directory = Path(directory)
    atomic.verify(directory)
    if (directory / "dcp").is_dir():
        import torch.distributed.checkpoint as dcp

        state = {"model": tied_free(model.state_dict(), model)}
        with warnings.catch_warnings():  # "no process group, loading in a single process": that is the point
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(directory / "dcp"))
        load_model_tensors(model, state["model"], str(directory / "dcp"))
    else:
        load_model_tensors(model, _load_tensors(directory / "model.safetensors"), str(directory))
    return model
