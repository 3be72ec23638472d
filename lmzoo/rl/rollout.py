"""Rollouts: sample responses to prompts with the one inference engine, and score them again in training.

    prompts (P lists of ids) --rollout--> Rollout: (P·n, T) sequences, masks, per-token log-probs

``rollout`` repeats each prompt ``n`` times (prompt i's samples are rows i·n .. i·n + n - 1, the groups
GRPO normalises over), left-pads the prompts and decodes them in one batch through
``lmzoo.generate.stream`` (the serving engine: paged KV cache, a row leaves when it draws an EOS), asking
it for each step's logits (``with_logits``) so the log-probability of every sampled token is recorded as it
is drawn.

**Which log-probability.** The recorded value is that of the *temperature-scaled* distribution,

    logp[t] = log softmax(z_t / τ)[x_t]

whatever ``top_k`` / ``top_p`` are: they only choose which tokens may be drawn, and the recorded number
ignores their truncation and renormalisation. This is what TRL's GRPO/PPO trainers compute in the
training forward (logits divided by the temperature, no top-k/top-p), and so what
``sequence_token_logps`` recomputes here: the two agree to float rounding, so the PPO/GRPO
importance ratio starts at exactly 1. (The truncated distribution's log-probs would differ from the
training forward's by the log of the kept mass; PPO's ratio would then not start at 1.)
Greedy decoding (``temperature=0``) records log softmax(z_t), τ = 1. A repetition penalty is not offered:
a training forward could not reproduce it.

**Layout.** All tensors are (N, T), N = P·n, T = the longest prompt + the number of decode steps taken
(at most ``max_new_tokens``; fewer when every row stopped): the prompt left-padded to ``prompt_len``
columns, the response after it, right-padded. ``logps[:, t]`` is the log-prob of the token *at* t
(aligned with ``input_ids``, not shifted), zero off ``response_mask``. The response mask covers the
sampled tokens up to and including the first EOS; the pads the engine emits after it are masked out of
the response and the attention mask both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmzoo.errors import LmzooError
from lmzoo.objectives.logprobs import IGNORE, token_logps


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (N, T) left-padded prompt + response, right-padded
    attention_mask: torch.Tensor  # (N, T) 1 on prompt and response tokens (incl. the EOS)
    response_mask: torch.Tensor  # (N, T) 1 on response tokens, up to and including the EOS
    logps: torch.Tensor  # (N, T) float32 log-prob of each response token under the sampling distribution
    ended_with_eos: torch.Tensor  # (N,) bool: the response stopped at an EOS (not at max_new_tokens)
    response_lengths: torch.Tensor  # (N,) response tokens, the EOS included
    prompt_index: torch.Tensor  # (N,) the prompt each row answers (row // n)
    prompt_len: int  # columns of (left-padded) prompt; the responses start there
    n: int  # samples per prompt

    def response_ids(self, drop_eos: bool = True) -> list[list[int]]:
        """Each row's response tokens (without its final EOS when ``drop_eos``), for decoding to text."""
        out = []
        for row, length, eos in zip(self.input_ids[:, self.prompt_len:].tolist(), self.response_lengths.tolist(),
                                    self.ended_with_eos.tolist()):
            out.append(row[:length - 1] if drop_eos and eos else row[:length])
        return out


