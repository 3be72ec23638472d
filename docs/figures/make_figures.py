"""Redraw the figures in docs/: python docs/figures/make_figures.py (needs matplotlib)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lmzoo.nn.position import ALiBi, RopeConfig, RotaryEmbedding  # noqa: E402

HERE = Path(__file__).parent


def rope_scaling(path: Path = HERE / "rope_scaling.png") -> Path:
    scalings = {
        "default": {},
        "linear (×4)": ("linear", {"factor": 4.0}),
        "dynamic NTK (×4, at 4L₀)": ("dynamic", {"factor": 4.0}),
        "llama3 (×8)": ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}),
        "yarn (×4)": ("yarn", {"factor": 4.0, "original_max_position_embeddings": 8192}),
    }
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, spec in scalings.items():
        kind, params = spec if spec else ("default", {})
        rope = RotaryEmbedding(128, RopeConfig(theta=500000.0, scaling_type=kind, scaling=params, max_positions=8192))
        inv = rope._inv_freq(4 * 8192)
        ax.semilogy(range(len(inv)), 2 * torch.pi / inv, label=label)
    ax.axhline(8192, color="gray", ls=":", lw=1)
    ax.set(xlabel="frequency index i (pair of channels)", ylabel="wavelength (tokens)",
           title="RoPE wavelengths per channel pair (d_head 128, θ=500k, L₀=8192)")
    ax.legend(fontsize=8)
    bias = ALiBi(8)(torch.arange(16)[None], torch.arange(16)[None])[0]
    im = ax2.imshow(torch.where(torch.ones(16, 16).tril().bool(), bias[1], torch.nan), cmap="viridis")
    ax2.set(title="ALiBi bias of head 2 of 8 (slope 1/4), causal", xlabel="key j", ylabel="query i")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    print(rope_scaling())
