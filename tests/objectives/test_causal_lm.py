"""Causal LM: the loss by hand, the MoE aux term, and packed documents that really stay apart."""

import math

import pytest
import torch

import lmzoo
from lmzoo.objectives import make_step_fn
from lmzoo.objectives.causal_lm import causal_lm_loss, lm_labels


def test_loss_by_hand():
    # every position: p(token 1) = 3/4, p(token 0) = 1/4; labels [x, 1, 0]: -(ln 3/4 + ln 1/4) / 2
    logits = torch.tensor([[[0.0, math.log(3)]] * 3])  # (1, 3, 2)
    labels = torch.tensor([[5, 1, 0]])
    want = -(math.log(3 / 4) + math.log(1 / 4)) / 2
    assert causal_lm_loss(logits, labels).item() == pytest.approx(want, abs=1e-6)
    assert causal_lm_loss(logits, labels, aux_loss=torch.tensor(2.0), aux_weight=0.5).item() == pytest.approx(want + 1.0)
    labels[0, 2] = -100  # ignored: only the first prediction counts
    assert causal_lm_loss(logits, labels).item() == pytest.approx(-math.log(3 / 4), abs=1e-6)


def test_moe_aux_loss_is_added_with_the_configs_alpha():
    from lmzoo.models.deepseek_v2.config import DeepseekV2Config

    cfg = DeepseekV2Config(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=48, q_lora_rank=None, kv_lora_rank=16,
                           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_shared_experts=1,
                           top_k=2, d_expert=16, max_positions=32, aux_loss_alpha=0.25)
    model = lmzoo.build(cfg).train()
    ids = torch.randint(0, 50, (2, 12))
    loss, metrics = make_step_fn("causal_lm", config=cfg)(model, {"input_ids": ids})
    assert metrics["aux_loss"].item() > 0 and metrics["n_tokens"] == 2 * 11
    assert loss.item() == pytest.approx(metrics["ce"].item() + 0.25 * metrics["aux_loss"].item(), rel=1e-6)
    # the model's own labels= path adds aux_loss_alpha · aux too: the same number, computed independently
    assert model(ids, labels=ids).loss.item() == pytest.approx(loss.item(), rel=1e-5)
    plain, _ = make_step_fn("causal_lm", aux_weight=0.0)(model, {"input_ids": ids})
    assert plain.item() == pytest.approx(metrics["ce"].item(), rel=1e-6)


def _packed_vs_separate(model, docs):
    """Logits of the documents packed in one row (doc_ids mask) and of each run on its own."""
    ids = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(ids, doc_ids=doc_ids).logits[0]
        alone = torch.cat([model(d[None]).logits[0] for d in docs])
        leaky = model(ids).logits[0]
    return packed, alone, leaky


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2", "chatglm2"])  # RoPE, ALiBi, learned, partial RoPE
def test_packed_documents_equal_separate_forwards(family):
    from lmzoo.models.registry import get_family

    cfg = next(iter(get_family(family).presets.values())).replace(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=None, d_ff=128, max_positions=64,
        dtype="float32")
    model = lmzoo.build(cfg).eval()
    docs = [torch.randint(0, 64, (n,)) for n in (5, 3, 7)]
    packed, alone, leaky = _packed_vs_separate(model, docs)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert (leaky[5:] - alone[5:]).abs().max() > 1e-3  # without the mask the later documents see the first


def test_document_modes_and_labels():
    batch = {"input_ids": torch.tensor([[7, 8, 9, 4, 5]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
             "doc_ids": torch.tensor([[0, 0, 0, 1, 1]])}
    assert lm_labels(batch, "concat").tolist() == [[7, 8, 9, 4, 5]]
    assert lm_labels(batch, "mask").tolist() == [[-100, 8, 9, -100, 5]]  # 4 cannot be predicted from doc 0
    from lmzoo.models.llama.config import LlamaConfig

    model = lmzoo.build(LlamaConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_positions=16))
    losses = {m: make_step_fn("causal_lm", documents=m)(model, batch) for m in ("concat", "positions", "mask")}
    assert losses["mask"][1]["n_tokens"] == 3 and losses["concat"][1]["n_tokens"] == 4
    assert losses["concat"][0].item() != pytest.approx(losses["positions"][0].item(), abs=1e-7)
    with pytest.raises(lmzoo.LmzooError, match="documents must be one of"):
        make_step_fn("causal_lm", documents="whatever")
