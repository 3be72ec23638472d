"""Quantize a checkpoint directory, save it, and report original against quantized.

  lmzoo quantize --model DIR --method gptq --bits 4 --group-size 128 --calib text.txt --out DIR-gptq
  lmzoo quantize --model DIR --compare --calib text.txt --out reports/   # every method side by side

--calib FILE is text (any extension but .npy/.ids), tokenized with the model directory's tokenizer,
or token ids: .npy (an integer array) or .ids (integers separated by whitespace). Its first 90% of
tokens calibrate GPTQ and AWQ (--n-calib windows of --calib-len tokens at seeded random offsets);
the last 10% are the held-out text for perplexity, unless --eval FILE gives that separately.
--group-size takes a number or "none" (one scale per output channel); --bits and --group-size
default to the method's own (4 / 128; NF4 blocks of 64; LLM.int8 is 8-bit per row).

The report (table on stdout, quant_report.{md,json,png} in --out) measures each model in a fresh
process: held-out perplexity, bytes of the decoder linears (and their ratio to the ideal: bits per
weight plus scales and zeros), peak resident memory of that process, greedy decode tokens/s.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

import lmzoo
from lmzoo.errors import LmzooError
from lmzoo.interop.checkpoint import read_hf_config
from lmzoo.models.registry import family_for_hf
from lmzoo.quant import METHODS, quantize
from lmzoo.quant.registry import DEFAULT, make_spec
from lmzoo.quant.report import add_ratios, figure, measure, table

HELP = "quantize a checkpoint (rtn, gptq, awq, int8, nf4) and report quality, size, memory and speed"
COMPARE = [("rtn-w4g128", "rtn", {}), ("gptq-w4g128", "gptq", {}), ("awq-w4g128", "awq", {}), ("nf4", "nf4", {}),
           ("rtn-w8", "rtn", {"bits": 8, "group_size": None}), ("llm.int8", "int8", {})]


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    p.add_argument("--method", help=f"one of {', '.join(sorted(METHODS))} (default gptq)")
    p.add_argument("--bits", type=int, help="bit width (default: the method's)")
    p.add_argument("--group-size", help='weights per scale, or "none" for one per output channel (default: the method\'s)')
    p.add_argument("--calib", required=True, help="calibration text (or .npy / .ids token ids); see above")
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
        try:
            ids = torch.tensor([int(t) for t in f.read_text().split()], dtype=torch.long)
        except ValueError as e:
            raise LmzooError(f"{path}: a .ids file holds integers separated by whitespace ({e})") from e
    else:
        ids = torch.tensor(_tokenizer(model_dir, path).encode(f.read_text(encoding="utf-8")), dtype=torch.long)
    if ids.numel() == 0:
        raise LmzooError(f"{path}: holds no tokens; calibration and evaluation need text")
    return ids


def _tokenizer(model_dir: str, path: str):
    try:
        return lmzoo.load_tokenizer(model_dir)
    except LmzooError as e:
        raise LmzooError(f"{path} is text, but the model directory has no tokenizer lmzoo can read ({e}); "
                         "give token ids as .npy or .ids instead") from e


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


def _quantize_to(args, method: str, bits, group, options: dict, calib, out: Path) -> None:
    make_spec(method, bits, group, **dict(options))  # a bad request fails before the model loads
    model = lmzoo.load(args.model, dtype="float32")
    print(f"quantizing {args.model} with {method} -> {out}", file=sys.stderr)
    quantize(model, method, bits, group, calib, progress=True, **options)
    lmzoo.save(model, out)
    tok = Path(args.model) / "tokenizer.json"
    if tok.exists():
        shutil.copy(tok, out / "tokenizer.json")


def run(args) -> int:
    if not (Path(args.model) / "config.json").exists():
        raise LmzooError(f"--model {args.model}: not a checkpoint directory (no config.json)")
    hf = read_hf_config(args.model)
    vocab = family_for_hf(hf).config_cls.from_hf(hf).vocab_size
    ids = read_ids(args.calib, args.model)
    eval_ids = read_ids(args.eval, args.model) if args.eval else None
    calib, held = split_ids(ids, eval_ids, args.n_calib, args.calib_len, args.seed, vocab)
    seq = min(args.calib_len, len(held) - 1)
    if seq < 2:
        raise LmzooError(f"the held-out text has {len(held)} tokens; perplexity needs more (give --eval or a longer --calib)")
    out = Path(args.out)
    if args.compare:
        if args.method:
            raise LmzooError("--compare runs every method; leave out --method")
        variants = []
        for name, method, kw in COMPARE:
            try:
                _quantize_to(args, method, kw.get("bits"), kw.get("group_size", DEFAULT), {}, calib, out / name)
            except LmzooError as e:  # e.g. AWQ on layers narrower than its group: note it, go on
                print(f"skipping {name}: {e}", file=sys.stderr)
                continue
            variants.append((name, out / name))
    else:
        method = args.method or "gptq"
        bits, group, options = args.bits, _group(args.group_size), _options(args)
        _quantize_to(args, method, bits, group, options, calib, out)
        spec = make_spec(method, bits, group, **options)[1]
        label = f"{method} w{spec['bits']}" + (f"g{spec['group_size']}" if spec["group_size"] else "")
        variants = [(label, out)]
    if args.no_report:
        return 0
    rows = []
    for name, path in [("float32", Path(args.model))] + variants:
        print(f"measuring {name} ...", file=sys.stderr)
        rows.append({"name": name, **measure(path, held, seq_len=seq, max_windows=args.eval_windows,
                                             new_tokens=args.new_tokens, threads=args.threads or None)})
    add_ratios(rows)
    md = table(rows)
    print(md)
    report = out / "quant_report"
    report.with_suffix(".md").write_text(md + "\n")
    report.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    png = figure(rows, report.with_suffix(".png"), f"{Path(args.model).name}: original vs quantized")
    print(f"\nwrote {report}.md, .json" + (", .png" if png else " (no PNG: matplotlib is not installed)"))
    return 0
