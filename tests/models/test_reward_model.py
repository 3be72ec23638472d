"""Reward models against transformers' <Arch>ForSequenceClassification (num_labels 1): tiny random
classifiers loaded by lmzoo give the same rewards on right- and left-padded batches; a causal LM turned
into a reward model keeps its decoder, saves in the classifier layout and transformers scores it the
same; lmzoo.score batches and pads without changing a reward; refusals. ChatGLM-6B (the prefix decoder),
which no transformers class covers: its rewards against a direct computation from the release's weights."""

import json

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

import lmzoo  # noqa: E402
from lmzoo.errors import CheckpointError, ConfigError, LmzooError  # noqa: E402
from lmzoo.models.registry import get_family  # noqa: E402
from lmzoo.models.reward import RewardModel  # noqa: E402
from tests.parity import max_diff  # noqa: E402

V, PAD, TOL = 97, 0, 1e-5

# family -> (transformers config class, CausalLM class, SequenceClassification class, tiny config)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaForSequenceClassification",
              dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)),  # GQA
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "GPT2ForSequenceClassification",
             dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)),
    "bloom": ("BloomConfig", "BloomForCausalLM", "BloomForSequenceClassification",
              dict(hidden_size=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)),
    "chatglm2": ("GlmConfig", "GlmForCausalLM", "GlmForSequenceClassification",
                 dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64, eos_token_id=None)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", "DeepseekV2ForSequenceClassification",
                    dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                         v_head_dim=6, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                         first_k_dense_replace=1, q_lora_rank=None, max_position_embeddings=64, eos_token_id=None)),
}


def _hf(family: str, kind: int, seed: int = 0, **over):
    """kind 1: the CausalLM class, 2: the SequenceClassification class (num_labels 1)."""
    names = FAMILIES[family]
    cfg = getattr(transformers, names[0])(**{"vocab_size": V, "pad_token_id": PAD, "initializer_range": 0.1,
                                              "num_labels": 1, **names[3], **over})
    torch.manual_seed(seed)
    return getattr(transformers, names[kind])(cfg).eval()


