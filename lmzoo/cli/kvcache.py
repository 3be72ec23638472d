"""Count a model's KV cache: the formula per layer and in total, and the bytes measured on a real
cache object after a prefill, which must agree to the byte.

Formulas (values per token and layer; times n_tokens · batch · bytes per value):
  MHA  2 · n_h · d_h        every head keeps its K and V
  GQA  2 · n_g · d_h        one K/V head per group of query heads
  MQA  2 · d_h              one K/V head for all
  MLA  (d_c + d_h^R)        DeepSeek-V2: the latent c_KV and the one shared RoPE key

The measurement runs on a small instance with the same per-token cache shape: the fields that do
not enter the cache (vocabulary, MLP and expert widths, d_model, query ranks, and the query heads
where K/V heads or MLA make them irrelevant) are shrunk while the model is over --max-params, and
then, when every layer caches the same, only two layers are kept, the measured bytes then scaled
back by layers / kept layers (the output says so). The cache is filled by one real prefill forward
(in chunks when its attention scores would not fit in memory), so it costs time quadratic in
--tokens: past --max-flops, batch rows (all alike) are dropped and scaled back the same way, and a
prefill that does not fit even on one layer and one row is not run: the command says so and exits
1. --no-measure skips the measurement.
`--compare` plots bytes against context length for MHA, GQA, MQA and MLA versions of one model size.
Encoders (BERT, ViT) and CLIP keep no cache and are refused.

Examples:
  lmzoo kvcache --model deepseek-v2 --tokens 4096
  lmzoo kvcache --model llama2-70b --tokens 4096 --batch 8 --dtype bf16
  lmzoo kvcache --model deepseek-v2 --tokens 4096 --compare --out mla_vs_mha.png
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from lmzoo.cli.common import add_revision_argument, takes_model
from lmzoo.cli.zoo import human, human_bytes
from lmzoo.errors import ConfigError, LmzooError
from lmzoo.interop.checkpoint import as_dtype, build, read_hf_config
from lmzoo.models.registry import family_for_hf, get_preset, presets
from lmzoo.nn.attention import Attention
from lmzoo.nn.mla import MLA

HELP = "KV-cache bytes of a model: formula per layer and total, checked against a real cache after a prefill"


@dataclass
class CacheShape:
    """What one layer caches per token."""

    kind: str  # MHA | GQA (g groups) | MQA | MLA
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
    # named by its n_g K/V groups, the n_g of the formula beside it (the GQA paper's GQA-G), not by
    # the query heads per group that Attention.kind counts (llama3-8b: 8 groups of 4)
    return CacheShape(f"GQA ({n_kv} groups)", 2 * n_kv * d, "2 · n_g · d_h", f"2 · {n_kv} · {d}", a.n_heads, d)


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


def _shrinks(cfg) -> list:
    """Changes tried in this order while the instance is over budget: the vocabulary, the fields the family's
    record says never enter the cache (``Family.cache_free_fields``; one set to 0 or None is left alone),
    then d_model and the query heads. Each is kept only if the config accepts it and every layer still
    caches the same per token."""
    from lmzoo.models.registry import family_of

    free = [(lambda c, f=f, v=v: {f: v} if getattr(c, f, None) else {})
            for f, v in family_of(cfg).cache_free_fields.items()]
    return [
        lambda c: {"vocab_size": max([128] + [i + 1 for i in _special_ids(c)])},  # keep special ids valid
        *free,
        lambda c: {"d_model": 64},
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
    for shrink in _shrinks(cfg):
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


def _layers_of(model):
    return model.layers if hasattr(model, "layers") else model.decoder_layers


# Layers whose caches the measurement fills when every layer caches the same: two show it as well as
# sixty do, and the bytes are scaled back by layers / kept layers.
MEASURED_LAYERS = 2


def prefill_flops(model, tokens: int, source_tokens: int = 0) -> float:
    """Rough arithmetic of a prefill of ``tokens`` through one layer of ``model`` for one batch row:
    attention (QKᵀ and AV, 2 FLOP per multiply-add, the whole T × T square as a masked kernel computes
    it: 4 · n_h · T² · d_h) plus the layer's matrices (2 · params · T; an MoE layer counts every expert)."""
    self_, cross = cached_shapes(model)
    s = self_[0]
    params = sum(p.numel() for p in _layers_of(model)[0].parameters())
    attn = 4 * s.n_heads * tokens * tokens * s.d_h
    if cross:
        attn += 4 * cross[0].n_heads * tokens * source_tokens * cross[0].d_h
    return attn + 2 * params * tokens


