"""``lmzoo.load`` / ``lmzoo.save`` / ``lmzoo.build``: Hugging Face-layout directories and presets.

load: config.json -> family (registry) -> config -> model built on the meta device -> tensors
converted by the family's key map, checked against the model's shapes, and assigned (no second
copy, no random init of weights that are about to be overwritten). The model remembers its
directory (``model.source_directory``) so that ``save`` carries the tokenizer along (companions.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.interop.companions import companion_files, tokenizer_writer
from lmzoo.interop.convert import KeyMap
from lmzoo.interop.safetensors_io import LazyState, write_directory
from lmzoo.models.registry import Family, family_for_hf, get_family, get_preset
from lmzoo.models.reward import RewardModel, is_reward_checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def as_dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if str(d).replace("torch.", "") not in DTYPES:
        raise ConfigError(f"unknown dtype '{d}'; known: {sorted(DTYPES)}")
    return DTYPES[str(d).replace("torch.", "")]


def read_hf_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a Hugging Face-layout checkpoint)")
    if not path.exists():
        raise CheckpointError(f"{path}: missing; a checkpoint directory needs a config.json")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return hf


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameters a model holds under two names (a head tied to the embedding): alias -> first name.

    Only the first name is read from a checkpoint; the alias is pointed at it after loading.
    """
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _family_of(model: nn.Module) -> Family:
    return get_family(type(model.config).family)


def build(config_or_preset, *, device=None, dtype=None) -> nn.Module:
    """A model from a config object or a preset name (``device='meta'`` allocates nothing)."""
    if isinstance(config_or_preset, str):
        fam, cfg = get_preset(config_or_preset)
    else:
        cfg = config_or_preset
        fam = get_family(type(cfg).family)
    with torch.device(device or "cpu"):
        model = fam.build(cfg)
    if dtype is not None:
        model = model.to(as_dtype(dtype))
    return model


def _empty_model(fam: Family, cfg) -> nn.Module:
    """Parameters on meta (no memory, no init), computed buffers on the CPU."""
    with torch.device("meta"):
        model = fam.build(cfg)
    if not any(buf.is_meta for buf in model.buffers()):
        return model  # nothing computed to fill (ViT, CLIP have no buffers)
    with torch.device("cpu"):
        reference = {n: b for n, b in _buffers_only(fam, cfg)}
    for name, buf in model.named_buffers():
        if buf.is_meta:
            mod_name, _, attr = name.rpartition(".")
            model.get_submodule(mod_name).register_buffer(attr, reference[name], persistent=False)
    return model


def _buffers_only(fam: Family, cfg):
    # A 1-layer copy of the model on the CPU gives the computed buffers their real values cheaply.
    small = fam.build(cfg.replace(n_layers=1, vocab_size=1))
    return small.named_buffers()


