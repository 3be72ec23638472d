"""Quantize a checkpoint directory, save it, and report original against quantized.

  lmzoo quantize --model DIR --method gptq --bits 4 --group-size 128 --calib text.txt --out DIR-gptq
  lmzoo quantize --model DIR --compare --calib text.txt --out reports/   # every method side by side
  lmzoo quantize --model DIR --method rtn --out DIR-rtn                 # built-in text for the report

--calib FILE is UTF-8 text (any extension but .npy/.ids), tokenized with the model directory's
tokenizer, or token ids: .npy (an integer array) or .ids (integers separated by whitespace). Its
first 90% of tokens calibrate GPTQ and AWQ (--n-calib windows of --calib-len tokens at seeded
random offsets); the last 10% are the held-out text for perplexity, unless --eval FILE gives that
separately. Without --calib, the text that is needed (calibration for GPTQ/AWQ, held-out text for
the report) comes from lmzoo's built-in corpus (``lmzoo.data.builtin``: Python documentation prose
and bilingual documents), tokenized with the model's tokenizer: calibration from its first tokens,
the held-out text from the ones after. RTN, NF4 and LLM.int8 need no data. The text used is printed.
--group-size takes a number or "none" (one scale per output channel); --bits and --group-size
default to the method's own (4 / 128; NF4 blocks of 64; LLM.int8 is 8-bit per row; AWQ takes the
largest of 128, 64, 32 that divides every layer's width, else per channel: see quant/registry.py).

The report (table on stdout, quant_report.{md,json,png} in --out) measures each model in a fresh
process: held-out perplexity, bytes of the decoder linears (and their ratio to the ideal: bits per
weight plus scales and zeros), peak resident memory of that process, greedy decode tokens/s.
With --compare, a method that cannot run (or whose measurement fails) is listed under the table
with its reason, and the others go on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import lmzoo
from lmzoo.cli.common import add_memory_argument, add_revision_argument, check_memory, estimate_bytes, takes_model
from lmzoo.data.readers import read_utf8
from lmzoo.errors import LmzooError
from lmzoo.interop.checkpoint import read_hf_config
from lmzoo.models.registry import family_for_hf
from lmzoo.quant import METHODS, quantize
from lmzoo.quant.registry import DEFAULT, get_method, make_spec
from lmzoo.quant.report import add_ratios, figure, measure, table

HELP = "quantize a checkpoint (rtn, gptq, awq, int8, nf4) and report quality, size, memory and speed"
# (method, its arguments); the variant is named after the bits and group size actually used
COMPARE = [("rtn", {}), ("gptq", {}), ("awq", {}), ("nf4", {}), ("rtn", {"bits": 8, "group_size": None}), ("int8", {})]
BUILTIN = "the built-in corpus (lmzoo.data.builtin: Python docs prose + bilingual documents)"
BUILTIN_SCALE = 0.1  # ~240,000 characters, far more than the windows need; tokenized only as far as needed


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout) or Hub id")
    add_revision_argument(p)
    takes_model(p, "model")
    add_memory_argument(p)
    p.add_argument("--method", help=f"one of {', '.join(sorted(METHODS))} (default gptq)")
    p.add_argument("--bits", type=int, help="bit width (default: the method's)")
    p.add_argument("--group-size", help='weights per scale, or "none" for one per output channel (default: the method\'s)')
    p.add_argument("--calib", help="calibration text (or .npy / .ids token ids); default: the built-in corpus")
    p.add_argument("--eval", help="held-out text for perplexity (default: the last 10%% of --calib)")
    p.add_argument("--out", required=True, help="output directory (the quantized checkpoint, or one per method)")
    p.add_argument("--compare", action="store_true", help="run every method and tabulate them side by side")
    p.add_argument("--n-calib", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-len", type=int, default=128, help="tokens per calibration window (default 128)")
    p.add_argument("--asym", action="store_true", help="rtn/gptq: asymmetric grid with zero points")
    p.add_argument("--desc-act", action="store_true", help="gptq: quantize columns by descending Hessian diagonal")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="another method option, e.g. damp_percent=0.05, threshold=5.0, double_quant=false")
    p.add_argument("--no-report", action="store_true", help="skip the measurements")
    p.add_argument("--eval-windows", type=int, default=64, help="at most this many held-out windows (default 64)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per timed decode (default 32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads when measuring (default: torch's)")
    p.add_argument("--seed", type=int, default=0)


def read_ids(path: str, model_dir: str) -> torch.Tensor:
    """Token ids from a .npy / .ids file, or text tokenized with the model directory's tokenizer."""
    f = Path(path)
    if not f.is_file():
        raise LmzooError(f"{path}: no such file")
    if f.suffix == ".npy":
        import numpy as np

        ids = torch.from_numpy(np.load(f)).reshape(-1).long()
    elif f.suffix == ".ids":
        text = read_utf8(f)
        try:
            ids = torch.tensor([int(t) for t in text.split()], dtype=torch.long)
        except ValueError as e:
            raise LmzooError(f"{path}: a .ids file holds integers separated by whitespace ({e})") from e
    else:
        text = read_utf8(f)  # "PATH: not UTF-8 text (...)" for a binary file
        ids = torch.tensor(_tokenizer(model_dir, path).encode(text), dtype=torch.long)
    if ids.numel() == 0:
        raise LmzooError(f"{path}: holds no tokens; calibration and evaluation need text")
    return ids