def _fit(small, want, flops_1: float, batch: int, max_flops: float):
    """(config, its parameter count or None, batch rows) of the measured instance: when every layer caches
    the same, MEASURED_LAYERS of them (one if two do not fit ``max_flops``); then as many batch rows
    (all alike) as fit. The measured bytes are scaled back to all layers and rows."""
    layers, params = len(want[0]), None
    uniform = len(set(want[0])) == 1 and len(set(want[1])) <= 1
    if uniform and layers > 1:
        keep = min(layers, MEASURED_LAYERS)
        keep = 1 if keep * batch * flops_1 > max_flops else keep
        # an encoder-decoder counts its (cached) decoder layers apart: n_decoder_layers
        fewer = {k: keep for k in ("n_layers", "n_decoder_layers") if getattr(small, k, None) is not None}
        got = _try(small, fewer, want) if keep < layers else None
        if got is not None:
            (small, params), layers = got, keep
    rows = batch
    if layers * rows * flops_1 > max_flops:
        rows = max(1, min(batch, int(max_flops // (layers * flops_1))))
    if layers * rows * flops_1 > max_flops:
        raise LmzooError(f"a prefill of the cache costs about {layers * rows * flops_1:.2g} FLOP even on the "
                         f"smallest instance ({layers} layer(s), batch {rows}), over --max-flops {max_flops:g} "
                         "(attention grows with tokens²); raise --max-flops to wait for it, or pass --no-measure")
    return small, params, rows


def measure(cfg, tokens: int, source_tokens: int, batch: int, dtype: torch.dtype, max_params: int,
            max_flops: float = 3e11, scratch_bytes: int = 2**30, skip_memory_check: bool = False,
            full_layers: int | None = None) -> dict:
    """Fill the cache of a small instance with one prefill of ``tokens`` tokens; read the cache object.

    One forward fills the cache as the generation engine's prefill does (``model.new_cache`` and the
    model's own forward); the vocabulary, which the cache never sees, costs nothing since only the
    last position's logits are computed. The prefill goes in chunks when one pass would need more
    than ``scratch_bytes`` of attention scores. A model whose prompts must end in particular tokens
    (ChatGLM-6B's [gMASK] <sop>) says which by a ``prompt_tail()`` method; they end the first chunk,
    and the rest are random ids."""
    from lmzoo.cli.common import check_memory, gb

    full_layers = full_layers or len(cached_shapes(build(cfg, device="meta"))[0])
    small = small_instance(cfg, max_params)
    meta = build(small, device="meta")
    want = _values(meta)
    small, params, rows = _fit(small, want, prefill_flops(meta, tokens, source_tokens), batch, max_flops)
    params = params or meta.num_parameters()
    heads = max(s.n_heads for group in cached_shapes(meta) for s in group)
    chunk = max(1, min(tokens, scratch_bytes // (4 * rows * heads * max(tokens, source_tokens))))
    cache_bytes = (want[0][0] * tokens + (want[1][0] if want[1] else 0) * source_tokens) * rows * dtype.itemsize
    check_memory(params * 4 + cache_bytes * len(want[0]) + scratch_bytes,
                 f"the measurement ({human(params)} params in float32, a cache of up to "
                 f"{gb(cache_bytes * len(want[0]))} and up to {gb(scratch_bytes)} of attention scores)",
                 skip_memory_check)
    torch.manual_seed(0)
    model = build(small, dtype=dtype).eval()
    kept = len(cached_shapes(model)[0])
    seq2seq = getattr(model, "is_encoder_decoder", False)
    tail = list(model.prompt_tail()) if hasattr(model, "prompt_tail") else []
    if tokens < len(tail):
        raise LmzooError(f"{tokens} tokens leave no room for the prompt this model needs ({len(tail)} tokens)")
    ids = torch.randint(0, small.vocab_size, (rows, tokens))
    first = min(tokens, max(chunk, len(tail)))
    if tail:
        ids[:, first - len(tail):first] = torch.tensor(tail)
    if seq2seq:  # the source goes to the encoder; the decoder reads its start token, then random ids
        source = torch.randint(0, small.vocab_size, (rows, source_tokens))
        ids[:, 0] = model.decoder_start_token_id
    cache = model.new_cache(rows, tokens)
    bounds = [0] + list(range(first, tokens, chunk)) + [tokens]
    try:
        with torch.inference_mode():
            for a, b in zip(bounds, bounds[1:]):
                if seq2seq:
                    model(input_ids=source if a == 0 else None, decoder_input_ids=ids[:, a:b], cache=cache,
                          logits_to_keep=1)
                else:
                    model(ids[:, a:b], cache=cache, logits_to_keep=1)
    except (LmzooError, ValueError) as e:
        raise LmzooError(f"the prefill refused a random prompt (a model that needs particular prompt tokens can "
                         f"name them with a prompt_tail() method): {e}") from e
    if cache.length != tokens:
        raise LmzooError(f"the cache holds {cache.length} tokens after the prefill, expected {tokens}")
    if (cache.nbytes * full_layers * batch) % (kept * rows):
        raise LmzooError(f"{cache.nbytes} B on {kept} layers and {rows} rows does not scale to {full_layers} "
                         f"layers and {batch} rows")
    return {"bytes": cache.nbytes * full_layers * batch // (kept * rows), "small_bytes": cache.nbytes,
            "layers_kept": kept, "layers": full_layers, "batch_kept": rows, "batch": batch,
            "chunks": len(bounds) - 1, "params": model.num_parameters(), "cache_type": type(cache).__name__,
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
            measured: bool = True, source_tokens: int | None = None, max_flops: float = 3e11,
            skip_memory_check: bool = False) -> dict:
    """The formula's bytes per layer and in total, and (``measured``) the bytes of a real cache.

    ``source_tokens`` (encoder-decoders only; default ``tokens``): the encoder input whose
    cross-attention K/V every decoder layer keeps."""
    from lmzoo.cli.common import DECODER_SHAPES

    name, fam, cfg = resolve_config(spec)
    if fam.shape not in DECODER_SHAPES:  # decided from the registry, before anything is built
        raise LmzooError(f"'{name}' is a {fam.name} {fam.shape}, not a decoder: it keeps no KV cache "
                         f"(an encoder reads its whole input in one pass)")
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
            out["measured"] = measure(cfg, tokens, source_tokens, batch, as_dtype(dtype), max_params, max_flops,
                                      skip_memory_check=skip_memory_check, full_layers=len(self_))
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
        kept = [f"{m['layers_kept']} layer(s)"] if m["layers_kept"] != m["layers"] else []
        kept += [f"batch {m['batch_kept']}"] if m["batch_kept"] != m["batch"] else []
        factors = [f"{m['layers']}/{m['layers_kept']}"] if m["layers_kept"] != m["layers"] else []
        factors += [f"{m['batch']}/{m['batch_kept']}"] if m["batch_kept"] != m["batch"] else []
        scaled = f"{m['small_bytes']:,} B on {', '.join(kept)} × {' × '.join(factors)} = " if kept else ""
        chunks = f" in {m['chunks']} chunks" if m["chunks"] > 1 else ""
        verdict = "agrees to the byte" if m["bytes"] == r["formula_bytes"] else "DIFFERS from the formula"
        lines.append(f"measured: {scaled}{m['bytes']:,} B, {m['cache_type']}.nbytes after a prefill of "
                     f"{r['tokens']} tokens{chunks} on a small instance with the same per-token cache ({inst}; "
                     f"{human(m['params'])} params, random weights): {verdict}")
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
    import matplotlib  # lazy: only --compare draws

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
    p.add_argument("--model", required=True, help="a checkpoint directory, a preset name or a Hub id (only "
                   "config.json is read)")
    add_revision_argument(p)
    takes_model(p, "model", allow_presets=True, kind="config")
    p.add_argument("--tokens", type=int, required=True, help="tokens in the cache (context length)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--source-tokens", type=int,
                   help="encoder-decoders: encoder input tokens whose cross-attention K/V are cached (default --tokens)")
    p.add_argument("--dtype", default="bf16", help="dtype of the cached values (default bf16)")
    p.add_argument("--max-params", type=float, default=64e6,
                   help="parameter budget of the small instance the measurement runs on (default 64M)")
    p.add_argument("--max-flops", type=float, default=3e11,
                   help="arithmetic budget of the measured prefill (default 3e11: seconds on a CPU); past it, batch "
                        "rows are dropped and the bytes scaled back, and a prefill that does not fit on one layer "
                        "and one row is refused")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="measure even when the estimate exceeds the memory available")
    p.add_argument("--no-measure", action="store_true", help="print the formula only")
    p.add_argument("--compare", action="store_true",
                   help="also plot bytes vs context length for MHA, GQA, MQA and MLA versions of this model size")
    p.add_argument("--groups", type=int, default=8, help="K/V groups of the GQA version in --compare (default 8)")
    p.add_argument("--out", default="kvcache_compare.png", help="PNG written by --compare")


def run(args) -> int:
    r = account(args.model, args.tokens, args.batch, args.dtype, int(args.max_params), measured=not args.no_measure,
                source_tokens=args.source_tokens, max_flops=args.max_flops, skip_memory_check=args.skip_memory_check)
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
    if "error" in m:  # the formula is printed, but the check the command promises was not made
        return 1
    return 1 if "bytes" in m and m["bytes"] != r["formula_bytes"] else 0
