"""``lmzoo zoo --compare bert gpt2 t5``: the BERT/GPT/T5 comparison table, generated, not typed.

Each named family (or preset) becomes a column; each aspect a row:

    tokenisation          the family's registered tokenizer kind + the preset's vocabulary size
    objective             the family's registered pretraining objective
    input representation  the family's registered inputs + the position encoding read off the model
    attention             the masks its shape uses (``masks.MASK_KINDS``) + the attention read off the model
    architecture          the shape, sizes and parameter count of the preset, built on the meta device

A family name stands for its first preset. Nothing here names a family: add one to the registry
with its ``tokenizer`` / ``objective`` / ``inputs`` fields and it can be compared.
"""

from __future__ import annotations

import json

from lmzoo.cli.zoo import describe, human
from lmzoo.errors import LmzooError
from lmzoo.interop.checkpoint import build
from lmzoo.models.registry import families, presets

# Which masks (lmzoo/nn/masks.py) each shape attends with, and where.
SHAPE_MASKS = {
    "causal decoder": [("", "causal")],
    "prefix decoder": [("", "prefix (bidirectional over the input, causal over the output)")],
    "encoder": [("", "bidirectional")],
    "encoder-decoder": [("encoder", "bidirectional"), ("decoder", "causal + cross to the encoder")],
    "dual encoder": [("image", "bidirectional"), ("text", "causal")],
}

ASPECTS = ["tokenisation", "objective", "input representation", "attention", "architecture"]


def resolve(name: str):
    """(column name, family, preset name, config) for a family or preset name."""
    fams, pres = families(), presets()
    if name in pres:
        fam, cfg = pres[name]
        return name, fam, name, cfg
    if name in fams:
        fam = fams[name]
        if not fam.presets:
            raise LmzooError(f"--compare: family '{name}' has no preset to build")
        preset = next(iter(fam.presets))
        return name, fam, preset, fam.presets[preset]
    raise LmzooError(f"--compare: unknown family or preset '{name}'; families: {sorted(fams)}; "
                     f"presets: {sorted(pres)}")


def _cells(fam, preset: str, cfg) -> tuple[dict, int]:
    """The model-read cells (position, norm, activation, attention, layers) and the parameter count."""
    model = build(cfg, device="meta")
    # Encoders and encoder-decoders describe themselves; decoders are read by the zoo table's describe.
    cells = model.describe() if hasattr(model, "describe") else describe(preset, fam, cfg)
    return cells, model.num_parameters()


def column(name: str) -> dict:
    col, fam, preset, cfg = resolve(name)
    cells, params = _cells(fam, preset, cfg)
    masks = "; ".join(f"{where}: {kind}" if where else kind for where, kind in SHAPE_MASKS.get(fam.shape, [("", "?")]))
    unknown = "(not registered)"
    return {
        "name": col, "family": fam.name, "preset": preset,
        "tokenisation": f"{fam.tokenizer or unknown}" + (f"; vocabulary {cfg.vocab_size:,}"
                                                         if hasattr(cfg, "vocab_size") else ""),  # ViT has none
        "objective": fam.objective or unknown,
        "input representation": f"{fam.inputs or unknown}; positions: {cells['position']}",
        "attention": f"{masks}; {cells['attention']}",
        "architecture": f"{fam.shape}, {cells['layers']} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
                        f"{cells['norm']}, {cells['activation']}, {human(params)} parameters ({preset})",
    }


def compare(names: list[str]) -> list[dict]:
    return [column(n) for n in names]


def table(cols: list[dict]) -> str:
    """Aspects as rows, one column per name (markdown)."""
    lines = ["| | " + " | ".join(c["name"] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    lines += ["| " + a + " | " + " | ".join(c[a].replace("|", "/") for c in cols) + " |" for a in ASPECTS]
    return "\n".join(lines)


def run(names: list[str], as_json: bool = False) -> int:
    cols = compare(names)
    print(json.dumps(cols, indent=2, ensure_ascii=False) if as_json else table(cols))
    return 0