def ranks_done(mine: bool) -> bool:
    """True once every rank's rows have ended (an all-reduce per decode step): ``rollout``'s ``all_done`` on a
    model FSDP2 sharded (each forward all-gathers parameters, so a rank that stopped early would leave the
    others hanging); ``rollout`` uses it there by itself."""
    import torch.distributed as dist

    flag = torch.tensor([1 if mine else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


@torch.no_grad()
def rollout(model, prompts_ids: list[list[int]], *, n: int = 1, max_new_tokens: int = 32, temperature: float = 1.0,
            top_p: float | None = None, top_k: int | None = None, eos_token_id=None, pad_token_id: int | None = None,
            generator: torch.Generator | None = None, max_len: int | None = None, all_done=None) -> Rollout:
    """``n`` sampled responses to each prompt (token-id lists), drawn through ``lmzoo.generate.stream``;
    see the module docstring for the layout and the recorded log-probs. ``temperature=0`` decodes
    greedily. ``max_len`` caps prompt + response: longer prompts keep their last
    ``max_len - max_new_tokens`` tokens (the end, where they ask). The model is put in eval mode for the
    rollout and given back in its mode."""
    from lmzoo.generate import stream
    from lmzoo.generate.engine import is_sharded

    if n < 1:
        raise LmzooError(f"rollout: n (samples per prompt) must be at least 1, got {n}")
    if max_new_tokens < 1:
        raise LmzooError(f"rollout: max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise LmzooError(f"rollout: temperature must be >= 0 (0: greedy), got {temperature}")
    if not prompts_ids or any(len(p) == 0 for p in prompts_ids):
        raise LmzooError("rollout: give at least one prompt, each of at least one token")
    if max_len is not None:
        if max_len <= max_new_tokens:
            raise LmzooError(f"rollout: max_len {max_len} leaves no room for a prompt before "
                             f"max_new_tokens {max_new_tokens}")
        prompts_ids = [list(p)[-(max_len - max_new_tokens):] for p in prompts_ids]
    eos = _eos_list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    device = next(model.parameters()).device
    rows = [list(p) for p in prompts_ids for _ in range(n)]  # prompt i's samples adjacent
    N, P = len(rows), max(len(p) for p in rows)
    prompt = torch.tensor([[pad] * (P - len(p)) + p for p in rows], device=device)  # (N, P) left-padded
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in rows], device=device)
    sample = temperature > 0
    tau = temperature if sample else 1.0
    was_training = model.training
    model.eval()
    ids, logps = [], []
    try:
        for nxt, logits in stream(model, prompt, prompt_mask, max_new_tokens=max_new_tokens, do_sample=sample,
                                  temperature=tau, top_k=top_k, top_p=top_p, eos_token_id=eos or None,
                                  pad_token_id=pad, generator=generator, with_logits=True,
                                  all_done=all_done if all_done is not None or not is_sharded(model) else ranks_done):
            lp = torch.log_softmax(logits / tau, dim=-1).gather(1, nxt[:, None]).squeeze(1)  # (N,)
            ids.append(nxt)
            logps.append(lp)
    finally:
        model.train(was_training)
    resp = torch.stack(ids, dim=1)  # (N, R), R >= 1 decode steps
    is_eos = torch.isin(resp, torch.tensor(eos, device=device, dtype=torch.long)) if eos else torch.zeros_like(
        resp, dtype=torch.bool)
    # a token is in the response while no EOS came strictly before it
    eos_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # (N, R)
    in_resp = ~eos_before
    ended = is_eos.any(1)
    resp_logps = torch.stack(logps, dim=1).float().masked_fill(~in_resp, 0.0)  # (N, R)
    zeros = torch.zeros(N, P, dtype=torch.long, device=device)
    return Rollout(
        input_ids=torch.cat([prompt, resp], dim=1),  # (N, P + R)
        attention_mask=torch.cat([prompt_mask.long(), in_resp.long()], dim=1),
        response_mask=torch.cat([zeros, in_resp.long()], dim=1),
        logps=torch.cat([zeros.float(), resp_logps], dim=1),
        ended_with_eos=ended, response_lengths=in_resp.sum(1), prompt_index=torch.arange(N, device=device) // n,
        prompt_len=P, n=n)


def sequence_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                         temperature: float = 1.0) -> torch.Tensor:
    """(N, T) float32 log-probs of the response tokens of (N, T) ``input_ids`` in one training forward
    (with grad), log softmax(z / τ) as ``rollout`` records them: position t holds the log-prob of the
    token at t (aligned with ``input_ids``), zero where ``response_mask`` is 0. Positions come from
    ``attention_mask``, as in the engine, so a left-padded row scores as its unpadded self. Only the
    head of the positions that predict a response token is computed (``logits_to_keep``)."""
    if input_ids.shape != attention_mask.shape or input_ids.shape != response_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
                         f"response_mask {tuple(response_mask.shape)} must be one (N, T)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    N, T = input_ids.shape
    scored = response_mask.bool()
    cols = scored.any(0).nonzero()
    if len(cols) == 0:
        return torch.zeros(N, T, device=input_ids.device)
    first = int(cols[0])
    if first == 0:
        raise ValueError("a response token at position 0 has no context to be predicted from")
    keep = T - first + 1  # the logits at first - 1 .. T - 1 predict the tokens at first .. T (the last unused)
    logits = model(input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits  # (N, keep, V)
    labels = input_ids[:, first - 1:].masked_fill(~scored[:, first - 1:], IGNORE)  # (N, keep)
    # token_logps: position j holds log p(labels[j + 1]); shift right by one to align with the tokens
    lp, _ = token_logps(logits.float() / temperature, labels)  # (N, keep)
    return F.pad(lp[:, :-1], (first, 0))  # (N, T)
