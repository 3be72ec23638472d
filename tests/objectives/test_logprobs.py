"""Response log-probs: by hand on a 3-token vocabulary, and equal to a direct computation with
transformers' LlamaForCausalLM on a right-padded batch (prompt and padding excluded)."""

import math

import pytest
import torch

from lmzoo.objectives.logprobs import response_logps, sequence_logps, token_logps


def test_by_hand():
    # t=0: p = [1/6, 2/6, 3/6]; t=1: p = [4/6, 1/6, 1/6]; t=2 is never scored (nothing after it)
    step = [[0.0, math.log(2), math.log(3)], [math.log(4), 0.0, 0.0], [9.0, 0.0, 0.0]]
    logits = torch.tensor([step] * 3)  # (3, 3, 3)
    labels = torch.tensor([[-100, 2, 0],  # ln 3/6 + ln 4/6 = ln 1/3
                           [-100, -100, 1],  # ln 1/6 (scored by the logits at t=1)
                           [1, -100, -100]])  # position 0 is never a target: no label at all
    got = sequence_logps(logits, labels)
    torch.testing.assert_close(got, torch.tensor([math.log(1 / 3), math.log(1 / 6), 0.0]))
    torch.testing.assert_close(sequence_logps(logits, labels, average=True),
                               torch.tensor([math.log(1 / 3) / 2, math.log(1 / 6), 0.0]))
    per_token, mask = token_logps(logits, labels)
    assert mask.tolist() == [[True, True, False], [False, True, False], [False, False, False]]
    assert per_token[0, 0].item() == pytest.approx(math.log(1 / 2))
    assert sequence_logps(logits.to(torch.bfloat16), labels).dtype == torch.float32
    with pytest.raises(ValueError, match=r"differ in \(B, T\)"):
        sequence_logps(logits, labels[:, :2])


def test_equals_transformers_on_a_right_padded_batch(tmp_path):
    transformers = pytest.importorskip("transformers")
    import lmzoo

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = lmzoo.load(tmp_path).eval()
    g = torch.Generator().manual_seed(1)
    lengths, prompts = [11, 7, 9], [4, 3, 5]
    ids = torch.randint(1, 61, (3, 11), generator=g)
    mask = torch.zeros(3, 11, dtype=torch.long)
    labels = torch.full((3, 11), -100)
    for b, (n, p) in enumerate(zip(lengths, prompts)):
        mask[b, :n] = 1
        ids[b, n:] = 0  # right padding
        labels[b, p:n] = ids[b, p:n]  # the response: positions p .. n-1
    with torch.no_grad():
        ref_logits = hf(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
        want = torch.tensor([sum(ref_logits[b, t - 1, ids[b, t]].item() for t in range(p, n))
                             for b, (n, p) in enumerate(zip(lengths, prompts))])
        got = response_logps(ours, ids, labels, attention_mask=mask)
        mean = response_logps(ours, ids, labels, attention_mask=mask, average=True)
        alone = response_logps(ours, ids[1:2, :7], labels[1:2, :7])  # the short row without its padding
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(mean, want / torch.tensor([7.0, 4.0, 4.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, want[1:2], atol=1e-5, rtol=0)
    assert got.abs().min() > 1.0  # a real sum over several tokens, not a vacuous zero
