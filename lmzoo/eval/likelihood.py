"""Scoring text: log p(continuation | context) per request, and the rolling log-likelihood of whole
documents, for any model that predicts tokens (the primitive lm-evaluation-harness tasks are built on).

    loglikelihood(ctx, cont) = sum_i log p(cont_i | ctx, cont_<i)      (float32, as a Python float)
    is_greedy                = every cont_i is the argmax of its distribution

Where the model reads the context depends on its shape (``Family.shape`` in the registry), never on
its family's name:

- causal decoder (gpt2, llama, bloom, chatglm2, deepseek_v2): one row ``context + continuation``; the
  logits at positions len(ctx)-1 .. -2 score the continuation (the last token is never fed).
- prefix decoder (ChatGLM-6B): one row ``context + [gMASK] <sop> + continuation``, as ChatGLM-6B's
  tokenizer builds prompts (the tail comes from ``model.prompt_tail()``): the context is the
  bidirectional prefix, the continuation is scored causally after ``<sop>``. A context that already
  ends with ``[gMASK] <sop>`` (its tokenizer added them) gets them once, not twice.
- encoder-decoder (T5): encoder = context, decoder = ``decoder_start + continuation[:-1]`` with the
  continuation as labels: what lm-eval's ``HFLM(backend="seq2seq")`` feeds (no EOS is added here).

Too long for the model (``config.max_positions``): the continuation is kept whole and context tokens
are dropped from the left, as lm-eval does. Rows are sorted longest first, right-padded with an
attention mask and scored in batches; the results come back in request order.
"""

from __future__ import annotations

import torch
from torch import nn

from lmzoo.errors import ConfigError
from lmzoo.models.registry import family_of

SCORED_SHAPES = ("causal decoder", "prefix decoder", "encoder-decoder")


def model_shape(model: nn.Module) -> str:
    """The registry's shape of a loaded model's family ("causal decoder", "prefix decoder", ...)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"{type(model).__name__} has no .config; load it with lmzoo.load or build it with "
                          "lmzoo.build")
    return family_of(config).shape


def _check_scorable(model: nn.Module) -> str:
    shape = model_shape(model)
    if shape not in SCORED_SHAPES:
        raise ConfigError(f"log-likelihoods need a model that predicts tokens; the {family_of(model.config).name} "
                          f"family is an {shape} (scored shapes: {', '.join(SCORED_SHAPES)})")
    if shape == "prefix decoder" and not hasattr(model, "prompt_tail"):
        raise ConfigError(f"{type(model).__name__} is a prefix decoder without prompt_tail(); it cannot say which "
                          "tokens end its bidirectional prefix")
    return shape


def max_length(model: nn.Module) -> int:
    """Tokens the model reads at once: its config's ``max_positions`` (the trained context)."""
    return int(model.config.max_positions)


def with_prompt_tail(model: nn.Module, context: list[int]) -> list[int]:
    """``context`` ending with the prefix decoder's ``[gMASK] <sop>`` (added unless already there);
    any other model's context unchanged."""
    if not hasattr(model, "prompt_tail"):
        return list(context)
    tail = list(model.prompt_tail())
    return list(context) if list(context[-len(tail):]) == tail else list(context) + tail


def _rows(shape: str, model: nn.Module, requests, limit: int):
    """Per request: (encoder ids or None, decoder/causal ids fed, n scored at the end of the fed row)."""
    tail = list(model.prompt_tail()) if shape == "prefix decoder" else []
    out = []
    for k, (ctx, cont) in enumerate(requests):
        ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
        if not cont:
            raise ConfigError(f"loglikelihoods: request {k} has an empty continuation; there is nothing to score")
        if shape == "encoder-decoder":
            if not ctx:
                raise ConfigError(f"loglikelihoods: request {k} has an empty context; the encoder needs at least one "
                                  "token (lm-eval puts its prefix token there)")
            if len(cont) > limit:
                raise ConfigError(f"loglikelihoods: request {k}'s continuation has {len(cont)} tokens, more than the "
                                  f"model's max_positions {limit}")
            out.append((ctx[-limit:], [model.decoder_start_token_id] + cont[:-1], len(cont)))
            continue
        if tail and ctx[-len(tail):] == tail:
            ctx = ctx[:-len(tail)]
        if not ctx and not tail:
            raise ConfigError(f"loglikelihoods: request {k} has an empty context; a causal decoder needs at least "
                              "one token to predict the first continuation token from (give BOS/EOS, as lm-eval does)")
        room = limit - len(tail) - (len(cont) - 1)  # context tokens that fit beside the fed continuation
        if room < (0 if tail else 1):
            raise ConfigError(f"loglikelihoods: request {k}'s continuation has {len(cont)} tokens, more than the "
                              f"model's max_positions {limit} leaves room for"
                              + (" after [gMASK] <sop>" if tail else ""))
        ctx = ctx[len(ctx) - min(room, len(ctx)):]  # keep the end: drop from the left
        out.append((None, ctx + tail + cont[:-1], len(cont)))
    return out


