"""The critic of PPO: a value head over a decoder trunk, one value per position.

    V(s_t) = w · h_{t-1},   h = the trunk's final (normed) hidden states, (B, T, D),  w: (1, D)

State s_t is the prompt plus the response tokens before y_t, so V(s_t) is read at the position that
*predicts* y_t, the one before it (``response_values``: the (N, R) values aligned with the response
tokens, as ``lmzoo.objectives.rl`` lays them out; TRL's former PPOTrainer sliced them the same way).

Where it starts (``build_critic``):

- ``reward`` (the default with a reward model): a copy of the reward model, its ``score`` head applied
  at every position instead of only the last. InstructGPT (Ouyang et al. 2022, §3.5, "we initialize the
  value function from the RM") and TRL's PPO (the value model is loaded from the reward model's path) do
  this: at the last response token the critic starts out predicting exactly the reward it will get, and
  its trunk already reads what the reward model reads. It must read the policy's tokens, so the reward
  model's vocabulary must be the policy's (``ConfigError`` otherwise: use ``critic: policy``).
- ``policy``: a copy of the policy's decoder with a fresh scalar head (N(0, initializer_range²), as a
  reward model's new head; lm-human-preferences shares the policy's trunk, we copy it so the value loss
  never moves the policy's weights). The choice for rewards that are not a reward model (``task:``,
  ``module:function``), where there is nothing else to start from.

The critic is a separate network, trained with the policy in one optimizer step (``PolicyAndCritic``):
the loss is policy loss + vf_coef · value loss, so the two never share gradients.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lmzoo.errors import ConfigError

CRITICS = ("reward", "policy")


class ValueModel(nn.Module):
    """decoder trunk (no LM head) -> final hidden states (B, T, D) -> ``score`` -> (B, T) values."""

    def __init__(self, decoder: nn.Module, score: nn.Linear):
        super().__init__()
        from lmzoo.models.reward import NoHead

        if score.out_features != 1:
            raise ConfigError(f"a value head is Linear(D, 1), got out_features {score.out_features}")
        self.decoder, self.score = decoder, score
        self.decoder.lm_head = NoHead()  # the trunk's hidden states only
        self.config = decoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.decoder(input_ids, attention_mask=attention_mask).hidden_states  # (B, T, D)
        return self.score(h).squeeze(-1).float()  # (B, T)


def critic_from_reward(rm) -> ValueModel:
    """A copy of a ``RewardModel`` as a critic (its score head at every position)."""
    rm = copy.deepcopy(rm)
    return ValueModel(rm.decoder, rm.score)


def critic_from_policy(policy: nn.Module) -> ValueModel:
    """A copy of the policy's decoder with a new scalar head."""
    from lmzoo.models.reward import reward_model

    rm = reward_model(policy)  # a deep copy with a fresh N(0, initializer_range²) head; the policy is untouched
    return ValueModel(rm.decoder, rm.score)


def build_critic(kind: str, policy: nn.Module, tok, reward_dir=None) -> ValueModel:
    """The critic ``kind`` names (``CRITICS``), for ``policy`` (whose tokenizer is ``tok``); ``reward``
    needs the reward-model directory and refuses one that does not read the policy's tokens."""
    if kind not in CRITICS:
        raise ConfigError(f"ppo.critic must be one of {list(CRITICS)}, got {kind!r}")
    if kind == "policy":
        return critic_from_policy(policy)
    if reward_dir is None:
        raise ConfigError("ppo.critic: reward starts the critic from the reward model, but the reward is not a "
                          "reward-model directory; set ppo.critic: policy")
    from lmzoo.models.reward import reward_model
    from lmzoo.tokenizers import find_tokenizer, load_tokenizer

    rm = reward_model(reward_dir, dtype=next(policy.parameters()).dtype)
    vocab = rm.decoder.embed.weight.shape[0]
    probe = "What is 3 + 4? 7 从小到大排序 hello"
    rm_tok = load_tokenizer(reward_dir) if find_tokenizer(reward_dir) is not None else None
    same = (tok.vocab_size <= vocab and (rm_tok is None or (rm_tok.vocab_size == tok.vocab_size
                                                           and rm_tok.encode(probe) == tok.encode(probe))))
    if not same:
        theirs = f"{rm_tok.vocab_size} tokens" if rm_tok is not None else f"an embedding of {vocab}"
        raise ConfigError(f"ppo.critic: reward: the critic starts from the reward model {reward_dir}, which reads "
                          f"another vocabulary ({theirs}) than the policy's ({tok.vocab_size} tokens); the critic "
                          "reads the policy's tokens. Set ppo.critic: policy (the reward model still scores the "
                          "decoded text through its own tokenizer)")
    return critic_from_reward(rm)


