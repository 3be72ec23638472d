"""Sliding-window perplexity of texts: transformers' perplexity guide, counted exactly.

Each text is one document, tokenized alone. A document of n tokens holds n - 1 (input, next token)
pairs; the guide's loop runs over the pairs: window k covers pairs [begin, end), begin = k·stride,
end = min(begin + width, pairs), and scores only the pairs past the previous window's end, so every
token after the first is predicted exactly once, a later window's with the overlap as its context.

    loss = Σ -ln p(x_t | window's tokens before t) / #predicted      bits_per_byte = Σ NLL / (ln 2 · bytes)

diff from the guide: it weights each window's mean loss by (valid labels - 1), one token short per later
window, and its windows of ``context`` tokens predict only context - 1 of them, so with stride == context
the first token of every later window is never predicted; here the windows are ``context`` inputs and
their next tokens, and the sum is the exact sum of per-token NLLs.

How each family's windows look (the family's ``shape`` decides, lmzoo/models/registry.py):

- causal decoder: the document starts with the tokenizer's BOS where it has one (its first token is
  context only); a window is its ``context`` tokens, right-padded in the batch.
- prefix decoder (ChatGLM-6B): the model reads its prefix and 2D positions off [gMASK] <sop> in each
  row, so every window starts with them (``model.prompt_tail()``) and an empty prefix: a window is
  [gMASK] <sop> + its text tokens, scored causally after <sop>. <sop> plays BOS: it predicts the
  document's first token (in the first window); a later window's <sop> prediction is never scored.
- encoder-decoder (T5): the window's already-scored tokens go to the encoder, ended by EOS as T5's
  tokenizer ends every input (the first window's encoder reads EOS alone); the tokens it scores are
  the decoder's labels, from ``decoder_start_token_id``. Every text token is predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmzoo.data.baselines import perplexity
from lmzoo.errors import ConfigError
from lmzoo.models.registry import family_of

DECODERS = ("causal decoder", "prefix decoder")


def windows(pairs: int, width: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, start, end) of each window over ``pairs`` predictions: it sees pairs [begin, end) and
    scores [start, end), start being the previous window's end. Empty when there is nothing to predict."""
    out, prev = [], 0
    for begin in range(0, pairs, stride):
        end = min(begin + width, pairs)
        out.append((begin, prev, end))
        prev = end
        if end == pairs:
            break
    return out


@dataclass
class _Layout:
    """How one family turns a window into a row: ``width`` pairs per window, ``lead`` tokens before a
    decoder window's inputs (None: the document's own previous token), ``eos`` ending an encoder input."""
    shape: str
    width: int
    lead: list[int] | None = None
    eos: int | None = None

    def row(self, doc: list[int], begin: int, start: int, end: int) -> tuple[list[int], list[int]]:
        """(model input, the targets it scores). Decoders: the targets are predicted by the input's last
        positions. Encoder-decoder: the input is the encoder's, the targets are the decoder's labels."""
        if self.shape == "encoder-decoder":
            return doc[begin:start] + [self.eos], doc[start:end]
        if self.lead is None:  # pair i is (doc[i], doc[i + 1])
            return doc[begin:end], doc[start + 1:end + 1]
        return self.lead + doc[begin:end - 1], doc[start:end]  # pair i is (the token before doc[i], doc[i])


def _layout(model, context: int) -> _Layout:
    fam = family_of(model.config)
    if fam.shape == "causal decoder":
        return _Layout(fam.shape, width=context)
    if fam.shape == "prefix decoder":
        tail = getattr(model, "prompt_tail", None)
        if tail is None:
            raise ConfigError(f"perplexity: the {fam.name} prefix decoder has no prompt_tail() to start a window with")
        lead = list(tail())
        return _Layout(fam.shape, width=context - len(lead) + 1, lead=lead)
    if fam.shape == "encoder-decoder":
        eos = model.config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        if eos is None:
            raise ConfigError(f"perplexity: the {fam.name} config names no eos_token_id to end the encoder input")
        return _Layout(fam.shape, width=context, eos=eos)
    raise ConfigError(f"perplexity needs a decoder or an encoder-decoder; the {fam.name} family is a '{fam.shape}'")


def _check_window(model, context, stride) -> tuple[int, int, _Layout]:
    limit = model.config.max_positions
    context = limit if context is None else context
    if not isinstance(context, int) or isinstance(context, bool) or context <= 1:
        raise ConfigError(f"perplexity: context must be an integer of at least 2 tokens, got {context!r}")
    if context > limit:
        raise ConfigError(f"perplexity: context {context} is longer than the model's maximum length {limit} "
                          "(config.max_positions)")
    layout = _layout(model, context)
    stride = layout.width if stride is None else stride
    if not isinstance(stride, int) or isinstance(stride, bool) or stride <= 0:
        raise ConfigError(f"perplexity: stride must be a positive integer, got {stride!r}")
    if stride > layout.width:
        lead = f" after the {len(layout.lead)} tokens {layout.lead} it starts with" if layout.lead else ""
        raise ConfigError(f"perplexity: stride {stride} > {layout.width}, the most tokens a window of {context} "
                          f"scores{lead}: a stride larger than the context would skip tokens")
    return context, stride, layout


