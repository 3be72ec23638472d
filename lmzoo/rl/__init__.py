"""Reinforcement learning from rewards (PPO with a reward model, GRPO with verifiable rewards): rollouts
through the one inference engine, their log-probs recomputed in training, and the reward functions."""

from lmzoo.rl.rewards import RewardFn, load_reward, task_reward, with_penalties
from lmzoo.rl.rollout import Rollout, rollout, sequence_token_logps

__all__ = ["Rollout", "rollout", "sequence_token_logps", "RewardFn", "load_reward", "task_reward", "with_penalties"]
