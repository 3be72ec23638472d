"""GLM blank infilling: Part A / Part B by hand, and ChatGLM-6B reading it as the paper says."""

import math

import pytest
import torch

import lmzoo
from lmzoo.models.chatglm.config import ChatGLMConfig
from lmzoo.models.chatglm.model import glm_position_ids, prompt_layout
from lmzoo.objectives import make_step_fn, make_transform
from lmzoo.objectives.glm import GLMTokens, blank_infill, glm_loss, sample_spans

MASK, GMASK, SOP, EOP, PAD = 40, 41, 42, 43, 0
IDS = GLMTokens(MASK, GMASK, SOP, EOP, PAD)


def _cfg():
    return ChatGLMConfig(vocab_size=44, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_positions=64, bos_token_id=SOP,
                         eos_token_id=EOP, pad_token_id=PAD, mask_token_id=MASK, gmask_token_id=GMASK)


def test_docstring_example_by_hand():
    x = [10, 11, 12, 13, 14, 15]
    inp, tgt, pos, block = blank_infill(x, [(2, 4), (5, 6)], order=[1, 0], mask_id=MASK, ids=IDS)
    assert inp == [10, 11, MASK, 14, MASK, SOP, 15, SOP, 12, 13]
    assert tgt == [-100] * 5 + [15, EOP, 12, 13, EOP]
    assert pos == [0, 1, 2, 3, 4, 4, 4, 2, 2, 2]
    assert block == [0, 0, 0, 0, 0, 1, 2, 1, 2, 3]


def test_gmask_rows_get_the_models_own_positions():
    """A [gMASK] row is exactly a ChatGLM-6B prompt + answer: the transform's 2D positions equal the ones
    the model derives from the tokens itself."""
    g = torch.Generator().manual_seed(0)
    out = make_transform("glm", config=_cfg(), gmask_prob=1.0)({"input_ids": torch.randint(1, 40, (3, 12))}, g)
    ids = out["input_ids"]
    for i in range(3):
        row = ids[i][out["attention_mask"][i].bool()][None]
        assert row[0].tolist().count(GMASK) == 1 and row[0].tolist().count(SOP) == 1
        n_a = row[0].tolist().index(SOP)
        assert 1 <= 12 - (n_a - 1) and n_a - 1 <= 6  # the [gMASK] span covers 50-100% of the row
        layout = prompt_layout(row, None, _cfg())
        assert torch.equal(glm_position_ids(layout, 0, row.shape[1]), out["position_ids"][i:i + 1, :, :row.shape[1]])


def test_short_spans_cover_fifteen_percent():
    g = torch.Generator().manual_seed(0)
    spans, is_g = sample_spans(40, g, gmask_prob=0.0)
    assert not is_g and sum(e - s for s, e in spans) == 6 and len(spans) == 2  # round(0.15·40), round(6/3)
    flags = [sample_spans(20, g)[1] for _ in range(400)]
    assert sum(flags) / len(flags) == pytest.approx(0.7, abs=0.07)


def test_model_sees_part_a_bidirectionally_and_part_b_causally():
    torch.manual_seed(0)
    model = lmzoo.build(_cfg()).eval()
    g = torch.Generator().manual_seed(1)
    batch = make_transform("glm", config=_cfg(), gmask_prob=0.0)({"input_ids": torch.randint(1, 40, (2, 20))}, g)
    with torch.no_grad():
        base = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
        row = batch["input_ids"][0].tolist()
        n_a = row.index(SOP)
        last = int(batch["attention_mask"][0].sum()) - 1
        changed = batch["input_ids"].clone()
        changed[0, last] = (changed[0, last] + 1) % 40  # the last token of Part B
        after = model(changed, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
        changed_a = batch["input_ids"].clone()
        k = max(i for i in range(n_a) if row[i] != MASK)  # the last text token of Part A
        changed_a[0, k] = (changed_a[0, k] + 1) % 40
        after_a = model(changed_a, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(after[0, :last], base[0, :last], atol=0, rtol=0)  # causal: nothing earlier moves
    assert (after_a[0, 0] - base[0, 0]).abs().max() > 1e-4  # bidirectional: the first token sees A's last one
    loss, metrics = make_step_fn("glm")(model, batch)
    assert metrics["n_tokens"] == int((batch["targets"] != -100).sum()) == 2 * (3 + 1)  # round(0.15·20) = 3 noise tokens in one span, + <eop>
    assert loss.item() == pytest.approx(glm_loss(base, batch["targets"]).item(), rel=1e-5)


def test_loss_by_hand():
    logits = torch.zeros(1, 3, 5)
    logits[0, 1, 2] = math.log(4)  # p(2) = 4/8 at position 1; p(0) = 1/5 at position 2
    assert glm_loss(logits, torch.tensor([[-100, 2, 0]])).item() == pytest.approx((math.log(2) + math.log(5)) / 2)
