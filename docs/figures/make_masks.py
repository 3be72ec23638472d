"""Redraw docs/figures/decoder_masks.png: python docs/figures/make_masks.py (needs matplotlib).

The three shapes of the notes, from the same ``build_mask`` the models use: a causal decoder, a
prefix decoder (prefix 4 of 8), and an encoder-decoder (4 input, 4 output tokens), whose attention
is two matrices: the encoder's bidirectional self-attention, and each decoder token's view of
[all encoder outputs | earlier decoder tokens].
"""

from pathlib import Path

import torch

from lmzoo.cli.masks import draw
from lmzoo.nn.masks import build_mask

HERE = Path(__file__).parent


def decoder_masks(path: Path = HERE / "decoder_masks.png", n: int = 8, prefix: int = 4) -> Path:
    enc, dec = prefix, n - prefix
    # (dec, enc + dec): every encoder output, then the decoder's own earlier tokens
    decoder_view = torch.cat([build_mask("cross", dec, enc)[0, 0], build_mask("causal", dec)[0, 0]], dim=1)
    panels = [(build_mask("causal", n)[0, 0], "causal decoder (GPT, LLaMA)"),
              (build_mask("prefix", n, prefix_len=prefix)[0, 0], f"prefix decoder (GLM), prefix {prefix}"),
              (build_mask("bidirectional", enc)[0, 0], "encoder-decoder (T5): encoder"),
              (decoder_view, "encoder-decoder (T5): decoder")]
    draw(panels, path, xlabels=["key j", "key j", "encoder key", f"encoder key 0-{enc - 1} | decoder key 0-{dec - 1}"])
    return path


if __name__ == "__main__":
    print(decoder_masks())
