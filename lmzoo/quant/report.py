"""Original against quantized: perplexity on held-out ids, weight bytes, peak memory, decode tokens/s.

``measure`` evaluates one model directory in a fresh process (``python -m lmzoo.quant.report``), so
that the peak resident memory it reports (the kernel's high-water mark, reset after the imports)
belongs to that model alone: loading it, the perplexity pass and the decode. "RSS added" is that
peak minus the resident memory before loading (Python and torch themselves take ~300 MiB). A child
that fails is reported by ``run_child`` with its exit status or the signal that killed it and the end
of its stderr (it runs with ``-X faulthandler``, so a crash in a kernel still names the Python line).
``table`` and ``figure`` lay several such results side by side (the ``lmzoo quantize`` report and
benchmarks/bench_quant.py); a row with a ``skipped`` reason is listed under the table, and so is a
variant that kept linears in float because its layout could not pack their widths (``kept_in_float``,
the line ``quantize`` printed, read back from the checkpoint's ``quantization_config.meta``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lmzoo.errors import LmzooError
from lmzoo.quant.calibrate import decoder_layers
from lmzoo.quant.linear import QuantLinear, set_kernel


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 128, max_windows: int | None = None) -> float:
    """exp(mean next-token NLL) over consecutive, non-overlapping windows of ``seq_len`` tokens."""
    ids = ids.reshape(-1)
    n = (len(ids) - 1) // seq_len
    if max_windows:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"perplexity needs more than {seq_len} tokens, got {len(ids)}")
    windows = ids[: n * seq_len].view(n, seq_len)  # (n, seq_len)
    nll, count = 0.0, 0
    for chunk in windows.split(16):
        logits = model(chunk).logits[:, :-1].float()  # (b, T-1, V)
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                       reduction="sum"))
        count += chunk[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def kl_divergence(ref: nn.Module, model: nn.Module, ids: torch.Tensor, seq_len: int = 128,
                  max_windows: int | None = None) -> float:
    """Mean KL(ref || model) of the next-token distributions over the same windows as ``perplexity``.
    Unlike a perplexity difference it has no first-order term in the weight error, so it ranks
    quantizers steadily even when they cost little."""
    ids = ids.reshape(-1)
    n = (len(ids) - 1) // seq_len
    n = min(n, max_windows) if max_windows else n
    total, count = 0.0, 0
    for chunk in ids[: n * seq_len].view(n, seq_len).split(16):
        p = torch.log_softmax(ref(chunk).logits.float(), -1)
        q = torch.log_softmax(model(chunk).logits.float(), -1)
        total += float((p.exp() * (p - q)).sum(-1).sum())
        count += chunk.numel()
    return total / count


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of the decoder layers' linear weights as stored, and the ideal for their bit width
    (bits · weights, plus scales and zero points); float linears count at their dtype."""
    stored = ideal = 0.0
    for layer in decoder_layers(model):
        for m in layer.modules():
            if isinstance(m, QuantLinear):
                stored += m.weight_bytes()
                ideal += m.ideal_bytes()
            elif type(m) is nn.Linear:
                stored += m.weight.numel() * m.weight.element_size()
                ideal += m.weight.numel() * m.weight.element_size()
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {"linear_bytes": int(stored), "ideal_bytes": ideal, "ratio_to_ideal": stored / ideal if ideal else float("nan"),
            "model_bytes": int(total)}


@torch.no_grad()
def decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 5) -> float:
    """Tokens/s of greedy ``lmzoo.generate`` at batch 1 (prefill included), the fastest of ``repeats``
    calls after one warmup: on a shared machine the fastest call is the one least disturbed."""
    import lmzoo

    lmzoo.generate(model, prompt, max_new_tokens=min(4, new_tokens))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lmzoo.generate(model, prompt, max_new_tokens=new_tokens)
        times.append(time.perf_counter() - t0)
    return new_tokens / min(times)


def _hwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def measure_here(model_dir: str, ids_file: str, seq_len: int, max_windows: int | None, new_tokens: int,
                 threads: int | None, kernel: str = "auto") -> dict:
    """In this process: load, perplexity, weight bytes, decode speed, peak RSS since the imports."""
    import lmzoo

    if threads:
        torch.set_num_threads(threads)
    try:  # reset the high-water mark so the imports above do not count (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base = _hwm_kib()
    model = lmzoo.load(model_dir, dtype="float32")
    set_kernel(model, kernel)
    ids = torch.load(ids_file) if ids_file.endswith(".pt") else torch.tensor(json.loads(Path(ids_file).read_text()))
    ppl = perplexity(model, ids, seq_len, max_windows)
    tps = decode_speed(model, ids[:16][None], new_tokens)
    peak = _hwm_kib()
    kept = (getattr(model, "quantization_config", None) or {}).get("meta", {}).get("kept_in_float")
    return {"perplexity": ppl, **weight_bytes(model), "decode_tokens_per_s": tps,
            "peak_rss_mib": peak / 1024 if peak else None,
            "rss_added_mib": (peak - base) / 1024 if peak and base else None,
            **({"kept_in_float": kept} if kept else {})}