def _tokenizer(model_dir: str, path: str):
    try:
        return lmzoo.load_tokenizer(model_dir)
    except LmzooError as e:
        raise LmzooError(f"{path} is text, but the model directory has no tokenizer lmzoo can read ({e}); "
                         "give token ids as .npy or .ids instead") from e


def builtin_ids(model_dir: str, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """The first ``n_tokens`` ids (or all there are) of the built-in corpus, tokenized document by
    document with the model directory's tokenizer."""
    from lmzoo.data.builtin import builtin_corpus

    tok = _tokenizer(model_dir, "no --calib given: the built-in corpus")
    ids: list[int] = []
    for doc in builtin_corpus(BUILTIN_SCALE, seed=seed):
        ids += tok.encode(doc + "\n\n")
        if len(ids) >= n_tokens:
            break
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def _group(value: str | None):
    if value is None:
        return DEFAULT
    if value.lower() in ("none", "-1"):
        return None
    try:
        return int(value)
    except ValueError as e:
        raise LmzooError(f'--group-size must be a number or "none", got {value!r}') from e


def _options(args) -> dict:
    opts = {}
    if args.asym:
        opts["sym"] = False
    if args.desc_act:
        opts["desc_act"] = True
    for kv in args.option:
        key, sep, value = kv.partition("=")
        if not sep:
            raise LmzooError(f"--option takes KEY=VALUE, got {kv!r}")
        try:
            opts[key] = json.loads(value)
        except ValueError:
            opts[key] = value
    return opts


def split_ids(ids: torch.Tensor, eval_ids: torch.Tensor | None, n: int, length: int, seed: int, vocab: int):
    """(calibration windows, held-out ids)."""
    if eval_ids is None:
        cut = int(len(ids) * 0.9)
        ids, eval_ids = ids[:cut], ids[cut:]
    bad = int(max(ids.max(), eval_ids.max() if len(eval_ids) else 0))
    if bad >= vocab:
        raise LmzooError(f"token id {bad} is outside the model's vocabulary of {vocab}")
    if len(ids) < 2:
        raise LmzooError("the calibration file holds fewer than 2 tokens")
    length = min(length, len(ids))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length + 1, (n,), generator=gen)
    return [ids[s:s + length][None] for s in starts.tolist()], eval_ids


def variant_name(method: str, bits: int, group: int | None, sep: str = "-") -> str:
    """"gptq-w4g128", "rtn-w8" (per channel), "nf4", "llm.int8" (``sep=" "``: "gptq w4g128")."""
    if method == "int8":
        return "llm.int8"
    if method == "nf4" and sep == "-":
        return "nf4"
    return f"{method}{sep}w{bits}" + (f"g{group}" if group else "")


def _used_group(model, spec: dict) -> int | None:
    """The group size the model was quantized with (AWQ's default depends on the layer widths)."""
    gs = model.quantization_config.get("group_size", spec["group_size"])
    return None if gs in (None, -1) else gs


def _quantize(args, method: str, bits, group, options: dict, calib):
    """(quantized model, its variant spec); a bad request fails before the model loads."""
    spec = make_spec(method, bits, group, **dict(options))[1]
    needed, how = estimate_bytes(args.model, "float32")  # quantization reads the float32 weights
    check_memory(needed, f"--model {args.model} ({how})", getattr(args, "skip_memory_check", False))
    model = lmzoo.load(args.model, dtype="float32")
    print(f"quantizing {args.model} with {method}", file=sys.stderr)
    quantize(model, method, bits, group, calib, progress=True, **options)
    return model, {**spec, "group_size": _used_group(model, spec)}


def _save(args, model, out: Path) -> None:
    lmzoo.save(model, out)  # carries the source directory's tokenizer and generation files
    print(f"wrote {out}", file=sys.stderr)


