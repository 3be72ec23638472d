"""The serving engine's fallback for models the paged cache cannot hold: the prefix decoder (ChatGLM-6B,
whose cache keeps each row's prompt layout). Same interface as ``continuous.Engine`` (add_request, abort,
step, has_unfinished, stats, context_length), but requests run one at a time, first come first served,
each through ``lmzoo.stream`` (batch 1), one token per ``step``. Outputs are therefore exactly
``lmzoo.generate``'s; throughput is one request's. (It runs any decoder; ``lmzoo serve`` uses it only where
``paged.pageable`` says no.)
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from lmzoo.errors import LmzooError
from lmzoo.generate.requests import RequestOutput, SamplingParams, checked_prompt, model_eos


@dataclass(eq=False)
class _Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    stops: frozenset[int]
    seed: int
    output: list[int] = field(default_factory=list)
    stream: object = None
    finish_reason: str | None = None


class SequentialEngine:
    """One request at a time (see the module docstring); the paged engine's tuning arguments are accepted
    and ignored, so the server can build either."""

    def __init__(self, model: nn.Module, **_paged_options):
        if not hasattr(model, "new_cache"):
            raise LmzooError(f"{type(model).__name__} is not a decoder; it has no next-token head or cache")
        self.model = model.eval()
        self.context_length = int(getattr(model.config, "max_positions", None) or 4096)
        self.eos = model_eos(model)
        self.waiting: deque[_Request] = deque()
        self.current: _Request | None = None
        self._finished: list[_Request] = []
        self._ids, self._seeds = itertools.count(), random.Random(0)
        self.counters = {"generated_tokens": 0, "requests": 0}

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        prompt = checked_prompt(prompt_ids, params, self.context_length, self.model.config.vocab_size)
        if params.logprobs:
            raise LmzooError("log-probs are not served for this model (it runs on the one-at-a-time engine)")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos)
        self.waiting.append(_Request(rid, prompt, params, stops, seed))
        return rid

    def abort(self, request_id: str, reason: str = "abort") -> None:
        req = self.current if self.current is not None and self.current.rid == request_id else \
            next((r for r in self.waiting if r.rid == request_id), None)
        if req is None or req.finish_reason is not None:
            return
        req.finish_reason = reason
        if req is self.current:
            self.current = None
        else:
            self.waiting.remove(req)
        self._finished.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.current or self.waiting or self._finished)

    def stats(self) -> dict:
        return {"running": int(self.current is not None), "waiting": len(self.waiting), "engine": "sequential",
                **self.counters}

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        outs = [self._output(r, []) for r in self._finished]
        self._finished = []
        if self.current is None and self.waiting:
            self.current = self._start(self.waiting.popleft())
        req = self.current
        if req is None:
            return outs
        tok = int(next(req.stream)[0])
        req.output.append(tok)
        self.counters["generated_tokens"] += 1
        if tok in req.stops:
            req.finish_reason = "stop"
        elif len(req.output) >= req.params.max_tokens:
            req.finish_reason = "length"
        if req.finish_reason is not None:
            self.current = None
        return outs + [self._output(req, [tok])]

    def _start(self, req: _Request) -> _Request:
        from lmzoo.generate import stream

        p = req.params
        device = next(self.model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(req.seed)
        sample = not p.greedy
        req.stream = stream(self.model, torch.tensor([req.prompt], device=device), max_new_tokens=p.max_tokens,
                            do_sample=sample, temperature=p.temperature if sample else 1.0,
                            top_k=p.top_k or None, top_p=p.top_p if p.top_p < 1 else None,
                            repetition_penalty=p.repetition_penalty if p.repetition_penalty != 1 else None,
                            eos_token_id=None, generator=gen)
        self.counters["requests"] += 1
        return req

    @staticmethod
    def _output(req: _Request, new: list[int]) -> RequestOutput:
        return RequestOutput(req.rid, new, list(req.output), req.finish_reason is not None, req.finish_reason,
                             prompt_tokens=len(req.prompt))
