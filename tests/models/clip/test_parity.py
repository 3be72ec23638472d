"""CLIP against transformers' CLIPModel: embeddings, logits both ways and the loss on a padded batch,
both EOS rules, towers of different depths and widths, position interpolation, the save round trip,
the published size, configs and checkpoints that must fail."""

import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

import lmzoo  # noqa: E402
from lmzoo.errors import CheckpointError, ConfigError  # noqa: E402
from lmzoo.interop.safetensors_io import write_directory  # noqa: E402
from lmzoo.models.clip import CLIPConfig, eos_positions  # noqa: E402
from lmzoo.models.clip.config import PRESETS  # noqa: E402
from tests.parity import ATOL, max_diff  # noqa: E402

V, BOS, EOS = 60, 58, 59


def _hf(eos=EOS, **over):
    text = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=16, eos_token_id=eos, bos_token_id=BOS, pad_token_id=0)
    vision = dict(hidden_size=24, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=20, **over)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # not the initial value, so that loading it is tested
    return model


def _texts(seed=0):
    """Three right-padded texts of lengths 7, 10 and 5: [BOS] words [EOS] [pad]..."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, BOS, (3, 10), generator=g)
    lengths = [7, 10, 5]
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = BOS, EOS
        ids[i, n:] = 0
        mask[i, :n] = 1
    return ids, mask


def _pixels(B=3, H=32, W=32):
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(1))


def _load(hf, tmp_path):
    hf.save_pretrained(tmp_path / "hf")
    return lmzoo.load(tmp_path / "hf")


def test_clip_parity_padded_batch_and_loss(tmp_path):
    hf = _hf()
    ours = _load(hf, tmp_path)
    assert abs(ours.logit_scale.item() - 2.0) < 1e-7
    ids, mask = _texts()
    x = _pixels()
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, pixel_values=x, return_loss=True)
        b = hf(input_ids=ids, attention_mask=mask, pixel_values=x, return_loss=True)
    assert a.logits_per_image.shape == (3, 3) and a.text_embeds.shape == (3, 20)
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        d = max_diff(getattr(a, name), getattr(b, name))
        assert d <= ATOL, f"{name} differs by {d}"
    assert abs(a.loss.item() - b.loss.item()) <= ATOL
    assert torch.equal(a.logits_per_image, a.logits_per_text.t())
    assert torch.allclose(a.image_embeds.norm(dim=-1), torch.ones(3), atol=1e-6)
    with torch.no_grad():
        assert max_diff(ours.get_text_features(ids, mask), hf.get_text_features(input_ids=ids, attention_mask=mask)
                        .pooler_output) <= ATOL
        assert max_diff(ours.get_image_features(x), hf.get_image_features(pixel_values=x).pooler_output) <= ATOL
        # the causal text tower: a padded row read at its EOS equals the same text unpadded
        alone = ours.get_text_features(ids[2:, :5])
        assert max_diff(alone[0], ours.get_text_features(ids, mask)[2]) <= ATOL
        # no loss unless asked, and the loss needs pairs
        assert ours(input_ids=ids, pixel_values=x).loss is None
    with pytest.raises(ValueError, match="pairs text i with image i"):
        ours(input_ids=ids, pixel_values=x[:2], return_loss=True)


def test_legacy_eos_rule_reads_the_highest_id(tmp_path):
    """eos_token_id == 2 (OpenAI's configs): transformers reads each row at its highest id."""
    hf = _hf(eos=2)
    ours = _load(hf, tmp_path)
    ids, mask = _texts()
    ids[0, 3] = EOS  # the highest id, early in row 0: read there, not at row 0's end
    ids[1, 8] = 2  # an id-2 token in row 1: with the legacy rule it is not an EOS
    assert eos_positions(ids, 2).tolist() == [3, 9, 4]
    # the current rule: the first position holding eos_token_id
    assert eos_positions(ids, EOS).tolist() == [3, 9, 4]
    assert eos_positions(torch.tensor([[5, 2, 7, 2, 7]]), 7).tolist() == [2]
    x = _pixels()
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, pixel_values=x)
        b = hf(input_ids=ids, attention_mask=mask, pixel_values=x)
    assert max_diff(a.logits_per_text, b.logits_per_text) <= ATOL