def _pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)  # (B, T) right-padded
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], *, batch_size: int = 16,
                   progress=None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context) in float32, is_greedy) for each (context_ids, continuation_ids).

    See the module docstring for how each shape reads a request and how too-long requests are cut.
    An empty continuation, a continuation longer than the model's context, an empty context (causal
    decoders and encoder-decoders) and a model that predicts no tokens raise ``ConfigError``.
    ``progress(done, total)`` is called after each batch."""
    if batch_size < 1:
        raise ConfigError(f"loglikelihoods: batch_size must be >= 1, got {batch_size}")
    shape = _check_scorable(model)
    rows = _rows(shape, model, requests, max_length(model))
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][1]) + len(rows[i][0] or [])))
    device = next(model.parameters()).device
    pad = getattr(model.config, "pad_token_id", None) or 0
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    was = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            fed, fed_mask = _pad([rows[i][1] for i in chunk], pad, device)
            if shape == "encoder-decoder":
                enc, enc_mask = _pad([rows[i][0] for i in chunk], pad, device)
                logits = model(input_ids=enc, attention_mask=enc_mask, decoder_input_ids=fed).logits
            else:
                logits = model(fed, attention_mask=fed_mask).logits  # (B, T, V)
            logp = logits.float().log_softmax(-1)
            for b, i in enumerate(chunk):
                ctx_and_cont, n = requests[i], rows[i][2]
                cont = torch.tensor([int(t) for t in ctx_and_cont[1]], device=device)  # (n,)
                end = len(rows[i][1])  # the fed row's length: its last position predicts the last token
                lp = logp[b, end - n:end] if shape != "encoder-decoder" else logp[b, :n]  # (n, V)
                picked = lp.gather(-1, cont[:, None]).squeeze(-1)
                results[i] = (float(picked.sum()), bool((lp.argmax(-1) == cont).all()))
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was)
    return results  # type: ignore[return-value]


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows that score every token of ``tokens`` once: the first
    window predicts up to ``max_len`` tokens from ``prefix_token``, each later one up to ``max_len``
    tokens from the tokens before them, so that every fed row is ``max_len`` long (a full window has
    one context token; the shorter last one has more). lm-eval's ``get_rolling_token_windows(...,
    context_len=1)`` followed by ``make_disjoint_window``: the windows ``HFLM.loglikelihood_rolling`` scores."""
    if max_len < 1:
        raise ConfigError(f"rolling_windows: max_len must be >= 1, got {max_len}")
    windows, done = [], 0
    while done < len(tokens):
        n = min(max_len, len(tokens) - done)
        ctx = [prefix_token] if done == 0 else tokens[done - (max_len - n + 1):done]
        windows.append((ctx, tokens[done:done + n]))
        done += n
    return windows


def rolling_loglikelihoods(model, documents: list[list[int]], *, prefix_token: int, batch_size: int = 16,
                           progress=None) -> list[float]:
    """log p(document) per token list, summed over its ``rolling_windows`` (all documents' windows are
    batched together). Windows leave room for a prefix decoder's ``[gMASK] <sop>``."""
    room = max_length(model) - len(model.prompt_tail() if hasattr(model, "prompt_tail") else [])
    owner, windows = [], []
    for d, tokens in enumerate(documents):
        w = rolling_windows([int(t) for t in tokens], prefix_token, room)
        owner += [d] * len(w)
        windows += w
    scores = loglikelihoods(model, windows, batch_size=batch_size, progress=progress)
    totals = [0.0] * len(documents)
    for d, (lp, _) in zip(owner, scores):
        totals[d] += lp
    return totals