def load(path: str | Path, *, revision: str | None = None, dtype=None, device=None,
         attn_kernel: str | None = None) -> nn.Module:
    """Load a Hugging Face-layout directory (config.json + safetensors, single or sharded), a llama
    ``.gguf`` file (lmzoo/interop/gguf.py; its tokenizer comes with ``read_gguf``), or a Hub id
    (``"org/name"``, not a local path: the snapshot of the local Hub cache, else downloaded;
    lmzoo/interop/hub.py) at ``revision`` (a branch, tag or commit; default main)."""
    from lmzoo.interop.hub import local

    directory = local(path, revision=revision)
    if directory.suffix == ".gguf" and directory.is_file():
        from lmzoo.interop.gguf import read_gguf

        model, _ = read_gguf(directory, dtype=as_dtype(dtype) if dtype is not None else torch.float32,
                             attn_kernel=attn_kernel)
        return model.to(device or "cpu")
    hf = read_hf_config(directory)
    fam = family_for_hf(hf, str(directory / "config.json"))
    cfg = fam.config_cls.from_hf(hf, source=str(directory / "config.json"))
    if attn_kernel:
        cfg.attn_kernel = attn_kernel
    state = LazyState(directory)
    if fam.resolve is not None:
        cfg = fam.resolve(cfg, set(state.keys()))
    model = _empty_model(fam, cfg)
    keymap, source, quantized = fam.keymap(cfg, hf), state, {}
    if is_reward_checkpoint(hf):  # <Arch>ForSequenceClassification: a reward model (lmzoo/models/reward.py)
        model, keymap = RewardModel.for_checkpoint(model, keymap, hf, str(directory / "config.json"))
    if hf.get("quantization_config"):  # packed linears swapped in and filled; lmzoo/quant/serialize.py
        from lmzoo.quant.serialize import prepare_quantized_load

        keymap, source, quantized = prepare_quantized_load(model, keymap, state, hf, str(directory))
    tied = tied_aliases(model)
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied and k not in quantized}
    converted = keymap.to_lmzoo(source, expected, source=str(directory),
                                where=lambda k: str(state.file_of(k)) if k in state else str(directory))
    target = as_dtype(dtype) if dtype is not None else as_dtype(cfg.dtype)
    converted = {k: v.to(target) for k, v in converted.items()}
    converted.update(quantized)  # integer codes and their scales keep their stored dtypes
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    if unexpected or set(missing) - set(tied):
        raise CheckpointError(f"{directory}: the key map left {sorted(set(missing) - set(tied))[:5]} unfilled "
                              f"and produced unknown {unexpected[:5]}")
    for alias, name in tied.items():  # assign=True replaced the source; point the alias at it again
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(name))
    cfg.dtype = str(target).replace("torch.", "")
    model = model.to(device or "cpu")
    model.source_directory = str(directory)  # where save() finds the tokenizer to carry along
    return model.eval()


def _keymap(model: nn.Module) -> KeyMap:
    """The family's key map; a model around a family's model (a RewardModel) adapts it (``hf_keymap``)."""
    keymap = _family_of(model).keymap(model.config)
    return model.hf_keymap(keymap) if hasattr(model, "hf_keymap") else keymap


def state_for_hf(model: nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if getattr(model, "quantization_config", None):  # packed linears: lmzoo/quant/serialize.py
        from lmzoo.quant.serialize import quantized_state_for_hf

        return quantized_state_for_hf(model, _keymap(model), state)
    return _keymap(model).to_hf(state)


def save(model: nn.Module, path: str | Path, *, max_shard_size: int | str = "5GB", tokenizer=None) -> Path:
    """Write ``model`` as a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads
    (a ``RewardModel``: ``AutoModelForSequenceClassification``).

    ``tokenizer``: a directory whose tokenizer files (and chat template, generation_config.json) are
    copied, an ``lmzoo.Tokenizer`` or a transformers tokenizer; by default those of the directory
    the model was loaded from, if any; ``False`` writes none."""
    if getattr(model, "decode_fused", False):
        raise CheckpointError("this model's weights were laid out for decoding (lmzoo.generate.fastpath."
                              "fuse_for_decode: fused and transposed projections); save the model before fusing")
    if tokenizer is None:  # the directory the model was loaded from, when it (still) holds a tokenizer
        src = getattr(model, "source_directory", None)
        tokenizer = src if src is not None and companion_files(src) else False
    write_tokenizer = tokenizer_writer(tokenizer) if tokenizer is not False else None
    fam = _family_of(model)
    cfg = model.config
    tensors = state_for_hf(model)
    dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    hf = cfg.to_hf()
    if hasattr(model, "hf_config"):  # a RewardModel: <Arch>ForSequenceClassification, num_labels 1
        hf = model.hf_config(hf)
    hf["dtype"] = str(dtype).replace("torch.", "")
    if getattr(model, "quantization_config", None):
        hf["quantization_config"] = model.quantization_config
    hf.setdefault("architectures", [fam.hf_architecture])
    return write_directory(path, tensors, {"config.json": json.dumps(hf, indent=2, sort_keys=True) + "\n"},
                           max_shard_bytes=parse_size(max_shard_size), fill=write_tokenizer)


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("GIB", 2**30), ("MIB", 2**20)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)
