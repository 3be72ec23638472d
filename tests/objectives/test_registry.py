"""Every family has its published objective; classification by hand; unknown names are refused."""

import math

import pytest
import torch

from lmzoo.errors import ConfigError
from lmzoo.models.registry import families
from lmzoo.objectives import OBJECTIVES, make_step_fn, make_transform, objective_for
from lmzoo.objectives.classification import classification_loss


def test_each_family_has_its_recipe():
    want = {"gpt2": "causal_lm", "llama": "causal_lm", "bloom": "causal_lm", "chatglm2": "causal_lm",
            "deepseek_v2": "causal_lm", "chatglm": "glm", "bert": "masked_lm", "t5": "span_corruption",
            "vit": "classification", "clip": "contrastive"}
    for name in families():
        assert objective_for(name) == want[name], name
        assert objective_for(name) in OBJECTIVES


def test_classification_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    want = (-math.log(math.e ** 2 / (math.e ** 2 + 1)) + math.log(2)) / 2
    assert classification_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(want, rel=1e-6)


def test_classification_and_contrastive_steps_run_on_their_families():
    from lmzoo.models.registry import get_family

    vit = get_family("vit")
    cfg = next(iter(vit.presets.values())).replace(d_model=32, n_layers=1, n_heads=4, d_ff=48, image_size=32,
                                                  patch_size=16, num_labels=3)
    model = vit.build(cfg).eval()
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 2])}
    loss, metrics = make_step_fn("classification")(model, batch)
    assert loss.item() == pytest.approx(model(**batch).loss.item(), rel=1e-6) and 0 <= metrics["accuracy"] <= 1


def test_unknown_names_and_missing_options():
    with pytest.raises(ConfigError, match="unknown objective 'mlm'"):
        make_step_fn("mlm")
    with pytest.raises(Exception, match="needs a mask_id"):
        make_transform("masked_lm", vocab_size=10, cls_id=1, sep_id=2)
    assert make_transform("causal_lm") is None


def test_the_recipe_is_read_from_the_family_record(monkeypatch):
    import dataclasses

    from lmzoo.models import registry

    fam = registry.get_family("vit")
    monkeypatch.setitem(registry.families(), "vit", dataclasses.replace(fam, pretrain_objective="contrastive"))
    assert objective_for("vit") == "contrastive"  # not derived from the shape ("encoder", like BERT)
    monkeypatch.setitem(registry.families(), "vit", dataclasses.replace(fam, pretrain_objective="nope"))
    with pytest.raises(ConfigError, match="objective 'nope'"):
        objective_for("vit")
