"""Evaluation (docs/eval.md): sliding-window perplexity (``perplexity``), log-likelihoods of
continuations (``likelihood``), the built-in tasks (``suite``: exact match and multiple choice; ``tasks``:
greedy replies), the model under evaluation (``model.EvalModel``), results and reports (``report``) and the
lm-evaluation-harness adapter (``harness``, needs ``lmzoo[eval]``, imported only when used)."""

from lmzoo.eval.likelihood import loglikelihoods, rolling_loglikelihoods
from lmzoo.eval.model import EvalModel
from lmzoo.eval.perplexity import ids_perplexity, text_perplexity
from lmzoo.eval.report import evaluate
from lmzoo.eval.tasks import greedy_replies, sampled_replies, task_accuracy

__all__ = ["greedy_replies", "sampled_replies", "task_accuracy", "text_perplexity", "ids_perplexity",
           "loglikelihoods", "rolling_loglikelihoods", "EvalModel", "evaluate"]
