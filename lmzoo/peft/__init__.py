"""LoRA and QLoRA adapters on any lmzoo decoder, saved and read in PEFT's on-disk layout.

    model = lmzoo.load(path)
    lmzoo.peft.apply_lora(model, r=8, alpha=16, targets=["q_proj", "v_proj"])   # base frozen
    ... train ...
    lmzoo.peft.save_adapter(model, "out/adapter")  # peft.PeftModel.from_pretrained(hf_model, "out/adapter")
    lmzoo.peft.merge_lora(model)                    # W' = W + (α/r)·B·A

``lora.py`` holds the math (adapter, merge, scaling), ``layout.py`` which Hugging Face linear each
lmzoo linear is part of (read off the family's key map), ``adapter_files.py`` the PEFT files,
``qlora.py`` the NF4 base. See docs/lora.md.
"""

from lmzoo.peft.adapter_files import load_adapter, save_adapter
from lmzoo.peft.apply import apply_lora, prepare_qlora
from lmzoo.peft.lora import (LoraAdapter, LoraSettings, ParamReport, adapters, disable_adapters, lora_scaling,
                             merge_lora,
                             trainable_parameters, unload_lora, unmerge_lora)
from lmzoo.peft.qlora import quantize_frozen_base

__all__ = ["apply_lora", "prepare_qlora", "merge_lora", "unmerge_lora", "unload_lora", "save_adapter", "load_adapter",
           "trainable_parameters", "ParamReport", "LoraAdapter", "LoraSettings", "adapters", "disable_adapters",
           "lora_scaling", "quantize_frozen_base"]
