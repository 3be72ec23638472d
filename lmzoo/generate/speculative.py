"""Speculative decoding: a cheap drafter proposes k tokens, the target checks them all in one forward.

Each round the target runs ONE cached forward over [the tokens it has not seen yet (the last one,
or the whole prompt on the first round) + the k drafts] and keeps the last k + 1 logits: p_1..p_{k+1}.
The drafts it accepts and one token of its own are appended; its cache is then cropped
(``KVCache.crop``) to the accepted length, so the rejected drafts are forgotten. A round therefore
yields between 1 and k + 1 tokens for one target forward.

Two drafters:
  a draft model    a smaller decoder on the same vocabulary, with its own KV cache (cropped alike);
  prompt lookup    (``prompt_lookup=n``; Saxena 2023, transformers' ``PromptLookupCandidateGenerator``):
                   the first earlier occurrence of the sequence's last n tokens (then n-1, .., 1) and
                   the k tokens that followed it; no model, no cost. No match: no drafts, a plain step.

Verification:
  greedy    accept while the draft equals the target's argmax, then append the target's argmax at
            the first mismatch (or after the last draft), so the output is token for token plain
            greedy decoding's.
  sampled   Leviathan et al. 2023 (§2.3, Algorithm 1) / Chen et al. 2023 (Algorithm 2): accept
            draft x with probability min(1, p(x)/q(x)); at the first rejection sample from
            norm(max(p - q, 0)); if all k are accepted, sample a bonus token from p_{k+1}. Every
            token is then distributed exactly as p (Chen et al., Theorem 1), and a draft is accepted
            with probability α = Σ_x min(p(x), q(x)) = 1 - TV(p, q) (Leviathan et al. §3). p and q are the
            processed distributions (temperature, top-k, top-p by ``process_logits``, the same for
            both). Prompt lookup is a deterministic drafter, q = one-hot(x): the same rule accepts x
            with probability p(x) and otherwise samples from p with x removed, renormalised.

Batch 1 only (rows of a batch accept different numbers of drafts; that needs a ragged cache). No
repetition penalty: it would change with every accepted draft inside one verification forward.
``max_new_tokens`` is never overshot: a round proposes at most (tokens still wanted - 1) drafts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from lmzoo.errors import LmzooError
from lmzoo.generate.sampling import LogitsProcessor, process_logits


@dataclass
class SpecStats:
    """Counters of one ``speculative_generate`` call."""

    proposed: int = 0  # draft tokens the target verified
    accepted: int = 0  # of those, accepted
    target_forwards: int = 0  # the first one is also the prefill
    draft_forwards: int = 0
    new_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed (0.0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per target forward; plain decoding's is 1.0."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate, "tokens_per_forward": self.tokens_per_forward}


# -- verification: pure functions of the target's and the drafter's distributions ----------------


def verify_greedy(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[int, int]:
    """(number of drafts accepted j, the target's own next token) from the (m + 1, V) target logits
    and the (m,) drafts: j = the length of the leading run where draft == argmax."""
    best = logits.argmax(-1)  # (m + 1,)
    m = drafts.shape[0]
    j = int((best[:m] == drafts).long().cumprod(0).sum())
    return j, int(best[j])


def verify_sampled(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023, Algorithm 1): p (m + 1, V) target probabilities,
    q (m, V) the drafter's (one-hot rows for a deterministic drafter), drafts (m,) drawn from q.
    -> (number accepted j, next token: from norm(max(p_j - q_j, 0)) if j < m, else from p_m)."""
    m = drafts.shape[0]
    rows = torch.arange(m, device=p.device)
    r = torch.rand(m, generator=generator, device=p.device)
    accept = r * q[rows, drafts] < p[rows, drafts]  # r < p(x)/q(x), without dividing by q
    j = int(accept.long().cumprod(0).sum())
    if j == m:
        dist = p[m]  # every draft accepted: the bonus token
    else:
        dist = (p[j] - q[j]).clamp(min=0)  # the residual norm(max(p - q, 0)) (Leviathan et al. §2.3)
        if float(dist.sum()) <= 0:  # p == q up to rounding: a rejection then has probability ~0
            dist = p[j]
    return j, int(torch.multinomial(dist / dist.sum(), 1, generator=generator))


# -- drafters --------------------------------------------------------------------------------


def lookup_ngram(tokens: list[int], n_max: int, m: int) -> list[int]:
    """Up to m tokens that followed the first earlier occurrence of the last n tokens, n = n_max..1;
    [] if none of those suffixes occurred before."""
    L = len(tokens)
    for n in range(min(n_max, L - 1), 0, -1):
        suffix = tokens[L - n:]
        for i in range(L - n):  # window starts before the suffix's own
            if tokens[i:i + n] == suffix:
                return tokens[i + n:i + n + m]  # i + n <= L - 1: at least one token follows
    return []


class PromptLookup:
    """Drafts copied from the sequence itself; q is one-hot on them."""

    def __init__(self, n: int, vocab_size: int):
        if n < 1:
            raise ValueError(f"prompt_lookup must be an n-gram size >= 1, got {n}")
        self.n, self.vocab_size = n, vocab_size

    def propose(self, tokens: list[int], m: int, stats: SpecStats) -> tuple[list[int], torch.Tensor | None]:
        drafts = lookup_ngram(tokens, self.n, m)
        q = torch.nn.functional.one_hot(torch.tensor(drafts, dtype=torch.long), self.vocab_size).float()
        return drafts, q

    def rewind(self, length: int) -> None:
        pass  # holds no state


class DraftModel:
    """A small decoder with its own KV cache: m cached forwards propose m tokens (the last draft is
    not fed back; the next round's catch-up forward feeds whatever of the sequence it lacks)."""

    def __init__(self, model: nn.Module, max_len: int, proc: LogitsProcessor, generator: torch.Generator | None):
        self.model, self.proc, self.generator = model, proc, generator
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(1, max_len)

    def propose(self, tokens: list[int], m: int, stats: SpecStats) -> tuple[list[int], torch.Tensor | None]:
        out, qs = [], []
        for _ in range(m):
            pending = (tokens + out)[self.cache.length:]
            ids = torch.tensor([pending], dtype=torch.long, device=self.device)
            logits = self.model(ids, cache=self.cache, logits_to_keep=1).logits[:, -1].float()  # (1, V)
            stats.draft_forwards += 1
            logits = process_logits(logits, ids, self.proc)
            if self.proc.do_sample:
                q = logits.softmax(-1)
                out.append(int(torch.multinomial(q, 1, generator=self.generator)))
                qs.append(q[0])
            else:
                out.append(int(logits.argmax(-1)))
        return out, (torch.stack(qs) if qs else None)

    def rewind(self, length: int) -> None:
        """Forget what it drafted beyond the ``length`` tokens the target kept."""
        self.cache.crop(min(length, self.cache.length))


# -- the loop --------------------------------------------------------------------------------


def _vocab_size(model: nn.Module) -> int:
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return v if v is not None else model.lm_head.out_features


def _check_model(model: nn.Module, role: str, needed: int) -> None:
    if getattr(model, "is_encoder_decoder", False) or not hasattr(model, "new_cache"):
        raise LmzooError(f"speculative_generate: the {role} {type(model).__name__} is not a decoder-only model")
    limit = getattr(model.config, "max_positions", None)
    if limit is not None and needed > limit:
        raise LmzooError(f"speculative_generate: prompt + max_new_tokens = {needed} tokens exceeds the {role}'s "
                         f"context of {limit} tokens")


def speculative_generate(target: nn.Module, input_ids: torch.Tensor, *, draft: nn.Module | None = None,
                         prompt_lookup: int | None = None, k: int = 4, max_new_tokens: int, do_sample: bool = False,
                         temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                         eos_token_id=None, generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, SpecStats]:
    """Prompt followed by the new tokens, (1, T + n), and the counters. Give ``draft`` (a decoder on the
    target's vocabulary) or ``prompt_lookup`` (the n-gram size), not both; ``k`` drafts per round.
    Greedy output equals ``lmzoo.generate``'s; sampled output has the target's distribution."""
    if (draft is None) == (prompt_lookup is None):
        raise ValueError("speculative_generate: give exactly one drafter, draft=<model> or prompt_lookup=<n>")
    if k < 1:
        raise ValueError(f"k (drafts per round) must be >= 1, got {k}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise LmzooError(f"speculative_generate: batch 1 only, got {input_ids.shape[0]} rows (each row would accept "
                         f"a different number of drafts); call it once per prompt")
    T = input_ids.shape[1]
    if T == 0:
        raise LmzooError("speculative_generate: the prompt is empty; give at least one token")
    _check_model(target, "target", T + max_new_tokens)
    V = _vocab_size(target)
    proc = LogitsProcessor(do_sample, temperature, top_k, top_p)
    if draft is not None:
        _check_model(draft, "draft", T + max_new_tokens)
        if _vocab_size(draft) != V:
            raise LmzooError(f"speculative_generate: the draft's vocabulary ({_vocab_size(draft)}) is not the "
                             f"target's ({V}); both must score the same token ids")
    with torch.inference_mode():
        drafter = (DraftModel(draft, T + max_new_tokens, proc, generator) if draft is not None
                   else PromptLookup(prompt_lookup, V))
        tokens, stats = _rounds(target, input_ids[0].tolist(), drafter, k, max_new_tokens, proc,
                                eos_token_id, generator)
    return torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device), stats


def _rounds(target, tokens: list[int], drafter, k: int, max_new_tokens: int, proc: LogitsProcessor,
            eos_token_id, generator) -> tuple[list[int], SpecStats]:
    T = len(tokens)
    device = next(target.parameters()).device
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    cache = target.new_cache(1, T + max_new_tokens)  # never more than T + max_new - 1 tokens are cached
    stats = SpecStats()
    while len(tokens) - T < max_new_tokens:
        m = min(k, max_new_tokens - (len(tokens) - T) - 1)  # a full acceptance yields m + 1 tokens
        drafts, q = drafter.propose(tokens, m, stats) if m > 0 else ([], None)
        m = len(drafts)
        stats.proposed += m
        ids = torch.tensor([tokens[cache.length:] + drafts], dtype=torch.long, device=device)
        logits = target(ids, cache=cache, logits_to_keep=m + 1).logits[0].float()  # (m + 1, V): p_1..p_{m+1}
        stats.target_forwards += 1
        d = torch.tensor(drafts, dtype=torch.long, device=device)
        if proc.do_sample:
            p = process_logits(logits, ids.expand(m + 1, -1), proc).softmax(-1)
            j, nxt = verify_sampled(p, q.to(device) if m else p[:0], d, generator)
        else:
            j, nxt = verify_greedy(logits, d)
        stats.accepted += j
        cache.crop(len(tokens) + j)  # keep the accepted drafts' K/V; the target's own token is fed next round
        drafter.rewind(len(tokens) + j)
        new = drafts[:j] + [nxt]
        stop = next((i for i, t in enumerate(new) if t in eos), None)
        tokens += new if stop is None else new[:stop + 1]
        if stop is not None:
            break
    stats.new_tokens = len(tokens) - T
    return tokens, stats
