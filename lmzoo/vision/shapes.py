"""Built-in vision data: coloured shapes at places, with captions, drawn on the fly from a seed.

    image    a shape (circle, square, triangle, diamond, cross) in one of ten colours (red, orange,
             yellow, green, cyan, blue, purple, pink, white, brown) on a noisy grey background, at one
             of five places (left, right, top, bottom, centre); size, exact place and shade jittered,
             edges anti-aliased
    caption  "a red circle on the left" / "a blue cross at the top" / "a green square in the centre",
             or without the place ("a red circle") half of the time, so that the zero-shot prompts
             "a {colour} {shape}" are sentences of the training distribution

``HELD_OUT`` keeps five of the 50 colour/shape pairs out of training, one per shape (red circle,
yellow square, cyan triangle, purple diamond, white cross): a model trained on the other 45 has seen
every word, every colour and every shape, each shape in nine colours, but never these pairs, which
is what zero-shot classification over them measures. (With two pairs out per shape, ten in all, the
demo's tiny CLIP needs about twice the steps and varies more between seeds; docs/clip.md.)

Captions are tokenised by ``WordVocab``: one id per word of the generator's own vocabulary, 0 = pad,
then BOS and EOS as the two highest ids (so CLIP's "read at EOS" rule and its older "read at the
highest id" rule agree). It exists for this demo; real text goes through lmzoo.tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COLOURS = {"red": (220, 45, 45), "orange": (245, 140, 30), "yellow": (235, 220, 50), "green": (50, 185, 70),
           "cyan": (60, 210, 220), "blue": (55, 85, 230), "purple": (150, 65, 210), "pink": (245, 135, 200),
           "white": (235, 235, 235), "brown": (145, 85, 40)}
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
PLACES = {"left": ("on the left", 0.34, 0.5), "right": ("on the right", 0.66, 0.5), "top": ("at the top", 0.5, 0.34),
          "bottom": ("at the bottom", 0.5, 0.66), "centre": ("in the centre", 0.5, 0.5)}  # phrase, x, y (fractions)
# (colour, shape) pairs never shown in training: shape i with colour 2i
HELD_OUT = [(list(COLOURS)[2 * i], shape) for i, shape in enumerate(SHAPES)]


def all_combos() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def train_combos() -> list[tuple[str, str]]:
    return [p for p in all_combos() if p not in HELD_OUT]


def _shape_masks(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """(B, S, S) offsets from each shape's centre in units of its radius -> (n_shapes, B, S, S) masks."""
    ax, ay = dx.abs(), dy.abs()
    return torch.stack([
        dx * dx + dy * dy <= 1.0,  # circle
        torch.maximum(ax, ay) <= 0.9,  # square
        (dy <= 0.8) & (dy >= -1.0) & (ax <= 0.62 * (dy + 1.0)),  # triangle, apex up
        ax + ay <= 1.15,  # diamond
        ((ax <= 0.32) & (ay <= 1.0)) | ((ay <= 0.32) & (ax <= 1.0)),  # cross
    ])


def render(colours: torch.Tensor, shapes: torch.Tensor, places: torch.Tensor, size: int,
           g: torch.Generator) -> torch.Tensor:
    """(B,) indices into COLOURS, SHAPES, PLACES -> (B, 3, size, size) uint8 images. Edges are anti-aliased:
    each shape is drawn at twice the resolution and each pixel gets the fraction of it that is covered."""
    B = colours.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    place_xy = torch.tensor([(x, y) for _, x, y in PLACES.values()])  # (n_places, 2)
    centre = (place_xy[places] + (u(B, 2) - 0.5) * 0.1) * size  # (B, 2) pixels, jittered ±5%
    radius = size * (0.26 + 0.06 * u(B))  # (B,)
    coords = (torch.arange(2 * size, dtype=torch.float32) + 0.5) / 2  # sub-pixel centres
    dx = (coords[None, None, :] - centre[:, 0, None, None]) / radius[:, None, None]  # (B, 2S, 2S)
    dy = (coords[None, :, None] - centre[:, 1, None, None]) / radius[:, None, None]  # (B, 2S, 2S)
    fine = _shape_masks(dx, dy)[shapes, torch.arange(B)].float()  # (B, 2S, 2S)
    cover = torch.nn.functional.avg_pool2d(fine[:, None], 2)  # (B, 1, S, S) fraction of each pixel covered
    rgb = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[colours]  # (B, 3)
    rgb = (rgb + (u(B, 3) - 0.5) * 40).clamp(0, 255)[:, :, None, None]  # shade jitter ±20 per channel
    grey = 40 + 60 * u(B, 1, 1, 1)  # (B, 1, 1, 1) background level
    background = grey + (u(B, 1, size, size) - 0.5) * 24  # (B, 1, S, S) noisy grey
    img = cover * rgb + (1 - cover) * background  # (B, 3, S, S)
    return img.round().clamp(0, 255).to(torch.uint8)


