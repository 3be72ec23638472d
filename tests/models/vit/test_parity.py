"""ViT against transformers: ViTModel (pooler) and ViTForImageClassification (classifier, loss), position
interpolation for other image sizes, the save round trip, the published size, checkpoints that must fail."""

import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

import lmzoo  # noqa: E402
from lmzoo.errors import CheckpointError  # noqa: E402
from lmzoo.interop.safetensors_io import write_directory  # noqa: E402
from lmzoo.models.vit.config import PRESETS, ViTConfig  # noqa: E402
from lmzoo.nn.patches import interpolate_positions  # noqa: E402
from tests.parity import ATOL, max_diff  # noqa: E402

BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=32,
            patch_size=8, num_labels=5)


def _hf(cls, **over):
    torch.manual_seed(0)
    return cls(transformers.ViTConfig(**{**BASE, **over})).eval()


def _saved_state(hf, directory) -> dict:
    """The tensors as transformers writes them (its in-memory names differ: it renames on save)."""
    hf.save_pretrained(directory)
    return dict(load_file(str(directory / "model.safetensors")))


def _pixels(B=3, H=32, W=32, seed=0):
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


def test_vitmodel_parity(tmp_path):
    hf = _hf(transformers.ViTModel, pooler_output_size=24, pooler_act="tanh")
    hf.save_pretrained(tmp_path / "hf")
    ours = lmzoo.load(tmp_path / "hf")
    assert ours.pooler is not None and ours.classifier is None and ours.pooler.out_features == 24
    x = _pixels()
    with torch.no_grad():
        a, b = ours(x), hf(pixel_values=x)
    d_h, d_p = max_diff(a.last_hidden_state, b.last_hidden_state), max_diff(a.pooler_output, b.pooler_output)
    assert a.last_hidden_state.shape == (3, 1 + 16, 32)
    assert d_h <= ATOL and d_p <= ATOL, (d_h, d_p)
    with pytest.raises(ValueError, match="labels need the classifier"):
        ours(x, labels=torch.zeros(3, dtype=torch.long))


def test_classifier_parity_and_loss(tmp_path):
    hf = _hf(transformers.ViTForImageClassification)
    hf.save_pretrained(tmp_path / "hf")
    ours = lmzoo.load(tmp_path / "hf")
    assert ours.config.num_labels == 5 and ours.pooler is None
    x, labels = _pixels(), torch.tensor([0, 3, 4])
    with torch.no_grad():
        a, b = ours(x, labels=labels), hf(pixel_values=x, labels=labels)
    assert a.logits.shape == (3, 5)
    assert max_diff(a.logits, b.logits) <= ATOL
    assert abs(a.loss.item() - b.loss.item()) <= ATOL
    # the classifier reads the final, normed [CLS] state
    assert max_diff(a.logits, ours.classifier(a.last_hidden_state[:, 0])) == 0.0
    with pytest.raises(ValueError, match="single-label cross-entropy"):  # transformers: multi-label BCE
        ours(x, labels=torch.zeros(3, 5))


