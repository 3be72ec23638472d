"""What a client asks the continuous-batching engine for, and what it gets back (``continuous.Engine``).

The engine knows no tokenizer: a request is token ids plus ``SamplingParams``; stop *strings* are the
caller's business (the server decodes the tokens it receives and calls ``Engine.abort`` with
``reason="stop"`` when a stop string appears).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmzoo.errors import LmzooError


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI's names where it has them).

    ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 switch those filters off; ``seed`` makes a
    sampled request reproducible alone or in any batch (each request owns its generator);
    ``stop_token_ids`` end the request (the model's EOS is added by the engine unless ``ignore_eos``);
    ``logprobs``: each output token carries its log-probability under the processed distribution."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise LmzooError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise LmzooError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LmzooError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LmzooError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise LmzooError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RequestOutput:
    """What one ``Engine.step`` produced for one request: the tokens it added this step (usually one;
    none for a prefill chunk that is not the prompt's last), and whether the request is now finished.
    ``finish_reason``: "stop" (a stop token or ``abort(reason="stop")``), "length" (``max_tokens`` or the
    model's context), "abort" (the client went away). ``token_ids`` is every token generated so far."""

    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    new_logprobs: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed
    new_logits: list = field(default_factory=list)  # with Engine(keep_logits=True): each new token's raw (V,) logits

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def checked_prompt(prompt_ids, params: SamplingParams, context_length: int, vocab_size: int) -> list[int]:
    """The prompt as a list of ints, or one ``LmzooError`` line: empty, too long for the context with its
    ``max_tokens``, or holding ids outside the vocabulary (what every engine refuses before queueing)."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise LmzooError("the prompt is empty; give at least one token")
    if len(prompt) + params.max_tokens > context_length:
        raise LmzooError(f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceeds the model's "
                         f"context of {context_length} tokens")
    if max(prompt) >= vocab_size or min(prompt) < 0:
        raise LmzooError(f"the prompt holds token ids outside the vocabulary of {vocab_size}")
    return prompt


def model_eos(model) -> frozenset[int]:
    """The ids the model's config names as end of sequence (none, one, or a list)."""
    eos = getattr(model.config, "eos_token_id", None)
    return frozenset(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def is_sharded(model) -> bool:
    """True for a model FSDP2 sharded (or a view of one): its forwards all-gather parameters, so every rank
    must make the same calls, and its decode runs under ``no_grad`` (tensors made in inference mode could not
    be reused by training)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(model, FSDPModule) or getattr(model, "sharded", False) is True
