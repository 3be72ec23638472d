"""The built-in shapes: seeded, captions that say what is drawn, the held-out split, the word vocabulary."""

import math

import pytest
import torch

from lmzoo.vision import shapes


def test_same_seed_same_data_and_captions_match_the_pixels():
    a = shapes.sample(40, torch.Generator().manual_seed(3))
    b = shapes.sample(40, torch.Generator().manual_seed(3))
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert a.images.shape == (40, 3, 32, 32) and a.images.dtype == torch.uint8
    names, places = list(shapes.COLOURS), list(shapes.PLACES)
    for i, cap in enumerate(a.captions):
        colour, shape = names[a.colours[i]], shapes.SHAPES[a.shapes[i]]
        assert cap.startswith(f"a {colour} {shape}")
        assert cap == f"a {colour} {shape}" or cap.endswith(shapes.PLACES[places[a.places[i]]][0])
        # the pixel at the shape's nominal place carries its colour (±20 jitter, ±5% placement)
        _, fx, fy = shapes.PLACES[places[a.places[i]]]
        if shape in ("circle", "square", "diamond", "cross"):  # filled at the centre
            px = a.images[i, :, int(fy * 32), int(fx * 32)].float()
            assert (px - torch.tensor(shapes.COLOURS[colour], dtype=torch.float32)).abs().max() <= 21, cap
    assert shapes.sample(5, torch.Generator().manual_seed(4)).captions != a.captions[:5]


def test_shape_areas():
    """Drawn on a large canvas, each mask has the area its formula gives (in units of the radius²)."""
    n = 801
    c = torch.linspace(-1.5, 1.5, n)
    dy, dx = torch.meshgrid(c, c, indexing="ij")
    area = shapes._shape_masks(dx[None], dy[None]).float().mean(dim=(1, 2, 3)) * 9  # canvas 3x3
    # disk r=1; square of side 1.8; triangle of height 1.8, half-base 0.62·1.8; diamond |x|+|y| <= 1.15;
    # two 0.64 x 2 bars crossing
    expected = [math.pi, 1.8 ** 2, 1.8 * (0.62 * 1.8), 2 * 1.15 ** 2, 2 * (0.64 * 2) - 0.64 ** 2]
    assert torch.allclose(area, torch.tensor(expected), rtol=0.02), (area, expected)


def test_held_out_split():
    assert len(shapes.all_combos()) == 50 and len(shapes.train_combos()) == 45
    assert {s for _, s in shapes.HELD_OUT} == set(shapes.SHAPES)  # one pair out per shape
    for colour, shape in shapes.HELD_OUT:  # every word of a held-out pair is still seen in training
        assert any(c == colour for c, _ in shapes.train_combos()) and any(s == shape for _, s in shapes.train_combos())
    s = shapes.sample(200, torch.Generator().manual_seed(0), combos=shapes.train_combos(), distinct=True)
    pairs = list(zip(s.colours.tolist(), s.shapes.tolist()))
    assert len(set(pairs[:45])) == 45 and len(set(pairs[45:90])) == 45  # each round of 45 once


def test_word_vocab():
    v = shapes.WordVocab()
    ids, mask = v.encode(["a red circle", "a blue cross on the left"], max_len=8)
    assert ids[0, 0] == v.bos_id and ids[0, 4] == v.eos_id and ids[0, 5:].eq(v.pad_id).all()
    assert mask.sum(1).tolist() == [5, 8] and v.eos_id == len(v) - 1 and v.bos_id == len(v) - 2
    with pytest.raises(ValueError, match="'dog'"):
        v.encode(["a red dog"])
    with pytest.raises(ValueError, match="longer than max_len=4"):
        v.encode(["a red circle on the left"], max_len=4)
