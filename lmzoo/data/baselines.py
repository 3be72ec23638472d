"""The unigram baseline a language model must beat: how well token frequencies alone predict text.

    p(v) = (count_train(v) + 1) / (N_train + V)            (add-one smoothing: unseen tokens get mass)
    H    = -1/M · Σ_{t in val} ln p(x_t)      nats/token;   perplexity = exp(H)

A model that has learnt nothing about context cannot do better than this (for a fixed vocabulary,
the unigram distribution is the best context-free predictor), so "validation perplexity far below
the unigram baseline" is the evidence that it learnt context. ``lmzoo speedrun`` prints both.
"""

from __future__ import annotations

import math

import numpy as np


def unigram_log_probs(train_tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """(V,) natural-log probabilities with add-one smoothing."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    return np.log((counts + 1.0) / (counts.sum() + vocab_size))


def unigram_cross_entropy(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Mean -ln p(x) over ``eval_tokens`` under the smoothed unigram model of ``train_tokens`` (nats/token)."""
    logp = unigram_log_probs(train_tokens, vocab_size)
    ev = np.asarray(eval_tokens, dtype=np.int64).reshape(-1)
    return float(-logp[ev].mean())


def perplexity(nats: float) -> float:
    return math.exp(min(nats, 700.0))
