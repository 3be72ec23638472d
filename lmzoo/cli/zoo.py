"""Print the architecture table, computed from the registry.

Every cell is read off a model built on the meta device (no memory is allocated, so a 176B
preset costs nothing): position encoding, activation, norm and its placement, attention kind,
parameter count and KV-cache bytes per token.
"""

from __future__ import annotations

import json

from lmzoo.errors import LmzooError
from lmzoo.interop.checkpoint import as_dtype, build
from lmzoo.models.registry import families

HELP = "print the architecture table (family, shape, positions, activation, norm, attention, size, KV cache)"


def describe(name: str, fam, cfg, dtype_bytes: int = 2) -> dict:
    model = build(cfg, device="meta")
    common = {"preset": name, "family": fam.name, "shape": fam.shape}
    if hasattr(model, "describe"):  # encoders and encoder-decoders describe their own stacks
        return {**common, **model.describe(), "d_model": cfg.d_model, "params": model.num_parameters(),
                "kv_bytes_per_token": model.kv_bytes_per_token(dtype_bytes)}
    layer = model.layers[0]
    pos = model.positions.describe()  # each position part names itself
    kinds = [_mlp_kind(layer.mlp) for layer in model.layers]
    act = max(kinds, key=kinds.count)  # the most common; layers that differ (DeepSeek's dense first) are noted
    act += "".join(f"; {k} in {kinds.count(k)} layer(s)" for k in dict.fromkeys(kinds) if k != act)
    norm = f"{type(layer.attn_norm).__name__} ({layer.placement}-norm)"
    if layer.placement == "deepnorm":
        norm = f"{type(layer.attn_norm).__name__} (DeepNorm, α={layer.alpha:.2f})"
    if model.embed_norm is not None:
        norm += " + embedding norm"
    a = layer.attn
    return {
        "preset": name, "family": fam.name, "shape": fam.shape, "position": pos, "activation": act, "norm": norm,
        "attention": f"{a.kind} ({a.n_heads}q/{a.n_kv_heads}kv)" if hasattr(a, "n_kv_heads") else f"{a.kind}, {a.n_heads} heads", "layers": len(model.layers),
        "d_model": cfg.d_model, "params": model.num_parameters(),
        "kv_bytes_per_token": model.kv_bytes_per_token(dtype_bytes),
    }


def _mlp_kind(mlp) -> str:
    """'SwiGLU', 'gelu MLP', 'SwiGLU MoE 2 shared + 6/160 routed' ..."""
    return mlp.kind if hasattr(mlp, "kind") else f"{mlp.act_name} MLP"


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def human_bytes(n: int) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n} B"


def table(rows: list[dict], dtype: str) -> str:
    head = ["preset", "family", "shape", "position", "activation", "norm", "attention", "params",
            f"KV cache/token ({dtype})"]
    body = [[r["preset"], r["family"], r["shape"], r["position"], r["activation"], r["norm"], r["attention"],
             human(r["params"]), human_bytes(r["kv_bytes_per_token"])] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, b)) + " |" for b in body]
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--family", action="append", help="only these families (repeatable)")
    p.add_argument("--dtype", default="bf16", help="dtype of the KV-cache column (default bf16)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--compare", nargs="+", metavar="NAME",
                   help="compare families or presets side by side (tokenisation, objective, input "
                        "representation, attention, architecture), e.g. --compare bert gpt2 t5")


def rows(family_filter=None, dtype: str = "bf16") -> list[dict]:
    nbytes = as_dtype(dtype).itemsize
    unknown = sorted(set(family_filter or ()) - set(families()))
    if unknown:  # a typo ('lama') would otherwise print an empty table
        raise LmzooError(f"unknown family {', '.join(repr(u) for u in unknown)}; known: {', '.join(sorted(families()))}")
    out = []
    for fam in families().values():
        if family_filter and fam.name not in family_filter:
            continue
        for name, cfg in fam.presets.items():
            out.append(describe(name, fam, cfg, nbytes))
    return out


def run(args) -> int:
    if args.compare:
        from lmzoo.cli import compare

        return compare.run(args.compare, args.json)
    r = rows(args.family, args.dtype)
    print(json.dumps(r, indent=2) if args.json else table(r, args.dtype))
    return 0
