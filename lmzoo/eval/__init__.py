"""Evaluation: the built-in verifiable tasks answered by greedy decoding (``tasks``)."""

from lmzoo.eval.tasks import greedy_replies, sampled_replies, task_accuracy

__all__ = ["greedy_replies", "sampled_replies", "task_accuracy"]
