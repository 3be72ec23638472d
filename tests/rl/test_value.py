"""The PPO critic: a reward model's head read at every position (at the last token it is the reward
model's own score), values aligned with the response tokens, a policy copy that shares no weight, the
one forward of policy and critic equal to the rollout module's log-probs, dropout off, bad vocabularies."""

from __future__ import annotations

import pytest
import torch

import lmzoo
from lmzoo.errors import ConfigError
from lmzoo.rl import sequence_token_logps
from lmzoo.rl.value import PolicyAndCritic, build_critic, critic_from_policy, critic_from_reward, response_values
from tests.stages.test_sft import tiny_decoder, tok  # noqa: F401  (tok: the shared tokenizer fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(tok):
    ids = [tok.encode("What is 3 + 4? 7"), tok.encode("hello"), tok.encode("从小到大排序：3 1 2")]
    T = max(map(len, ids))
    x = torch.tensor([r + [tok.pad_id] * (T - len(r)) for r in ids])  # (3, T) right-padded
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in ids])
    return x, mask, [len(r) for r in ids]


def test_a_reward_model_critic_reads_the_reward_at_the_last_token_and_values_everywhere(tok):
    torch.manual_seed(1)
    rm = lmzoo.reward_model(tiny_decoder("llama", tok), pad_token_id=tok.pad_id).eval()
    critic = critic_from_reward(rm).eval()
    x, mask, lengths = _rows(tok)
    with torch.no_grad():
        rewards = rm(x, attention_mask=mask).rewards  # (3,) at each row's last non-pad token
        values = critic(x, attention_mask=mask)  # (3, T)
        h = rm(x, attention_mask=mask).hidden_states  # (3, T, D): the score head by hand at every position
    assert values.shape == x.shape
    torch.testing.assert_close(values[torch.arange(3), torch.tensor(lengths) - 1], rewards, atol=1e-5, rtol=0)
    torch.testing.assert_close(values, (h @ rm.score.weight[0]).float(), atol=1e-5, rtol=0)
    assert values[0, :lengths[0]].std() > 0  # not one number copied along the row
    assert not {id(p) for p in critic.parameters()} & {id(p) for p in rm.parameters()}  # a copy


def test_values_align_with_the_response_tokens():
    v = torch.arange(12.0).view(2, 6)  # per-position values; prompt in columns 0..2, responses in 3..5
    # the value of the state before the token at column c is read at column c - 1
    assert response_values(v, 3).tolist() == [[2.0, 3.0, 4.0], [8.0, 9.0, 10.0]]
    with pytest.raises(ValueError, match="prompt_len 0"):
        response_values(v, 0)


def test_a_policy_critic_is_a_copy_and_the_joint_forward_gives_the_rollout_logps(tok):
    torch.manual_seed(0)
    policy = tiny_decoder("llama", tok, attention_dropout=0.5)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    critic = critic_from_policy(policy)
    assert not {id(p) for p in critic.parameters()} & {id(p) for p in policy.parameters()}
    assert policy.lm_head is not None and "lm_head.weight" in policy.state_dict()  # the policy keeps its head
    joint = PolicyAndCritic(policy, critic)
    joint.train()
    assert not policy.training and not critic.training  # dropout stays off: the ratio must start at 1
    x, mask, lengths = _rows(tok)
    P = 3
    resp = mask.clone()
    resp[:, :P] = 0
    logps, entropy, values = joint(x, mask, P, temperature=0.7)
    ref = sequence_token_logps(policy, x, mask, resp, temperature=0.7)[:, P:]
    m = resp[:, P:].bool()
    torch.testing.assert_close(logps[m], ref[m], atol=1e-5, rtol=0)
    assert entropy.shape == values.shape == logps.shape == (3, x.shape[1] - P)
    assert bool((entropy[m] > 0).all()) and bool((entropy[m] <= torch.log(torch.tensor(float(tok.vocab_size)))).all())
    (logps[m].sum() + values[m].sum()).backward()
    assert policy.embed.weight.grad is not None and critic.score.weight.grad is not None
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_a_reward_model_of_another_vocabulary_cannot_start_the_critic(tok, tmp_path):
    other = lmzoo.train_tokenizer("bpe", texts=["some other text"] * 30, vocab_size=280,
                                  special_tokens=["<s>", "</s>", "<pad>"])
    other.set_special("pad", "<pad>")
    rm_dir = lmzoo.save(lmzoo.reward_model(tiny_decoder("llama", other), pad_token_id=other.pad_id),
                        tmp_path / "rm", tokenizer=other)
    policy = tiny_decoder("llama", tok)
    with pytest.raises(ConfigError, match="Set ppo.critic: policy"):
        build_critic("reward", policy, tok, rm_dir)
    with pytest.raises(ConfigError, match="not a reward-model directory"):
        build_critic("reward", policy, tok, None)
    with pytest.raises(ConfigError, match="must be one of"):
        build_critic("tied", policy, tok, rm_dir)
    same = lmzoo.save(lmzoo.reward_model(tiny_decoder("llama", tok), pad_token_id=tok.pad_id), tmp_path / "same",
                      tokenizer=tok)
    assert build_critic("reward", policy, tok, same).score.weight.shape == (1, policy.config.d_model)
