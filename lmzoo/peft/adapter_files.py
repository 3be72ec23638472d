"""LoRA adapters in PEFT's on-disk layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

The tensors are named as PEFT names them on the Hugging Face model of the family,
``base_model.model.<HF module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), one pair per
HF linear (``layout.Unit``): a fused HF linear gets its parts' shared A and their Bs placed in its
rows (parts without an adapter contribute zero rows). So ``peft.PeftModel.from_pretrained(hf_model,
directory)`` runs an adapter lmzoo trained, and ``load_adapter`` reads one PEFT wrote.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from lmzoo.errors import CheckpointError, ConfigError, LmzooError
from lmzoo.peft.apply import install
from lmzoo.peft.layout import model_keymap, peft_target_modules, units
from lmzoo.peft.lora import LoraSettings, adapters

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the transformers model)
TASK_TYPES = {"causal decoder": "CAUSAL_LM", "prefix decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM"}
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight")
# PEFT features an lmzoo adapter does not have: field -> the value that means "not used"
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
                "layer_replication": None, "use_qalora": False, "trainable_token_indices": None,
                "target_parameters": None, "layers_to_transform": None}


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model``'s adapters as PEFT does (the base weights are not written)."""
    found = adapters(model)
    if not found:
        raise LmzooError("save_adapter: the model has no LoRA adapters")
    first = next(iter(found.values())).lora
    for name, m in found.items():
        if (m.lora.r, m.lora.alpha, m.lora.rslora) != (first.r, first.alpha, first.rslora):
            raise LmzooError(f"save_adapter: '{name}' has r={m.lora.r}, alpha={m.lora.alpha}, rslora={m.lora.rslora}, "
                             f"unlike the others (r={first.r}, alpha={first.alpha}): PEFT's config holds one of each")
    all_units = units(model)
    tensors, chosen = {}, []
    for unit in all_units:
        parts = [p for p in unit.parts if p.name in found]
        if not parts:
            continue
        if unit.hf_name is None:
            raise LmzooError(f"save_adapter: '{parts[0].name}' maps to no single Hugging Face linear in this family's "
                             "key map, so PEFT's layout cannot name its adapter")
        A = found[parts[0].name].lora.lora_A
        if any(found[p.name].lora.lora_A is not A for p in parts):
            raise LmzooError(f"save_adapter: the parts of '{unit.hf_name}' ({[p.name for p in parts]}) have separate "
                             "lora_A matrices; PEFT's adapter on that fused linear has one")
        B = found[parts[0].name].lora.lora_B
        fused = torch.zeros(unit.out_features, B.shape[1], dtype=B.dtype)  # (out_hf, r)
        for p in parts:
            fused[p.rows] = found[p.name].lora.lora_B.detach().cpu()
        tensors[PREFIX + unit.hf_name + ".lora_A.weight"] = A.detach().cpu().contiguous()
        tensors[PREFIX + unit.hf_name + ".lora_B.weight"] = fused
        chosen.append(unit)
    settings = getattr(model, "lora_config", None)
    dropout = settings.dropout if settings is not None else getattr(first.dropout, "p", 0.0)
    config = peft_config(model, first.r, first.alpha, dropout, first.rslora, peft_target_modules(all_units, chosen),
                         fan_in_fan_out=all(u.fan_in_fan_out for u in chosen))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    # weights first, config last, each file replaced whole: a directory with a config holds its weights
    tmp = out / f".{WEIGHTS}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS)
    tmp = out / f".{CONFIG}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / CONFIG)
    return out


