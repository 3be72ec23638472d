"""``lmzoo masks``: the printed matrix is the builder's, cell by cell; --png draws one panel per kind."""

import pytest

from lmzoo.cli.main import main


def _matrix(text: str) -> list[list[int]]:
    """The 0/1 rows of the first matrix printed (title line, header line, then one line per query)."""
    lines = text.strip().split("\n\n")[0].splitlines()[2:]
    return [[1 if c == "1" else 0 for c in line.split()[1:]] for line in lines]


def test_prefix_text(capsys):
    assert main(["masks", "--kind", "prefix", "--len", "5", "--prefix", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("prefix (len 5, prefix 2)")
    assert _matrix(out) == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_padding_packed_and_cross_text(capsys):
    assert main(["masks", "--kind", "padding", "--len", "4", "--pad", "1"]) == 0
    assert _matrix(capsys.readouterr().out) == [[0, 1, 1, 1]] * 4
    assert main(["masks", "--kind", "packed", "--len", "5", "--docs", "2,3"]) == 0
    assert _matrix(capsys.readouterr().out) == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                                               [0, 0, 1, 1, 1]]
    assert main(["masks", "--kind", "cross", "--len", "2", "--k-len", "3"]) == 0
    assert _matrix(capsys.readouterr().out) == [[1, 1, 1], [1, 1, 1]]


def test_bad_values_are_reported(capsys):
    assert main(["masks", "--kind", "packed", "--len", "5", "--docs", "2,2"]) == 1
    assert "add up to --len 5" in capsys.readouterr().err
    assert main(["masks", "--kind", "prefix", "--len", "5", "--prefix", "9"]) == 1
    assert "--prefix 9" in capsys.readouterr().err


def test_png_has_one_panel_per_kind(tmp_path, capsys):
    plt_image = pytest.importorskip("matplotlib.image")
    out = tmp_path / "m.png"
    assert main(["masks", "--kind", "causal", "prefix", "--len", "6", "--png", str(out)]) == 0
    img = plt_image.imread(out)  # (H, W, 4) floats
    blue = (abs(img[..., 0] - 0x2b / 255) < 0.02) & (abs(img[..., 2] - 0xb0 / 255) < 0.02)
    cols = blue.any(0).nonzero()[0]
    gaps = (cols[1:] - cols[:-1]) > 20  # the white space between the two panels
    assert gaps.sum() == 1, "expected two panels of filled cells"
    # the prefix panel (right) fills more cells than the causal one (left): 4·4+... vs a triangle
    split = cols[gaps.nonzero()[0][0]] + 1
    assert blue[:, split:].sum() > blue[:, :split].sum()
