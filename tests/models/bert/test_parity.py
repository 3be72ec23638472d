"""BERT against transformers: BertForPreTraining (MLM + NSP + pooler), BertModel (bare), BertForMaskedLM,
with padding and segments; losses; the save round trip; published sizes; checkpoints that must fail."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmzoo  # noqa: E402
from lmzoo.errors import CheckpointError, ConfigError  # noqa: E402
from lmzoo.interop.safetensors_io import write_directory  # noqa: E402
from lmzoo.models.bert import mean_pool  # noqa: E402
from lmzoo.models.bert.config import PRESETS, BertConfig  # noqa: E402
from tests.parity import ATOL, max_diff  # noqa: E402

V = 70
BASE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=24, type_vocab_size=2)


def _hf(cls, **over):
    torch.manual_seed(0)
    return cls(transformers.BertConfig(**{**BASE, **over})).eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:], mask[2, 5:] = 0, 0  # right padding, as BERT tokenizers pad
    ids[mask == 0] = 0
    segments = torch.zeros_like(ids)
    segments[:, 6:] = 1
    return ids, mask, segments


def test_pretraining_checkpoint_parity_and_loss(tmp_path):
    hf = _hf(transformers.BertForPreTraining)
    hf.save_pretrained(tmp_path / "hf")
    ours = lmzoo.load(tmp_path / "hf")
    assert (ours.config.mlm_head, ours.config.nsp_head, ours.config.pooler) == (True, True, True)
    assert ours.mlm_head.decoder.weight is ours.embed.weight  # the tie survives loading
    ids, mask, seg = _inputs()
    labels = torch.full_like(ids, -100)
    labels[:, [2, 4]] = ids[:, [2, 4]]
    nsp = torch.tensor([0, 1, 1])
    with torch.no_grad():
        a = ours(input_ids=ids, token_type_ids=seg, attention_mask=mask, labels=labels, next_sentence_label=nsp)
        b = hf(input_ids=ids, token_type_ids=seg, attention_mask=mask, labels=labels, next_sentence_label=nsp,
               output_hidden_states=True)
    for name, x, y in (("prediction_logits", a.prediction_logits, b.prediction_logits),
                       ("seq_relationship_logits", a.seq_relationship_logits, b.seq_relationship_logits),
                       ("last_hidden_state", a.last_hidden_state, b.hidden_states[-1])):
        d = max_diff(x, y)
        assert d <= ATOL, f"{name} differs by {d}"
    assert abs(a.loss.item() - b.loss.item()) <= ATOL
    # padding and segments are real inputs: dropping either changes the padded / two-segment rows
    with torch.no_grad():
        assert max_diff(ours(input_ids=ids, token_type_ids=seg).last_hidden_state[1:], a.last_hidden_state[1:]) > 1e-3
        assert max_diff(ours(input_ids=ids, attention_mask=mask).last_hidden_state, a.last_hidden_state) > 1e-3
        # a padded row's real tokens equal the same row run alone without padding
        alone = ours(input_ids=ids[2:, :5], token_type_ids=seg[2:, :5]).last_hidden_state
    assert max_diff(alone[0], a.last_hidden_state[2, :5]) <= ATOL


def test_bare_bertmodel_checkpoint(tmp_path):
    hf = _hf(transformers.BertModel)
    hf.save_pretrained(tmp_path / "hf")
    keys = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert keys["architectures"] == ["BertModel"]
    ours = lmzoo.load(tmp_path / "hf")
    assert ours.mlm_head is None and ours.nsp_head is None and ours.pooler is not None
    ids, mask, seg = _inputs()
    with torch.no_grad():
        a = ours(input_ids=ids, token_type_ids=seg, attention_mask=mask)
        b = hf(input_ids=ids, token_type_ids=seg, attention_mask=mask)
    assert max_diff(a.last_hidden_state, b.last_hidden_state) <= ATOL
    assert max_diff(a.pooler_output, b.pooler_output) <= ATOL
    assert a.prediction_logits is None and a.seq_relationship_logits is None
    # the sentence-transformers recipe: mean over real tokens, then L2-normalise
    e = torch.nn.functional.normalize(mean_pool(a.last_hidden_state, mask), dim=-1)
    ref = (b.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert max_diff(e, torch.nn.functional.normalize(ref, dim=-1)) <= 1e-5
    with pytest.raises(ValueError, match="labels need the MLM head"):
        ours(input_ids=ids, labels=ids)


def test_masked_lm_checkpoint_untied_decoder(tmp_path):
    """BertForMaskedLM has no pooler; with tie_word_embeddings false its decoder is its own matrix."""
    hf = _hf(transformers.BertForMaskedLM, tie_word_embeddings=False)
    with torch.no_grad():
        hf.cls.predictions.decoder.weight.normal_()
    assert not torch.equal(hf.cls.predictions.decoder.weight, hf.bert.embeddings.word_embeddings.weight)
    hf.save_pretrained(tmp_path / "hf")
    ours = lmzoo.load(tmp_path / "hf")
    assert (ours.config.mlm_head, ours.config.nsp_head, ours.config.pooler) == (True, False, False)
    assert ours.mlm_head.decoder.weight is not ours.embed.weight
    ids, mask, seg = _inputs()
    with torch.no_grad():
        d = max_diff(ours(input_ids=ids, token_type_ids=seg, attention_mask=mask).prediction_logits,
                     hf(input_ids=ids, token_type_ids=seg, attention_mask=mask).logits)
    assert d <= ATOL


@pytest.mark.parametrize("cls", ["BertForPreTraining", "BertModel"])
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


def test_old_checkpoints_with_buffers_and_decoder_copies_load(tmp_path):
    """Older writers saved the position_ids buffer and copies of the tied MLM decoder."""
    hf = _hf(transformers.BertForPreTraining)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    state["bert.embeddings.position_ids"] = torch.arange(24)[None]
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()
    write_directory(tmp_path / "old", state, {"config.json": json.dumps(hf.config.to_dict())})
    ours = lmzoo.load(tmp_path / "old")
    ids, mask, seg = _inputs()
    with torch.no_grad():
        d = max_diff(ours(input_ids=ids, attention_mask=mask, token_type_ids=seg).prediction_logits,
                     hf(input_ids=ids, attention_mask=mask, token_type_ids=seg).prediction_logits)
    assert d <= ATOL


def test_bad_bert_checkpoints_fail_loudly(tmp_path):
    hf = _hf(transformers.BertModel)
    cfg = hf.config.to_dict()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}

    def write(name, st, c=cfg):
        write_directory(tmp_path / name, st, {"config.json": json.dumps(c)})
        return tmp_path / name

    missing = {k: v for k, v in state.items() if k != "encoder.layer.1.output.LayerNorm.bias"}
    with pytest.raises(CheckpointError, match=r"missing key.*encoder\.layer\.1\.output\.LayerNorm\.bias"):
        lmzoo.load(write("missing", missing))
    seg = "embeddings.token_type_embeddings.weight"
    with pytest.raises(CheckpointError, match=r"token_type_embeddings.*shape \(3, 32\).*expects \(2, 32\)"):
        lmzoo.load(write("segments", {**state, seg: torch.zeros(3, 32)}))
    with pytest.raises(CheckpointError, match=r"unexpected key.*encoder\.layer\.0\.crossattention"):
        lmzoo.load(write("stray", {**state, "encoder.layer.0.crossattention.self.query.weight": torch.zeros(32, 32)}))
    with pytest.raises(ConfigError, match="position_embedding_type 'relative_key'"):
        lmzoo.load(write("relative", state, {**cfg, "position_embedding_type": "relative_key"}))
    with pytest.raises(ConfigError, match="'is_decoder' is true"):
        BertConfig.from_hf({**cfg, "is_decoder": True})
    with pytest.raises(ConfigError, match="nsp_head needs pooler"):
        BertConfig(d_model=32, n_heads=4, nsp_head=True, pooler=False)


@pytest.mark.parametrize("name,cls", [("bert-base-uncased", "BertForPreTraining"),
                                      ("bert-large-uncased", "BertForPreTraining"), ("all-minilm-l6-v2", "BertModel")])
def test_preset_parameter_counts(name, cls):
    cfg = PRESETS[name]
    assert cfg.hf_architecture == cls
    hf_cfg = {k: v for k, v in cfg.to_hf().items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        ref = getattr(transformers, cls)(transformers.BertConfig(**hf_cfg))
    assert lmzoo.build(name, device="meta").num_parameters() == ref.num_parameters()
    if name == "bert-base-uncased":
        assert ref.num_parameters() == 110_106_428  # BERT-base's 110M, with the pretraining heads


def test_zoo_row_and_no_generation(capsys):
    from lmzoo.cli.main import main

    assert main(["zoo", "--family", "bert", "--json"]) == 0
    row = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}["bert-base-uncased"]
    assert row["shape"] == "encoder" and row["position"] == "learned absolute + segment"
    assert row["norm"] == "LayerNorm (post-norm) + embedding norm" and row["kv_bytes_per_token"] == 0
    model = lmzoo.build(BertConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, d_ff=48, max_positions=24))
    with pytest.raises(lmzoo.LmzooError, match="Bert is not a decoder"):
        lmzoo.generate(model, torch.tensor([[1, 2]]), max_new_tokens=2)
    with pytest.raises(lmzoo.LmzooError, match="Bert is not a decoder"):
        lmzoo.generate(model, torch.tensor([[1, 2]]), max_new_tokens=2, num_beams=2)