def exit_reason(returncode: int) -> str:
    """"exited with status 1", or "killed by signal 11 (SIGSEGV)" for a negative return code."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "unknown signal"
    return f"killed by signal {-returncode} ({name})"


def stderr_summary(stderr: str, max_lines: int = 4, max_chars: int = 600) -> str:
    """The informative end of a child's stderr on one line: a faulthandler report's first lines (the
    innermost frames), else the last lines (a traceback's last frame and its exception)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "(empty)"
    fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), None)
    keep = lines[fatal:fatal + max_lines] if fatal is not None else lines[-max_lines:]
    text = " | ".join(keep)
    return text if len(text) <= max_chars else "..." + text[-max_chars:]


def run_child(args: list[str], what: str, env: dict | None = None) -> str:
    """Run ``args``; its stdout, or an ``LmzooError`` saying how ``what`` failed and what it printed."""
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise LmzooError(f"{what} failed: {exit_reason(proc.returncode)}; stderr: {stderr_summary(proc.stderr)}")
    return proc.stdout


def measure(model_dir: str | Path, ids: torch.Tensor, *, seq_len: int = 128, max_windows: int | None = None,
            new_tokens: int = 32, threads: int | None = None, kernel: str = "auto",
            workdir: str | Path | None = None) -> dict:
    """``measure_here`` in a fresh Python process; returns its JSON."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        ids_file = str(Path(tmp) / "ids.json")
        Path(ids_file).write_text(json.dumps(ids.reshape(-1).tolist()))
        args = [sys.executable, "-X", "faulthandler", "-m", "lmzoo.quant.report", str(model_dir), ids_file,
                str(seq_len), str(max_windows or 0), str(new_tokens), str(threads or 0), kernel]
        out = run_child(args, f"measuring {model_dir}", env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = out.strip().splitlines()
    if not lines:
        raise LmzooError(f"measuring {model_dir} failed: the child printed no result")
    return json.loads(lines[-1])


COLUMNS = [("perplexity", "held-out perplexity", "{:.3f}"), ("ppl_change", "Δ perplexity", "{:+.2%}"),
           ("kl", "KL from float", "{:.5f}"),
           ("linear_mib", "linear weights (MiB)", "{:.3f}"), ("ratio_to_ideal", "stored / ideal", "{:.3f}"),
           ("peak_rss_mib", "peak RSS (MiB)", "{:.0f}"), ("rss_added_mib", "RSS added (MiB)", "{:.1f}"), ("decode_tokens_per_s", "decode tok/s (b=1)", "{:.1f}"),
           ("speed_ratio", "speed vs float", "{:.2f}×")]


def add_ratios(rows: list[dict]) -> list[dict]:
    """Fill in change of perplexity and speed against the first row (the float model)."""
    ref = rows[0]
    for r in rows:
        if r.get("skipped"):
            continue
        r["ppl_change"] = r["perplexity"] / ref["perplexity"] - 1
        r["speed_ratio"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
        r["linear_mib"] = r["linear_bytes"] / 2**20
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table of the measured rows; rows with a ``skipped`` reason are listed below it."""
    skipped = [r for r in rows if r.get("skipped")]
    rows = [r for r in rows if not r.get("skipped")]
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    head = ["variant"] + [title for _, title, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = [r["name"]] + [fmt.format(r[k]) if r.get(k) is not None else "–" for k, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    kept = [r for r in rows if r.get("kept_in_float")]
    if kept:  # linears a layout could not pack (registry.unpackable)
        lines += ["", "Kept in float:"] + [f"- {r['name']}: {r['kept_in_float']}" for r in kept]
    if skipped:
        lines += ["", "Skipped:"] + [f"- {r['name']}: {r['skipped']}" for r in skipped]
    return "\n".join(lines)


def figure(rows: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Four bar charts (perplexity, weight MiB, peak RSS, decode tok/s) of the measured rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("skipped")]
    names = [r["name"] for r in rows]
    panels = [("perplexity", "held-out perplexity (lower is better)"), ("linear_mib", "decoder linear weights, MiB"),
              ("rss_added_mib", "RSS the model added (load + eval), MiB"), ("decode_tokens_per_s", "decode tokens/s, batch 1")]
    fig, axes = plt.subplots(1, 4, figsize=(4.2 * 4, 3.8))
    palette = [plt.cm.tab20(i) for i in range(20) if i not in (14, 15)]  # tab20 without its greys
    colors = ["#555555"] + [palette[i % len(palette)] for i in range(len(rows) - 1)]
    for ax, (key, label) in zip(axes, panels):
        vals = [r.get(key) or 0 for r in rows]
        ax.bar(range(len(rows)), vals, color=colors)
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        if key == "perplexity":
            lo = min(vals)
            ax.set_ylim(lo * 0.97, max(vals) * 1.01)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


if __name__ == "__main__":
    d, f, seq, windows, new, threads, kern = sys.argv[1:8]
    result = measure_here(d, f, int(seq), int(windows) or None, int(new), int(threads) or None, kern)
    print(json.dumps(result))
