"""Print (and draw) attention masks: rows are queries, columns are keys, 1 = may attend.

    lmzoo masks --kind prefix --len 10 --prefix 4 --png prefix.png
    lmzoo masks --kind causal prefix cross --len 8 --prefix 3      # side by side
    lmzoo masks --kind packed --len 10 --docs 4,3,3
    lmzoo masks --kind padding --len 8 --pad 3

Every matrix comes from ``lmzoo.nn.masks.build_mask``, the builder the models use. ``--png``
is drawn with matplotlib (a dependency of lmzoo).
"""

from __future__ import annotations

import torch

from lmzoo.errors import LmzooError
from lmzoo.nn.masks import MASK_KINDS, build_mask

HELP = "print or draw an attention mask (causal, bidirectional, prefix, cross, padding, packed)"


def add_arguments(p) -> None:
    p.add_argument("--kind", nargs="+", default=["causal"], choices=sorted(MASK_KINDS), metavar="KIND",
                   help=f"one or more of {', '.join(sorted(MASK_KINDS))}; several are drawn side by side "
                        "(default causal)")
    p.add_argument("--len", type=int, default=10, dest="length", help="number of query tokens (default 10)")
    p.add_argument("--k-len", type=int, default=None, help="number of keys for 'cross' (encoder tokens; default --len)")
    p.add_argument("--prefix", type=int, default=4, help="prefix length for 'prefix' (default 4)")
    p.add_argument("--pad", type=int, default=None,
                   help="left-padding tokens, removed as keys from any kind ('padding' defaults to len/3)")
    p.add_argument("--docs", default=None, help="document lengths for 'packed', e.g. 4,3,3 (default: three parts)")
    p.add_argument("--png", default=None, help="also draw the matrices into this PNG file (needs matplotlib)")


def _docs(spec: str | None, length: int) -> torch.Tensor:
    if spec is None:
        sizes = [length // 3 + (i < length % 3) for i in range(3)]
    else:
        try:
            sizes = [int(s) for s in spec.split(",")]
        except ValueError as e:
            raise LmzooError(f"--docs '{spec}': expected comma-separated lengths such as 4,3,3") from e
    if sum(sizes) != length or min(sizes) <= 0:
        raise LmzooError(f"--docs {sizes}: positive lengths that add up to --len {length} expected")
    return torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])[None]  # (1, T)


def matrix(kind: str, length: int, k_len: int | None = None, prefix: int = 4, pad: int | None = None,
           docs: str | None = None) -> tuple[torch.Tensor, str]:
    """The (Tq, Tk) boolean mask of one kind for one row, and a title saying what was asked."""
    if length <= 0:
        raise LmzooError(f"--len must be positive, got {length}")
    k_len = (k_len or length) if kind == "cross" else length
    pad = (max(1, length // 3) if kind == "padding" else 0) if pad is None else pad
    if not 0 <= pad < k_len:
        raise LmzooError(f"--pad {pad}: between 0 and {k_len - 1} left-pad tokens expected")
    am = torch.tensor([[0] * pad + [1] * (k_len - pad)]) if pad else None
    title = f"{kind} (len {length}"
    kw: dict = {"attention_mask": am}
    if kind == "prefix":
        if not 0 <= prefix <= length:
            raise LmzooError(f"--prefix {prefix}: between 0 and --len {length} expected")
        kw["prefix_len"], title = prefix, title + f", prefix {prefix}"
    if kind == "cross":
        title += f", {k_len} encoder keys"
    if kind == "packed":
        kw["doc_ids"] = _docs(docs, length)
        title += ", docs " + ",".join(str(int(n)) for n in kw["doc_ids"][0].bincount())
    title += f", {pad} pad)" if pad else ")"
    return build_mask(kind, length, k_len, **kw)[0, 0], title


def as_text(mask: torch.Tensor, title: str) -> str:
    Tq, Tk = mask.shape
    w = len(str(max(Tq, Tk) - 1))
    lines = [title + "   rows: queries, columns: keys, 1 = may attend",
             " " * (w + 2) + " ".join(f"{j:>{w}}" for j in range(Tk))]
    lines += [f"{i:>{w}}  " + " ".join(f"{'1' if v else '.':>{w}}" for v in row) for i, row in enumerate(mask.tolist())]
    return "\n".join(lines)


def draw(panels: list[tuple[torch.Tensor, str]], path, *, xlabels: list[str] | None = None) -> None:
    """Panels side by side: a filled cell where the query (row) may attend to the key (column)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError as e:
        raise LmzooError("--png needs matplotlib, a dependency of lmzoo that does not import here: pip install matplotlib") from e
    widths = [m.shape[1] for m, _ in panels]  # equal cells across panels of different widths
    size = 0.34 * max(8, max(m.shape[0] for m, _ in panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(0.34 * sum(widths) + 0.9 * len(panels) + 0.6, size + 1.1),
                             squeeze=False, gridspec_kw={"width_ratios": widths})
    for n, (ax, (mask, title)) in enumerate(zip(axes[0], panels)):
        Tq, Tk = mask.shape
        ax.imshow(mask.int().numpy(), cmap=ListedColormap(["#f4f4f4", "#2b6cb0"]), vmin=0, vmax=1)
        ax.set_xticks(range(Tk)), ax.set_yticks(range(Tq))
        ax.set_xticks([x - 0.5 for x in range(Tk + 1)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(Tq + 1)], minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="both", length=0, labelsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabels[n] if xlabels else "key j", fontsize=8)
        ax.set_ylabel("query i", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    panels = [matrix(k, args.length, args.k_len, args.prefix, args.pad, args.docs) for k in args.kind]
    print("\n\n".join(as_text(m, t) for m, t in panels))
    if args.png:
        draw(panels, args.png)
        print(f"wrote {args.png}")
    return 0