def response_values(values: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(N, R) V(s_t) of each response token from (N, T) per-position values of (N, T) = prompt + response
    sequences, R = T − prompt_len: the value read at the position before each response token."""
    if not 0 < prompt_len < values.shape[1]:
        raise ValueError(f"prompt_len {prompt_len} must leave a prompt and a response in {values.shape[1]} columns")
    return values[:, prompt_len - 1:-1]  # column c - 1 has read the state before the token at c


class PolicyAndCritic(nn.Module):
    """The one module the training loop trains: the policy and the critic, one forward for both (so DDP
    sees one forward and all-reduces both gradients). Dropout stays off in training (``train()`` keeps
    both in eval mode, as TRL's PPO disables dropout): the ratio π_θ/π_old must start at 1, and the
    values at rollout must equal the critic's training forward."""

    def __init__(self, policy: nn.Module, critic: ValueModel):
        super().__init__()
        self.policy, self.critic = policy, critic

    def train(self, mode: bool = True):
        super().train(mode)
        self.policy.eval()
        self.critic.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int | None = None,
                temperature: float = 1.0, *, part: str | None = None, **kw):
        """((N, R) log π(y_t) of each response token under the temperature-scaled policy, with grad;
        (N, R) the entropy of each of those distributions, without; (N, R) V(s_t), with grad).
        ``part="policy"`` or ``"critic"``: that module's own forward (``kw`` passed on), called through
        this one so FSDP2's root hooks gather the root-level parameters (see ``Part``)."""
        from lmzoo.objectives.rl import token_entropy

        if part is not None:
            return getattr(self, part)(input_ids, attention_mask=attention_mask, **kw)

        T = input_ids.shape[1]
        keep = T - prompt_len + 1  # the logits at prompt_len - 1 .. T - 1; the last one predicts nothing
        logits = self.policy(input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits[:, :-1]
        z = logits.float() / temperature  # (N, R, V)
        logps = torch.log_softmax(z, dim=-1).gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)  # (N, R)
        with torch.no_grad():
            entropy = token_entropy(z)
        values = response_values(self.critic(input_ids, attention_mask=attention_mask), prompt_len)
        return logps, entropy, values


class Part:
    """``Part(policy_and_critic, "policy")`` behaves as ``policy_and_critic.policy`` (generation, reference
    log-probs, the held-out hook take it) but is called through the root's forward. Under FSDP2 the root
    module's hooks gather the parameters outside the transformer blocks (embeddings, final norm, head,
    score head); calling the child directly would leave those sharded."""

    def __init__(self, root: PolicyAndCritic, name: str):
        self.__dict__["_root"], self.__dict__["_name"] = root, name

    def __call__(self, *args, **kw):
        return self._root(*args, part=self._name, **kw)

    def __getattr__(self, attr):
        return getattr(getattr(self._root, self._name), attr)

    @property
    def sharded(self) -> bool:
        """True when the root is an FSDP2 module (the engine then decodes under no_grad, ranks in step)."""
        from lmzoo.generate.engine import is_sharded

        return is_sharded(self._root)