@dataclass
class Sample:
    images: torch.Tensor  # (B, 3, S, S) uint8
    colours: torch.Tensor  # (B,) indices into COLOURS
    shapes: torch.Tensor  # (B,) indices into SHAPES
    places: torch.Tensor  # (B,) indices into PLACES
    captions: list[str]

    @property
    def labels(self) -> torch.Tensor:
        """(B,) colour/shape class, colour-major: the index into ``all_combos()``."""
        return self.colours * len(SHAPES) + self.shapes


def caption(colour: str, shape: str, place: str | None) -> str:
    return f"a {colour} {shape}" + (f" {PLACES[place][0]}" if place is not None else "")


def sample(n: int, g: torch.Generator, size: int = 32, combos: list[tuple[str, str]] | None = None,
           place_prob: float = 0.5, distinct: bool = False) -> Sample:
    """n images drawn uniformly over ``combos`` (default: all) and the five places; a caption names the
    place with probability ``place_prob``. ``distinct``: the pairs are shuffled rounds of ``combos``, so
    no pair repeats within n <= len(combos) (a contrastive batch then has no two images of one pair)."""
    combos = combos or all_combos()
    names, places = list(COLOURS), list(PLACES)
    if distinct:
        rounds = -(-n // len(combos))
        pick = torch.cat([torch.randperm(len(combos), generator=g) for _ in range(rounds)])[:n]
    else:
        pick = torch.randint(len(combos), (n,), generator=g)
    colours = torch.tensor([names.index(combos[i][0]) for i in pick.tolist()], dtype=torch.long)
    shapes = torch.tensor([SHAPES.index(combos[i][1]) for i in pick.tolist()], dtype=torch.long)
    where = torch.randint(len(places), (n,), generator=g)
    say = torch.rand(n, generator=g) < place_prob
    images = render(colours, shapes, where, size, g)
    caps = [caption(names[c], SHAPES[s], places[p] if k else None)
            for c, s, p, k in zip(colours.tolist(), shapes.tolist(), where.tolist(), say.tolist())]
    return Sample(images, colours, shapes, where, caps)


class WordVocab:
    """Word-level ids for the generator's sentences: 0 = pad, words, then BOS, EOS (the highest id)."""

    def __init__(self, words: list[str] | None = None):
        if words is None:
            words = ["a", *COLOURS, *SHAPES, *sorted({w for phrase, _, _ in PLACES.values() for w in phrase.split()})]
        self.words = ["<pad>", *words, "<bos>", "<eos>"]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.bos_id, self.eos_id = 0, len(self.words) - 2, len(self.words) - 1

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, texts: list[str], max_len: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, max_len) as [BOS] words [EOS] [pad]..., attention mask (B, max_len); right padding."""
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            try:
                toks = [self.bos_id, *(self.ids[w] for w in text.lower().split()), self.eos_id]
            except KeyError as e:
                raise ValueError(f"word {e} of '{text}' is not in the vocabulary {self.words[1:-2]}") from None
            if len(toks) > max_len:
                raise ValueError(f"'{text}' is {len(toks)} tokens with BOS/EOS, longer than max_len={max_len}")
            ids[row, :len(toks)] = torch.tensor(toks)
        return ids, (ids != self.pad_id).long()