def peft_config(model: nn.Module, r: int, alpha: float, dropout: float, rslora: bool, target_modules: list[str],
                fan_in_fan_out: bool) -> dict:
    """adapter_config.json as PEFT's LoraConfig writes it (the fields every PEFT version reads)."""
    from lmzoo.models.registry import family_of

    return {"peft_type": "LORA", "task_type": TASK_TYPES.get(family_of(model.config).shape),
            "base_model_name_or_path": getattr(model, "source_directory", None), "revision": None,
            "inference_mode": True, "auto_mapping": None, "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
            "target_modules": target_modules, "fan_in_fan_out": fan_in_fan_out, "bias": "none",
            "use_rslora": rslora, "use_dora": False, "lora_bias": False, "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}}


def read_config(directory: Path) -> dict:
    path = directory / CONFIG
    if not path.exists():
        raise CheckpointError(f"{path}: missing; a PEFT adapter directory holds {CONFIG} and {WEIGHTS}")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{path}: peft_type is {cfg.get('peft_type')!r}; lmzoo reads LoRA adapters ('LORA')")
    for name, unused in _UNSUPPORTED.items():
        if cfg.get(name, unused) not in (unused, None, False, {}, []):
            raise ConfigError(f"{path}: {name} = {cfg[name]!r}; lmzoo's LoRA has no such feature (expected {unused!r})")
    if cfg.get("bias", "none") != "none":
        raise ConfigError(f"{path}: bias = {cfg['bias']!r}; lmzoo trains no biases (expected 'none')")
    for name in ("r", "lora_alpha"):
        if name not in cfg:
            raise ConfigError(f"{path}: missing '{name}'")
    return cfg


def load_adapter(model: nn.Module, directory: str | Path, *, trainable: bool = True, dtype=None) -> nn.Module:
    """Put the adapter PEFT (or ``save_adapter``) wrote in ``directory`` on ``model``, in place; the base
    is frozen, the adapters train unless ``trainable=False``. A model quantized first (``lmzoo.quantize``
    to NF4) takes the adapter as well: QLoRA inference. ``directory`` may be a Hub id (lmzoo/interop/hub.py)."""
    from lmzoo.interop.hub import local

    directory = local(directory, kind="adapter")
    cfg = read_config(directory)
    if adapters(model):
        raise LmzooError("load_adapter: the model already has LoRA adapters; unload_lora(model) first")
    weights = directory / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{weights}: missing")
    from safetensors.torch import load_file

    state = load_file(str(weights))
    by_name = {u.hf_name: u for u in units(model) if u.hf_name}
    prefix = model_keymap(model).optional_prefix
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise CheckpointError(f"{weights}: unexpected key '{key}'; a LoRA adapter holds only "
                                  f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight'")
        module = m["module"] if m["module"] in by_name or prefix + m["module"] not in by_name else prefix + m["module"]
        if module not in by_name:
            raise CheckpointError(f"{weights}: '{key}' is for '{m['module']}', which is no linear of this model's decoder "
                                  f"layers (e.g. {sorted(by_name)[:3]})")
        found.setdefault(module, {})[m["which"]] = t
    if not found:
        raise CheckpointError(f"{weights}: holds no LoRA tensors")
    r, alpha = int(cfg["r"]), cfg["lora_alpha"]
    for module, ab in found.items():
        unit = by_name[module]
        want = {"A": (r, unit.in_features), "B": (unit.out_features, r)}
        for which, shape in want.items():
            if which not in ab:
                raise CheckpointError(f"{weights}: '{PREFIX}{module}.lora_{which}.weight' is missing")
            if tuple(ab[which].shape) != shape:
                raise CheckpointError(f"{weights}: '{PREFIX}{module}.lora_{which}.weight' has shape "
                                      f"{tuple(ab[which].shape)}; r={r} on this model expects {shape}")
    chosen = [(by_name[m], by_name[m].parts) for m in found]
    dropout, rslora = float(cfg.get("lora_dropout", 0.0)), bool(cfg.get("use_rslora", False))
    install(model, chosen, r, alpha, dropout, rslora, dtype)
    with torch.no_grad():
        for unit, parts in chosen:
            A, B = found[unit.hf_name]["A"], found[unit.hf_name]["B"]
            for p in parts:
                lora = model.get_submodule(p.name).lora
                lora.lora_A.copy_(A)  # shared by the parts: the same tensor each time
                lora.lora_B.copy_(B[p.rows])
                lora.lora_A.requires_grad_(trainable)
                lora.lora_B.requires_grad_(trainable)
    model.lora_config = LoraSettings(r, alpha, dropout, rslora, cfg.get("target_modules"))
    return model
