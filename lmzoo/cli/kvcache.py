"""Count a model's KV cache: the formula per layer and in total, and the bytes measured on the cache
object of a real ``lmzoo.generate`` call, which must agree to the byte.

Formulas (values per token and layer; times n_tokens · batch · bytes per value):
  MHA  2 · n_h · d_h        every head keeps its K and V
  GQA  2 · n_g · d_h        one K/V head per group of query heads
  MQA  2 · d_h              one K/V head for all
  MLA  (d_c + d_h^R)        DeepSeek-V2: the latent c_KV and the one shared RoPE key

The measurement runs on a small instance with the same per-token cache shape: the fields that do
not enter the cache (vocabulary, MLP and expert widths, d_model, query ranks, and the query heads
where K/V heads or MLA make them irrelevant) are shrunk while the model is over --max-params, and
only if that is not enough are layers dropped, the measured bytes then scaled back by
layers / kept layers (every layer caches the same; the output says so when it happens). The
prefill is real, so the measurement takes time quadratic in --tokens; --no-measure skips it.
`--compare` plots bytes against context length for MHA, GQA, MQA and MLA versions of one model size.

Examples:
  lmzoo kvcache --model deepseek-v2 --tokens 4096
  lmzoo kvcache --model llama2-70b --tokens 32768 --batch 8 --dtype bf16
  lmzoo kvcache --model deepseek-v2 --tokens 4096 --compare --out mla_vs_mha.png
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

import lmzoo
from lmzoo.cli.zoo import human, human_bytes
from lmzoo.errors import ConfigError, LmzooError
from lmzoo.interop.checkpoint import as_dtype, build, read_hf_config
from lmzoo.models.registry import family_for_hf, get_preset, presets
from lmzoo.nn.attention import Attention
from lmzoo.nn.mla import MLA

HELP = "KV-cache bytes of a model: formula per layer and total, checked against a real generate call"


@dataclass
class CacheShape:
    """What one layer caches per token."""

    kind: str  # MHA | GQA-g | MQA | MLA
    values: int  # values per token
    formula: str  # symbols, per token and layer
    numbers: str  # the same with this layer's numbers
    n_heads: int  # query heads
    d_h: int  # per-head width of the keys (without the RoPE part)


def _attention_shape(a: Attention) -> CacheShape:
    n_kv, d = a.n_kv_heads, a.head_dim
    if n_kv == a.n_heads:
        return CacheShape("MHA", 2 * n_kv * d, "2 · n_h · d_h", f"2 · {n_kv} · {d}", a.n_heads, d)
    if n_kv == 1:
        return CacheShape("MQA", 2 * d, "2 · d_h", f"2 · {d}", a.n_heads, d)
    return CacheShape(f"GQA-{a.n_heads // n_kv}", 2 * n_kv * d, "2 · n_g · d_h", f"2 · {n_kv} · {d}", a.n_heads, d)


def _mla_shape(a: MLA) -> CacheShape:
    d_c, d_r = a.kv_lora_rank, a.rope_dim
    return CacheShape("MLA", d_c + d_r, "(d_c + d_h^R)", f"({d_c} + {d_r})", a.n_heads, a.nope_dim)


# attention class -> its cache formula (a new attention kind registers here)
SHAPES = {Attention: _attention_shape, MLA: _mla_shape}


def cache_shape(attn) -> CacheShape:
    for cls in type(attn).__mro__:
        if cls in SHAPES:
            return SHAPES[cls](attn)
    raise LmzooError(f"no KV-cache formula for attention '{type(attn).__name__}'; known: "
                     f"{sorted(c.__name__ for c in SHAPES)}")


def cached_shapes(model) -> tuple[list[CacheShape], list[CacheShape]]:
    """Per layer that caches: its self-attention shape (per generated token) and, in an encoder-decoder,
    its cross-attention shape (per source token)."""
    if not hasattr(model, "new_cache"):
        raise LmzooError(f"{type(model).__name__} keeps no KV cache (an encoder reads its input in one pass)")
    layers = model.layers if hasattr(model, "layers") else model.decoder_layers
    cross = [cache_shape(layer.cross_attn) for layer in layers if hasattr(layer, "cross_attn")]
    return [cache_shape(layer.attn) for layer in layers], cross


# -- the model and its small twin ---------------------------------------------------------------
def resolve_config(spec: str):
    """(name, family, config) of a preset or a checkpoint directory (only config.json is read)."""
    if Path(spec).is_dir():
        hf = read_hf_config(spec)
        fam = family_for_hf(hf, str(Path(spec) / "config.json"))
        return str(spec), fam, fam.config_cls.from_hf(hf, source=str(Path(spec) / "config.json"))
    if spec in presets():
        fam, cfg = get_preset(spec)
        return spec, fam, cfg
    raise LmzooError(f"--model '{spec}' is neither a directory nor a preset; presets: {sorted(presets())}")


def _special_ids(cfg) -> list[int]:
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name) if f.name.endswith("token_id") else None
        out += [v] if isinstance(v, int) else [x for x in v or [] if isinstance(x, int)] if isinstance(v, list) else []
    return out


# Fields that never enter the cache, shrunk in this order while the instance is over budget. Each
# change is kept only if the config accepts it and every layer still caches the same per token.
_SHRINKS = [
    lambda c: {"vocab_size": max([128] + [i + 1 for i in _special_ids(c)])},  # keep special ids valid
    lambda c: {"d_ff": 32}, lambda c: {"d_model": 64}, lambda c: {"d_expert": 16},
    lambda c: {"q_lora_rank": 16} if getattr(c, "q_lora_rank", None) else {},
    lambda c: {"n_heads": c.n_kv_heads},  # GQA: one query head per K/V head caches the same
    lambda c: {"n_heads": 1, "n_kv_heads": 1},  # MLA: the cache does not depend on the heads at all
]


def _values(model) -> tuple[list[int], list[int]]:
    self_, cross = cached_shapes(model)
    return [s.values for s in self_], [s.values for s in cross]


def _try(cfg, changes: dict, want: tuple[list[int], list[int]]):
    names = {f.name for f in dataclasses.fields(cfg)}
    if not changes or not set(changes) <= names or all(getattr(cfg, k) == v for k, v in changes.items()):
        return None
    try:
        small = cfg.replace(**changes)
        model = build(small, device="meta")
    except (ConfigError, ValueError):
        return None
    got = _values(model)
    if any(g != w[: len(g)] for g, w in zip(got, want)):  # a prefix: layers may have been dropped
        return None
    return small, model.num_parameters()


def small_instance(cfg, max_params: int):
    """A config with the same per-layer cache shape and at most ``max_params`` parameters; layers are
    dropped only when shrinking the widths was not enough and every layer caches the same."""
    model = build(cfg, device="meta")
    want = _values(model)
    small, n = cfg, model.num_parameters()
    for shrink in _SHRINKS:
        if n <= max_params:
            break
        small, n = _try(small, shrink(small), want) or (small, n)
    layers = cfg.n_layers
    uniform = len(set(want[0])) == 1 and len(set(want[1])) <= 1
    while n > max_params and layers > 1 and uniform:
        layers = max(1, layers // 2)
        small, n = _try(small, {"n_layers": layers}, want) or (small, n)
    if n > max_params:
        raise LmzooError(f"no instance with this cache shape fits --max-params {human(max_params)}: "
                         f"the smallest found has {human(n)} parameters in {small.n_layers} layer(s)")
    return small


def measure(cfg, tokens: int, source_tokens: int, batch: int, dtype: torch.dtype, max_params: int) -> dict:
    """Generate on a small instance until its cache holds ``tokens`` tokens; read the cache object.

    A model whose prompts must end in particular tokens (ChatGLM-6B's [gMASK] <sop>) says which by a
    ``prompt_tail()`` method; the rest of the prompt is random ids."""
    full_layers = len(cached_shapes(build(cfg, device="meta"))[0])
    small = small_instance(cfg, max_params)
    torch.manual_seed(0)
    model = build(small, dtype=dtype).eval()
    kept = len(cached_shapes(model)[0])
    made = []
    new_cache = model.new_cache
    model.new_cache = lambda *a, **k: made.append(new_cache(*a, **k)) or made[-1]  # keep the engine's cache
    if getattr(model, "is_encoder_decoder", False):
        # the source goes to the encoder; the decoder is fed its start token and all new ids but the last
        n_new, n_prompt = tokens, source_tokens
    else:  # a prefill, then one decode step; the last new id is never fed back
        n_new = 2 if tokens > 1 else 1
        n_prompt = tokens - n_new + 1
    tail = list(model.prompt_tail()) if hasattr(model, "prompt_tail") else []
    if n_prompt <= len(tail):
        raise LmzooError(f"{tokens} tokens leave no room for the prompt this model needs ({len(tail)} + 1 tokens)")
    prompt = torch.randint(0, small.vocab_size, (batch, n_prompt - len(tail)))
    prompt = torch.cat([prompt, torch.tensor([tail] * batch, dtype=torch.long).view(batch, -1)], dim=1)
    try:
        lmzoo.generate(model, prompt, max_new_tokens=n_new)
    except LmzooError as e:
        raise LmzooError(f"generate refused a random prompt (a model that needs particular prompt tokens can name "
                         f"them with a prompt_tail() method): {e}") from e
    cache = made[0]
    if cache.length != tokens:
        raise LmzooError(f"the cache holds {cache.length} tokens after generate, expected {tokens}")
    if (cache.nbytes * full_layers) % kept:
        raise LmzooError(f"{cache.nbytes} B on {kept} layers does not scale to {full_layers} layers")
    return {"bytes": cache.nbytes * full_layers // kept, "small_bytes": cache.nbytes, "layers_kept": kept,
            "layers": full_layers, "params": model.num_parameters(), "cache_type": type(cache).__name__,
            "instance": {k: getattr(small, k) for k in ("d_model", "n_heads", "n_kv_heads", "vocab_size", "d_ff")}}


def _runs(shapes: list[CacheShape], per: int, scale: int) -> list[dict]:
    """Consecutive layers with the same cache shape, with their bytes per layer (per · values · scale)."""
    groups = []
    for i, s in enumerate(shapes):
        if groups and groups[-1]["shape"] == s:
            groups[-1]["last"] = i
        else:
            groups.append({"first": i, "last": i, "shape": s})
    for g in groups:
        g["bytes_per_layer"] = g["shape"].values * per * scale
    return groups


def account(spec: str, tokens: int, batch: int = 1, dtype: str = "bf16", max_params: int = 64_000_000,
            measured: bool = True, source_tokens: int | None = None) -> dict:
    """The formula's bytes per layer and in total, and (``measured``) the bytes of a real cache.

    ``source_tokens`` (encoder-decoders only; default ``tokens``): the encoder input whose
    cross-attention K/V every decoder layer keeps."""
    name, fam, cfg = resolve_config(spec)
    if tokens < 1 or batch < 1:
        raise LmzooError(f"--tokens ({tokens}) and --batch ({batch}) must be at least 1")
    if tokens > cfg.max_positions:
        raise LmzooError(f"--tokens {tokens} exceeds {name}'s context of {cfg.max_positions} tokens")
    nbytes = as_dtype(dtype).itemsize
    self_, cross = cached_shapes(build(cfg, device="meta"))
    source_tokens = (source_tokens or tokens) if cross else 0
    out = {"model": name, "family": fam.name, "tokens": tokens, "source_tokens": source_tokens, "batch": batch,
           "dtype": str(as_dtype(dtype)), "bytes_per_value": nbytes, "layers": len(self_),
           "groups": _runs(self_, tokens, batch * nbytes), "cross_groups": _runs(cross, source_tokens, batch * nbytes),
           "formula_bytes": (sum(s.values for s in self_) * tokens + sum(s.values for s in cross) * source_tokens)
           * batch * nbytes}
    if measured:
        try:
            out["measured"] = measure(cfg, tokens, source_tokens, batch, as_dtype(dtype), max_params)
        except LmzooError as e:  # e.g. one Bloom-176B layer alone is 2.5B parameters
            out["measured"] = {"error": str(e)}
    return out


def report(r: dict) -> str:
    b = r["bytes_per_value"]
    src = f", {r['source_tokens']} source tokens" if r["cross_groups"] else ""
    lines = [f"{r['model']} ({r['family']}): {r['layers']} layers, {r['tokens']} tokens{src}, batch {r['batch']}, "
             f"{r['dtype'].replace('torch.', '')} ({b} bytes/value)"]
    terms = []
    for label, groups, n_tok in (("", r["groups"], "n_tokens"), ("cross-attention ", r["cross_groups"], "n_source")):
        for g in groups:
            s, n = g["shape"], g["last"] - g["first"] + 1
            lines.append(f"  {label}layers {g['first']}-{g['last']} ({n}): {s.kind}, {s.formula} = {s.numbers} = "
                         f"{s.values} values/token -> {g['bytes_per_layer']:,} B per layer "
                         f"({human_bytes(g['bytes_per_layer'])})")
            terms.append(f"{s.formula} · {n_tok} · {n} layers")
    lines.append(f"total (formula): [{' + '.join(terms)}] · batch · bytes = {r['formula_bytes']:,} B "
                 f"({human_bytes(r['formula_bytes'])})")
    m = r.get("measured")
    if m and "error" in m:
        lines.append(f"measured: not done: {m['error']}")
    elif m:
        inst = ", ".join(f"{k} {v}" for k, v in m["instance"].items())
        scaled = (f"{m['small_bytes']:,} B on {m['layers_kept']} layer(s) × {m['layers']}/{m['layers_kept']} = "
                  if m["layers_kept"] != m["layers"] else "")
        verdict = "agrees to the byte" if m["bytes"] == r["formula_bytes"] else "DIFFERS from the formula"
        lines.append(f"measured: {scaled}{m['bytes']:,} B, {m['cache_type']}.nbytes after lmzoo.generate on a "
                     f"small instance with the same per-token cache ({inst}; {human(m['params'])} params, "
                     f"random weights): {verdict}")
    return "\n".join(lines)


# -- --compare ---------------------------------------------------------------------------------
def variants(spec: str, groups: int = 8) -> dict[str, int]:
    """Cache values per token (all layers) of MHA, GQA, MQA and MLA versions of one model size.

    The size is the model's n_h query heads of width d_h over its layers. An MLA model keeps its own
    d_c and d_h^R; for a dense model MLA takes the paper's choice d_c = 4·d_h, d_h^R = d_h/2.
    """
    _, _, cfg = resolve_config(spec)
    model = build(cfg, device="meta")
    shapes = cached_shapes(model)[0]
    s, L = shapes[0], len(shapes)
    n_h, d_h = s.n_heads, s.d_h
    a = (model.layers if hasattr(model, "layers") else model.decoder_layers)[0].attn
    d_c, d_r = (a.kv_lora_rank, a.rope_dim) if isinstance(a, MLA) else (4 * d_h, d_h // 2)
    g = min(groups, n_h)
    return {f"MHA ({n_h} heads × {d_h})": 2 * n_h * d_h * L, f"GQA ({g} groups)": 2 * g * d_h * L,
            "MQA": 2 * d_h * L, f"MLA (d_c {d_c} + d_h^R {d_r})": (d_c + d_r) * L}


def plot_compare(spec: str, out: Path, max_tokens: int, batch: int, nbytes: int, groups: int = 8) -> dict[str, int]:
    import matplotlib  # lazy: only --compare needs it (pip install lmzoo[plot])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_token = variants(spec, groups)
    lengths = sorted({2 ** k for k in range(4, max_tokens.bit_length())} | {max_tokens})  # 16 .. max_tokens
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, v in per_token.items():
        ax.plot(lengths, [v * t * batch * nbytes / 2**30 for t in lengths], marker="o", ms=3, label=label)
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="KV cache (GiB)",
           title=f"{spec}: KV cache, batch {batch}, {nbytes} bytes/value")
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return per_token


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a preset name or a checkpoint directory (only config.json is read)")
    p.add_argument("--tokens", type=int, required=True, help="tokens in the cache (context length)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--source-tokens", type=int,
                   help="encoder-decoders: encoder input tokens whose cross-attention K/V are cached (default --tokens)")
    p.add_argument("--dtype", default="bf16", help="dtype of the cached values (default bf16)")
    p.add_argument("--max-params", type=float, default=64e6,
                   help="parameter budget of the small instance the measurement runs on (default 64M)")
    p.add_argument("--no-measure", action="store_true", help="print the formula only")
    p.add_argument("--compare", action="store_true",
                   help="also plot bytes vs context length for MHA, GQA, MQA and MLA versions of this model size")
    p.add_argument("--groups", type=int, default=8, help="K/V groups of the GQA version in --compare (default 8)")
    p.add_argument("--out", default="kvcache_compare.png", help="PNG written by --compare")


def run(args) -> int:
    r = account(args.model, args.tokens, args.batch, args.dtype, int(args.max_params), measured=not args.no_measure,
                source_tokens=args.source_tokens)
    print(report(r))
    if args.compare:
        nbytes = as_dtype(args.dtype).itemsize
        per_token = plot_compare(args.model, Path(args.out), args.tokens, args.batch, nbytes, args.groups)
        mla = next(v for k, v in per_token.items() if k.startswith("MLA"))
        print(f"\n{'version':<32} {'values/token':>14} {'bytes at ' + str(args.tokens) + ' tokens':>22} {'MLA ÷ this':>11}")
        for label, v in per_token.items():
            print(f"{label:<32} {v:>14,} {v * args.tokens * args.batch * nbytes:>22,} {mla / v:>11.3f}")
        print(f"plot: {args.out}")
    m = r.get("measured") or {}
    return 1 if "bytes" in m and m["bytes"] != r["formula_bytes"] else 0
