"""CLIP's symmetric InfoNCE: a hand-computed value, transformers' clip loss on the same logits, and the logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmzoo.objectives.contrastive import clip_logits, symmetric_infonce


def test_hand_computed_two_pairs():
    # logits [[2, 0], [1, 3]]: text->image rows, image->text columns
    L = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    rows = -(2 - math.log(math.exp(2) + 1)) - (3 - math.log(math.exp(1) + math.exp(3)))
    cols = -(2 - math.log(math.exp(2) + math.exp(1))) - (3 - math.log(1 + math.exp(3)))
    assert symmetric_infonce(L).item() == pytest.approx((rows / 2 + cols / 2) / 2, abs=1e-6)


def test_perfect_and_uniform_logits():
    assert symmetric_infonce(torch.eye(4) * 100).item() < 1e-6  # each pair far above the rest: no loss
    assert symmetric_infonce(torch.zeros(5, 5)).item() == pytest.approx(math.log(5), abs=1e-6)  # chance


def test_equals_transformers_clip_loss():
    transformers = pytest.importorskip("transformers")
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    image = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(2.6592)
    logits = clip_logits(text, image, scale)
    assert torch.allclose(logits, text @ image.t() * scale.exp())
    ours, ref = symmetric_infonce(logits), image_text_contrastive_loss(logits)
    assert abs(ours.item() - ref.item()) <= 1e-6 and ours.item() > 1.0
    # symmetric: the transpose (logits_per_image) gives the same loss
    assert abs(symmetric_infonce(logits.t()).item() - ours.item()) <= 1e-6


def test_rejects_a_non_square_matrix():
    with pytest.raises(ValueError, match="square"):
        symmetric_infonce(torch.zeros(3, 4))