def test_position_interpolation_equals_transformers(tmp_path):
    hf = _hf()
    ours = _load(hf, tmp_path)
    ids, mask = _texts()
    x = _pixels(3, 48, 40)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, pixel_values=x)
        b = hf(input_ids=ids, attention_mask=mask, pixel_values=x, interpolate_pos_encoding=True)
    assert torch.isfinite(a.logits_per_image).all()
    assert max_diff(a.image_embeds, b.image_embeds) <= ATOL


def test_save_round_trip(tmp_path):
    hf = _hf()
    ours = _load(hf, tmp_path)
    lmzoo.save(ours, tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert cfg["architectures"] == ["CLIPModel"] and cfg["text_config"]["eos_token_id"] == EOS
    hf2 = transformers.CLIPModel.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    ref = hf.state_dict()
    for k, t in hf2.state_dict().items():
        assert torch.equal(t, ref[k]), k
    again = lmzoo.load(tmp_path / "saved")
    for (k, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(again.state_dict().items())):
        assert torch.equal(a, b), k


def test_old_files_with_position_ids_and_config_dicts_load(tmp_path):
    """Files from older transformers: position_ids buffers saved, towers under *_config_dict."""
    hf = _hf()
    hf.save_pretrained(tmp_path / "hf")
    state = dict(load_file(str(tmp_path / "hf" / "model.safetensors")))
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["text_config_dict"], cfg["vision_config_dict"] = cfg.pop("text_config"), cfg.pop("vision_config")
    write_directory(tmp_path / "old", state, {"config.json": json.dumps(cfg)})
    ours = lmzoo.load(tmp_path / "old")
    assert (ours.config.text.n_layers, ours.config.vision.n_layers, ours.config.vision.d_model) == (2, 3, 24)
    ids, mask = _texts()
    with torch.no_grad():
        assert max_diff(ours.get_text_features(ids, mask),
                        hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output) <= ATOL


def test_bad_configs_and_checkpoints_fail_loudly(tmp_path):
    hf = _hf()
    hf.save_pretrained(tmp_path / "hf")
    state = dict(load_file(str(tmp_path / "hf" / "model.safetensors")))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())

    def write(name, st=state, c=cfg):
        write_directory(tmp_path / name, st, {"config.json": json.dumps(c)})
        return tmp_path / name

    with pytest.raises(CheckpointError, match=r"missing key.*vision_model\.encoder\.layers\.2\.mlp\.fc2\.weight"):
        lmzoo.load(write("missing", {k: v for k, v in state.items() if k != "vision_model.encoder.layers.2.mlp.fc2.weight"}))
    deeper = json.loads(json.dumps(cfg))
    deeper["vision_config"]["num_hidden_layers"] = 4
    with pytest.raises(CheckpointError, match=r"missing key.*vision_model\.encoder\.layers\.3\."):
        lmzoo.load(write("deeper", c=deeper))
    bad_act = json.loads(json.dumps(cfg))
    bad_act["text_config"]["hidden_act"] = "mish"
    with pytest.raises(ConfigError, match=r"text_config\.hidden_act 'mish'"):
        lmzoo.load(write("act", c=bad_act))
    eos_list = json.loads(json.dumps(cfg))
    eos_list["text_config"]["eos_token_id"] = [EOS, 2]
    with pytest.raises(ConfigError, match=r"config\.json: clip text: eos_token_id must be one integer"):
        lmzoo.load(write("eos", c=eos_list))
    rect = json.loads(json.dumps(cfg))
    rect["vision_config"]["image_size"] = [32, 48]
    with pytest.raises(ConfigError, match="not square"):
        lmzoo.load(write("rect", c=rect))


def _count_hf(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in transformers.CLIPModel(cfg).parameters())


def test_preset_clip_vit_base_patch32():
    """openai/clip-vit-base-patch32: 151,277,313 parameters, transformers' count of the same config."""
    cfg = PRESETS["clip-vit-base-patch32"]
    model = lmzoo.build(cfg, device="meta")
    assert model.num_parameters() == _count_hf(transformers.CLIPConfig()) == 151_277_313
    assert model.vision.patches.positions.shape == (50, 768)  # 7x7 patches of 32px + [CLS]
    again = CLIPConfig.from_hf(cfg.to_hf())
    assert again.text == cfg.text and again.vision == cfg.vision and again.projection_dim == 512