def _pad(rows: list[list[int]], value: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [value] * (T - len(r)) for r in rows], device=device)  # (B, T) right-padded
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=device)
    return ids, mask


def _decoder_nll(model, rows: list[tuple[list[int], list[int]]], device) -> torch.Tensor:
    """Summed NLL of the targets, each predicted by the last len(targets) positions of its row."""
    ids, mask = _pad([x for x, _ in rows], 0, device)
    T = ids.shape[1]
    keep = T - min(len(x) - len(y) for x, y in rows)  # from the earliest scored position on
    out = model(ids, attention_mask=None if bool(mask.all()) else mask, logits_to_keep=0 if keep == T else keep)
    offset = T - keep  # column 0 of the kept logits is position ``offset``
    r = torch.tensor([k for k, (_, y) in enumerate(rows) for _ in y], device=device)
    p = torch.tensor([len(x) - len(y) + j - offset for x, y in rows for j in range(len(y))], device=device)
    targets = torch.tensor([t for _, y in rows for t in y], device=device)
    logits = out.logits[r, p].float()  # (N, V): only the scored positions
    return F.cross_entropy(logits, targets, reduction="none").double().sum()


def _seq2seq_nll(model, rows: list[tuple[list[int], list[int]]], device) -> torch.Tensor:
    """Summed NLL of the decoder labels; right padding of the labels (-100) leaves the real ones alone."""
    enc, enc_mask = _pad([x for x, _ in rows], 0, device)
    labels, _ = _pad([y for _, y in rows], -100, device)
    out = model(input_ids=enc, attention_mask=None if bool(enc_mask.all()) else enc_mask, labels=labels)
    logits = out.logits.float()  # (B, T_dec, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum").double()


@torch.no_grad()
def ids_perplexity(model, documents: list[list[int]], *, context: int | None = None, stride: int | None = None,
                   batch_size: int = 8, progress=None) -> dict:
    """Perplexity of token-id documents, as the model reads them: a decoder's document starts with its
    BOS (the first token is context only); a prefix decoder's and an encoder-decoder's every token is
    predicted. {"loss", "perplexity", "tokens", "documents", "context", "stride", "nll" (the summed
    NLL in nats)}; see the module for the windows."""
    context, stride, layout = _check_window(model, context, stride)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"perplexity: batch_size must be a positive integer, got {batch_size!r}")
    causal = layout.shape == "causal decoder"
    rows = [layout.row(doc, *w) for doc in documents
            for w in windows(len(doc) - 1 if causal else len(doc), layout.width, stride)]
    if not rows:
        raise ConfigError("perplexity: nothing to score: no document has a token to predict")
    device = next(model.parameters()).device
    score = _seq2seq_nll if layout.shape == "encoder-decoder" else _decoder_nll
    was = model.training
    model.eval()
    try:
        nll = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, len(rows), batch_size):
            nll += score(model, rows[i:i + batch_size], device)
            if progress is not None:
                progress(min(i + batch_size, len(rows)), len(rows))
    finally:
        model.train(was)
    tokens = sum(len(y) for _, y in rows)
    loss = float(nll) / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens, "documents": len(documents),
            "context": context, "stride": stride, "nll": float(nll)}


def text_perplexity(model, tok, texts: list[str], *, context: int | None = None, stride: int | None = None,
                    batch_size: int = 8, progress=None) -> dict:
    """Sliding-window perplexity of ``texts`` (one document each; see the module for the windows).

    ``context`` defaults to the model's maximum length (``config.max_positions``), ``stride`` to
    non-overlapping windows. Special-token strings in a text are encoded as plain text. A causal
    decoder's document starts with ``tok.bos_id`` where there is one; without a BOS its first token
    is context only, yet its bytes still count, so bits_per_byte then leaves those tokens out of the
    numerator. ``progress(done, total)`` is called after each batch, counted in windows.
    Returns {"loss" (nats per predicted token), "perplexity", "bits_per_byte", "tokens", "bytes",
    "documents", "context", "stride"}.
    """
    if isinstance(texts, str) or not texts or not any(texts):
        raise ConfigError("perplexity: nothing to score: " + ("pass a list of texts, not one string"
                                                              if isinstance(texts, str) else "no non-empty text"))
    docs = [tok.encode(t, split_special=False) for t in texts]
    if family_of(model.config).shape == "causal decoder" and tok.bos_id is not None:
        docs = [d if d[:1] == [tok.bos_id] else [tok.bos_id] + d for d in docs]
    out = ids_perplexity(model, docs, context=context, stride=stride, batch_size=batch_size, progress=progress)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    out.update(bits_per_byte=out.pop("nll") / (math.log(2) * n_bytes), bytes=n_bytes)
    return out
