"""Training objectives: each a pure function of model outputs and targets, with a unit test.

``contrastive``: the symmetric InfoNCE of CLIP.
``causal_lm``: next-token prediction (+ MoE aux); ``masked_lm``: BERT's 80/10/10 masking + NSP;
``chunked_ce``: the same causal-LM loss fused with the head, chunk by chunk (no (B·T, V) logits);
``sft``: the loss on the labelled (assistant) tokens; ``preference``: Bradley–Terry, DPO and its variants;
``logprobs``: a response's summed (or mean) log-probs; ``rl``: KL estimators, GAE, PPO's and GRPO's losses;
``span_corruption``: T5's sentinels; ``glm``: ChatGLM-6B's blank infilling; ``classification``: ViT.
``base`` holds the registry: ``make_step_fn(name, ...)`` and ``make_transform(name, ...)`` give the
training loop its ``step_fn`` and the data its seeded batch transform (docs/objectives.md).
"""

from lmzoo.objectives.base import OBJECTIVES, get_objective, make_step_fn, make_transform, objective_for
from lmzoo.objectives.chunked_ce import chunked_causal_lm_loss

__all__ = ["OBJECTIVES", "get_objective", "make_step_fn", "make_transform", "objective_for", "chunked_causal_lm_loss"]