@pytest.mark.parametrize("size", [(48, 48), (64, 40), (16, 24)])
def test_position_interpolation_equals_transformers(tmp_path, size):
    """Another image size resizes the 4x4 learned grid bicubically, as interpolate_pos_encoding does."""
    hf = _hf(transformers.ViTForImageClassification)
    hf.save_pretrained(tmp_path / "hf")
    ours = lmzoo.load(tmp_path / "hf")
    H, W = size
    x = _pixels(2, H, W)
    with torch.no_grad():
        a = ours(x)
        b = hf(pixel_values=x, interpolate_pos_encoding=True)
        emb = hf.vit.embeddings
        ref_table = emb.interpolate_pos_encoding(torch.zeros(1, 1 + (H // 8) * (W // 8), 32), H, W)[0]
        table = ours.patches.position_table(H, W)
    assert table.shape == (1 + (H // 8) * (W // 8), 32) and torch.isfinite(table).all()
    assert max_diff(table, ref_table) <= 1e-6
    assert torch.isfinite(a.logits).all() and max_diff(a.logits, b.logits) <= ATOL
    assert max_diff(table[0], ours.patches.positions[0]) == 0.0  # the [CLS] position is kept as is
    with pytest.raises(ValueError, match="doesn't match"):  # transformers refuses without the flag; lmzoo interpolates
        hf(pixel_values=x)


def test_interpolation_keeps_the_grid_and_its_corners():
    """Same grid: the table itself. Upsampled 2x: bicubic (align_corners=False) keeps smooth ramps
    smooth, and a constant table stays constant."""
    table = torch.randn(1 + 16, 8)
    assert interpolate_positions(table, 4, (4, 4)) is table
    const = torch.ones(1 + 16, 8) * 0.3
    assert torch.allclose(interpolate_positions(const, 4, (8, 6)), torch.full((1 + 48, 8), 0.3), atol=1e-6)


@pytest.mark.parametrize("cls", ["ViTForImageClassification", "ViTModel"])
def test_save_round_trip(cls, tmp_path):
    hf_cls = getattr(transformers, cls)
    hf = _hf(hf_cls)
    hf.save_pretrained(tmp_path / "hf")
    ours = lmzoo.load(tmp_path / "hf")
    lmzoo.save(ours, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"] == [cls]
    hf2 = hf_cls.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    ref = hf.state_dict()
    for k, t in hf2.state_dict().items():
        assert torch.equal(t, ref[k]), k
    again = lmzoo.load(tmp_path / "saved")
    for (k, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(again.state_dict().items())):
        assert torch.equal(a, b), k


def test_classifier_checkpoint_with_a_pooler_loads(tmp_path):
    """google/vit-base-patch16-224 ships ``vit.pooler`` beside the classifier: both become heads."""
    hf = _hf(transformers.ViTForImageClassification)
    state = _saved_state(hf, tmp_path / "hf")
    pooled = _saved_state(_hf(transformers.ViTModel), tmp_path / "bare")
    state.update({f"vit.{k}": v for k, v in pooled.items() if k.startswith("pooler.")})
    write_directory(tmp_path / "ck", state, {"config.json": json.dumps(hf.config.to_dict())})
    ours = lmzoo.load(tmp_path / "ck")
    assert ours.pooler is not None and ours.classifier is not None
    x = _pixels()
    with torch.no_grad():
        assert max_diff(ours(x).logits, hf(pixel_values=x).logits) <= ATOL


def test_bad_checkpoints_fail_loudly(tmp_path):
    hf = _hf(transformers.ViTForImageClassification)
    cfg = hf.config.to_dict()
    state = _saved_state(hf, tmp_path / "hf")

    def write(name, st, c=cfg):
        write_directory(tmp_path / name, st, {"config.json": json.dumps(c)})
        return tmp_path / name

    missing = {k: v for k, v in state.items() if "layer.1.output.dense.weight" not in k}
    with pytest.raises(CheckpointError, match=r"missing key.*encoder\.layer\.1\.output\.dense\.weight"):
        lmzoo.load(write("missing", missing))
    with pytest.raises(CheckpointError, match=r"unexpected key.*mask_token"):
        lmzoo.load(write("extra", {**state, "vit.embeddings.mask_token": torch.zeros(1, 1, 32)}))
    with pytest.raises(CheckpointError, match=r"position_embeddings.*\(1, 17, 32\).*expects \(37, 32\)"):
        lmzoo.load(write("size", state, {**cfg, "image_size": 48}))  # 6x6 patches + CLS expected


def _count_hf(cls, cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cls(cfg).parameters())


def test_preset_vit_base_patch16_224():
    """ViT-B/16 with its 1000-class head: 86,567,656 parameters, transformers' count of the same config."""
    cfg = PRESETS["vit-base-patch16-224"]
    model = lmzoo.build(cfg, device="meta")
    n = model.num_parameters()
    ref = _count_hf(transformers.ViTForImageClassification, transformers.ViTConfig(num_labels=1000))
    assert n == ref == 86_567_656
    assert cfg.num_patches == 196 and model.patches.positions.shape == (197, 768)
    assert cfg.to_hf()["architectures"] == ["ViTForImageClassification"]
    again = ViTConfig.from_hf(cfg.to_hf())
    assert (again.d_model, again.n_layers, again.num_labels, again.pooler) == (768, 12, 1000, False)