def _batch(seed: int = 0, B: int = 3, T: int = 9):
    """Real tokens never equal the pad id; row 1 has 4 pads, row 2 has 2, on the side chosen later."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, V, (T - n,), generator=g) for n in (0, 4, 2)][:B]
    return rows, T


def _pad(rows, T, side, pad=PAD):
    ids = torch.full((len(rows), T), pad)
    mask = torch.zeros_like(ids)
    for k, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[k, sl], mask[k, sl] = r, 1
    return ids, mask


def _hf_rewards(hf, ids, mask=None, position_ids=None):
    with torch.no_grad():
        return hf(ids, attention_mask=mask, position_ids=position_ids).logits[:, 0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_transformers_classifier_loads_with_equal_rewards(family, tmp_path):
    hf = _hf(family, 2)
    hf.save_pretrained(tmp_path)
    ours = lmzoo.load(tmp_path)
    assert isinstance(ours, RewardModel) and ours.pad_token_id == PAD
    rows, T = _batch()
    with torch.no_grad():
        ids, mask = _pad(rows, T, "right")
        right = ours(ids, attention_mask=mask).rewards
        assert right.shape == (3,)
        assert max_diff(right, _hf_rewards(hf, ids, mask)) <= TOL
        # left padding: transformers needs the positions the mask implies; lmzoo derives them itself
        ids, mask = _pad(rows, T, "left")
        left = ours(ids, attention_mask=mask).rewards
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        assert max_diff(left, _hf_rewards(hf, ids, mask, pos)) <= TOL
        assert max_diff(left, right) <= TOL  # the side of the padding does not change a reward
        alone = torch.stack([_hf_rewards(hf, r[None])[0] for r in rows])  # each row unpadded, batch of one
        assert max_diff(left, alone) <= TOL
        # transformers' own left-padded forward (positions 0.. counted from the pads) on request
        arange = torch.arange(T)[None]
        assert max_diff(ours(ids, attention_mask=mask, position_ids=arange).rewards,
                        _hf_rewards(hf, ids, mask)) <= TOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_causal_lm_becomes_a_reward_model_transformers_reads(family, tmp_path):
    lm = _hf(family, 1, seed=1)
    lm.save_pretrained(tmp_path / "sft")
    rm = lmzoo.reward_model(tmp_path / "sft")
    # a fresh head, drawn as transformers draws it: N(0, initializer_range²) (0.1 here, not the default 0.02)
    w = rm.score.weight
    assert w.shape == (1, rm.config.d_model) and 0.06 < w.std().item() < 0.15
    lmzoo.save(rm, tmp_path / "rm")

    hf_cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert hf_cfg["architectures"] == [FAMILIES[family][2]]
    assert hf_cfg["id2label"] == {"0": "LABEL_0"} and hf_cfg["label2id"] == {"LABEL_0": 0}
    assert hf_cfg["pad_token_id"] == PAD
    with safe_open(str(tmp_path / "rm" / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert "score.weight" in saved and not any(k.startswith("lm_head") for k in saved)
    # the decoder's weights are the causal LM's, under the same keys (the classifier shares its prefix)
    lm_state = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head")}
    for k, v in lm_state.items():
        if k in saved:
            torch.testing.assert_close(saved[k], v, rtol=0, atol=0)

    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm",
                                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.config.num_labels == 1
    hf.eval()
    torch.testing.assert_close(hf.score.weight, w, rtol=0, atol=0)
    rows, T = _batch(seed=2)
    ids, mask = _pad(rows, T, "right")
    with torch.no_grad():
        assert max_diff(rm(ids, attention_mask=mask).rewards, _hf_rewards(hf, ids, mask)) <= TOL
    # and back: lmzoo reads its own save as a reward model with the same head
    again = lmzoo.load(tmp_path / "rm")
    assert isinstance(again, RewardModel)
    torch.testing.assert_close(again.score.weight, w, rtol=0, atol=0)


def test_wrapping_a_loaded_model_leaves_it_a_language_model(tmp_path):
    _hf("llama", 1).save_pretrained(tmp_path)
    lm = lmzoo.load(tmp_path)
    ids = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(0))
    rm = lmzoo.reward_model(lm, pad_token_id=5)
    with torch.no_grad():
        assert lm(ids).logits.shape == (1, 6, V)  # its head is still there
        out = rm(ids)
        h = lm(ids).hidden_states
    assert rm.pad_token_id == 5 and lm.config.pad_token_id == PAD  # the copy's config, not the model's
    torch.testing.assert_close(out.hidden_states, h)
    torch.testing.assert_close(out.rewards, rm.score(h[:, -1]).squeeze(-1))


def test_score_batches_texts_and_ids_like_single_rows(tmp_path):
    hf = _hf("gpt2", 2, vocab_size=300)  # a byte-level BPE has 256 tokens before it learns any
    hf.save_pretrained(tmp_path / "hf")
    texts = ["the cat sat on the mat", "a dog", "the dog sat on a log and the cat ran off", "a cat ran"]
    tok = lmzoo.train_tokenizer("bpe", texts=texts * 4, vocab_size=290)
    rm = lmzoo.load(tmp_path / "hf")
    lmzoo.save(rm, tmp_path / "rm", tokenizer=tok)
    rm = lmzoo.reward_model(tmp_path / "rm")
    rows = [tok.encode(t) for t in texts]
    assert all(PAD not in r for r in rows) and len({len(r) for r in rows}) > 1
    alone = [_hf_rewards(hf, torch.tensor([r]))[0].item() for r in rows]
    by_ids = lmzoo.score(rm, rows, batch_size=3)
    by_text = lmzoo.score(rm, texts, batch_size=2, add_special_tokens=False)  # the directory's tokenizer
    assert max(abs(a - b) for a, b in zip(by_ids, alone)) <= TOL
    assert max(abs(a - b) for a, b in zip(by_text, alone)) <= TOL
    assert lmzoo.score(rm, texts[1], tok, add_special_tokens=False) == pytest.approx([alone[1]], abs=TOL)


# -- ChatGLM-6B: no class to compare with, so a direct computation (lmzoo/models/reward.py) ------------


def _glm_rows():
    """Three ChatGLM-6B rows of different lengths: prompt tokens, [gMASK] <sop>, a response, <eop>."""
    from tests.models.chatglm.test_parity import EOP, GMASK, SOP

    return [[5, 6, 7, GMASK, SOP, 8, 9, EOP], [10, 11, GMASK, SOP, 12, EOP],
            [13, 14, 15, 16, 17, GMASK, SOP, 18, 19, 20, 21, EOP]]


def test_chatglm_rewards_equal_a_direct_computation_and_the_layout_reloads(tmp_path):
    """The release checkpoint plus a score head: each reward equals the reference forward's final hidden
    state at the row's last token times score.weight (tests/models/chatglm/test_parity.py's reference, with
    score.weight as its head), padded on either side; saved, it is the release's keys without lm_head plus
    score.weight, and reloads with the same rewards."""
    from tests.models.chatglm import test_parity as glm

    sd = glm.original_state(glm.HP)
    glm.write_original(tmp_path / "release", sd, glm.original_config())
    rm = lmzoo.reward_model(tmp_path / "release")
    assert rm.pad_token_id == glm.PAD
    rows = _glm_rows()
    head = {**sd, "lm_head.weight": rm.score.weight.detach()}  # the reference's (B, T, 1) "logits" are scores
    with torch.no_grad():
        want = torch.stack([glm.reference_logits(head, glm.HP, torch.tensor([r]))[0, -1, 0] for r in rows])
        for side in ("right", "left"):
            ids, mask = _pad([torch.tensor(r) for r in rows], 12, side, pad=glm.PAD)
            assert max_diff(rm(ids, attention_mask=mask).rewards, want) <= TOL, side
    assert want.abs().min() > 1e-3  # real scores, not a vacuous zero

    lmzoo.save(rm, tmp_path / "rm")
    hf_cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert hf_cfg["architectures"] == ["ChatGLMForSequenceClassification"] and hf_cfg["num_labels"] == 1
    assert hf_cfg["id2label"] == {"0": "LABEL_0"} and hf_cfg["pad_token_id"] == glm.PAD
    assert hf_cfg["model_type"] == "chatglm" and hf_cfg["position_encoding_2d"] is True
    assert "auto_map" not in hf_cfg  # the release's only entry, AutoModel, names the causal LM
    with safe_open(str(tmp_path / "rm" / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    decoder = {k for k in sd if k != "lm_head.weight" and not k.endswith("rotary_emb.inv_freq")}
    assert set(saved) == decoder | {"score.weight"}
    for k in decoder:  # the release's tensors under the release's names
        torch.testing.assert_close(saved[k], sd[k], rtol=0, atol=0)
    again = lmzoo.load(tmp_path / "rm")
    assert isinstance(again, RewardModel) and again.pad_token_id == glm.PAD
    scores = lmzoo.score(tmp_path / "rm", rows, batch_size=3)
    assert max(abs(a - b) for a, b in zip(scores, want.tolist())) <= TOL

    hf_cfg.update(num_labels=2, id2label={"0": "A", "1": "B"})  # a classifier, not a reward model
    (tmp_path / "rm" / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(CheckpointError, match="one label"):
        lmzoo.load(tmp_path / "rm")


def test_a_chatglm_row_without_gmask_and_sop_is_one_clear_error(tmp_path):
    from tests.models.chatglm import test_parity as glm

    glm.write_original(tmp_path, glm.original_state(glm.HP), glm.original_config())
    rm = lmzoo.reward_model(tmp_path)
    with pytest.raises(LmzooError, match=r"lacks \[gMASK\].*<sop>"):
        lmzoo.score(rm, [[5, 6, 7, 8]])


# -- refusals -------------------------------------------------------------------------------------


def test_no_pad_token_scores_one_row_only(tmp_path):
    hf = _hf("llama", 2, pad_token_id=None)
    hf.save_pretrained(tmp_path)
    rm = lmzoo.load(tmp_path)
    assert rm.pad_token_id is None
    ids = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="Cannot handle batch sizes > 1"):
        _hf_rewards(hf, ids)
    with pytest.raises(ValueError, match="pad_token_id"):
        rm(ids)
    with pytest.raises(ConfigError, match="pad_token_id"):
        lmzoo.score(rm, ids.tolist())
    with torch.no_grad():  # one row: its last token, as transformers reads it
        assert max_diff(rm(ids[:1]).rewards, _hf_rewards(hf, ids[:1])) <= TOL
    assert lmzoo.score(rm, ids.tolist(), batch_size=1) == pytest.approx(
        [_hf_rewards(hf, ids[k:k + 1])[0].item() for k in range(2)], abs=TOL)


def test_encoders_and_other_classifiers_are_refused(tmp_path):
    bert = lmzoo.build(get_family("bert").config_cls(
        vocab_size=V, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    with pytest.raises(ConfigError, match="family 'bert' \\(encoder\\) has no reward-model layout"):
        lmzoo.reward_model(bert)
    lm = lmzoo.build(get_family("llama").config_cls(
        vocab_size=V, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    with pytest.raises(ConfigError, match="score needs a reward model"):
        lmzoo.score(lm, [[1, 2, 3]])
    _hf("llama", 2, num_labels=3).save_pretrained(tmp_path / "three")
    with pytest.raises(CheckpointError, match="one label"):
        lmzoo.load(tmp_path / "three")