def _texts(args, vocab: int, needs_calib: bool, needs_eval: bool):
    """(calibration windows or None, held-out ids or None, a line saying which text is used)."""
    if not (needs_calib or needs_eval or args.calib or args.eval):
        return None, None, "calibration: none (this method needs no data) and no report"
    if args.calib:
        ids = read_ids(args.calib, args.model)
        eval_ids = read_ids(args.eval, args.model) if args.eval else None
        source = f"calibration: {args.calib} ({len(ids)} tokens" + (")" if args.eval else ", its last 10% held out)")
    else:
        n_calib = max(2 * args.n_calib * args.calib_len, 1024)  # windows at random offsets: some variety
        n_held = 0 if args.eval else args.eval_windows * args.calib_len + 1
        ids = builtin_ids(args.model, n_calib + n_held, args.seed)
        if n_held and len(ids) <= n_calib:
            raise LmzooError(f"the built-in corpus gave only {len(ids)} tokens; give --calib FILE")
        eval_ids = read_ids(args.eval, args.model) if args.eval else ids[n_calib:]
        ids = ids[:n_calib]
        source = f"calibration: no --calib, so {BUILTIN}, its first {len(ids)} tokens" + (
            "" if args.eval else f"; held-out: {_held_out(len(eval_ids), args.calib_len, args.eval_windows)}")
    if args.eval:
        source += f"; held-out: {args.eval} ({len(eval_ids)} tokens)"
    calib, held = split_ids(ids, eval_ids, args.n_calib, args.calib_len, args.seed, vocab)
    return calib, held, source


def _held_out(n_tokens: int, seq_len: int, max_windows: int) -> str:
    """The held-out tokens the report reads: perplexity's whole windows of ``min(seq_len, n - 1)`` tokens
    (it wants one token past the last window, so the built-in text takes windows · seq_len + 1)."""
    seq = min(seq_len, n_tokens - 1)
    if seq < 1:
        return f"the {n_tokens} tokens after them"
    n = (n_tokens - 1) // seq
    n = min(n, max_windows) if max_windows else n
    return f"the {n * seq} tokens after them ({n} windows of {seq})"


def run(args) -> int:
    if not (Path(args.model) / "config.json").exists():
        raise LmzooError(f"--model {args.model}: not a checkpoint directory (no config.json)")
    if args.compare and args.method:
        raise LmzooError("--compare runs every method; leave out --method")
    hf = read_hf_config(args.model)
    vocab = family_for_hf(hf).config_cls.from_hf(hf).vocab_size
    method = args.method or "gptq"
    needs_calib = args.compare or get_method(method).needs_calibration
    calib, held, source = _texts(args, vocab, needs_calib, not args.no_report)
    print(source, file=sys.stderr)
    if held is not None:
        seq = min(args.calib_len, len(held) - 1)
        if seq < 2:
            raise LmzooError(f"the held-out text has {len(held)} tokens; perplexity needs more "
                             "(give --eval or a longer --calib)")
    out = Path(args.out)
    variants, skipped = [], []
    if args.compare:
        for m, kw in COMPARE:
            bits = kw.get("bits") or get_method(m).default_bits
            try:
                model, spec = _quantize(args, m, kw.get("bits"), kw.get("group_size", DEFAULT), {}, calib)
            except LmzooError as e:  # a method that cannot run here: named with its reason, the rest go on
                name = variant_name(m, bits, kw.get("group_size", get_method(m).default_group))
                print(f"skipping {name}: {e}", file=sys.stderr)
                skipped.append({"name": name, "skipped": str(e)})
                continue
            name = variant_name(m, spec["bits"], spec["group_size"])
            _save(args, model, out / name)
            variants.append((name, out / name))
    else:
        bits, group, options = args.bits, _group(args.group_size), _options(args)
        model, spec = _quantize(args, method, bits, group, options, calib)
        _save(args, model, out)
        variants = [(variant_name(method, spec["bits"], spec["group_size"], sep=" "), out)]
    if args.no_report:
        return 0
    rows = []
    for name, path in [("float32", Path(args.model))] + variants:
        print(f"measuring {name} ...", file=sys.stderr)
        try:
            rows.append({"name": name, **measure(path, held, seq_len=seq, max_windows=args.eval_windows,
                                                 new_tokens=args.new_tokens, threads=args.threads or None)})
        except LmzooError as e:
            if not args.compare or name == "float32":
                raise
            print(f"skipping {name}: {e}", file=sys.stderr)
            skipped.append({"name": name, "skipped": str(e)})
    rows = add_ratios(rows) + skipped
    md = table(rows) + f"\n\n{source[0].upper()}{source[1:]}."
    print(md)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "quant_report"
    report.with_suffix(".md").write_text(md + "\n")
    report.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    figure(rows, report.with_suffix(".png"), f"{Path(args.model).name}: original vs quantized")
    print(f"\nwrote {report}.md, .json, .png")
    return 0
