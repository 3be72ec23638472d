"""/v1/completions and /v1/chat/completions: a checked request -> engine sequences -> OpenAI's JSON or SSE.

One HTTP request becomes one engine sequence per (prompt, choice); choice ``j`` of a seeded request samples
with ``seed + j``, so ``n`` choices differ yet repeat exactly. Chat prompts are the messages rendered
through the model directory's chat template with the generation prompt; a chat turn ends at the
tokenizer's EOS or the template's end-of-turn token, a completion at EOS (``stop_token_ids`` add more,
``ignore_eos`` removes these). The prompt plus ``max_tokens`` must fit the model's context (chat's default
``max_tokens`` is whatever the context and the paged cache leave). Usage counts each prompt once and every
generated token, a stop token included; a stop string's tokens are counted up to the one completing it.

Streaming sends ``data: {chunk}`` events in OpenAI's shapes, then ``data: [DONE]``; a failure after the
first event is sent as ``data: {"error": ...}``. Sequences a client stops waiting for (it disconnected, or
the server failed mid-way) are aborted, so their cache blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from lmzoo.errors import LmzooError
from lmzoo.generate.requests import SamplingParams
from lmzoo.serve.async_engine import AsyncEngine, EngineFailure, QueueFull
from lmzoo.serve.protocol import ApiError, GenerationRequest
from lmzoo.serve.text import ChoiceText


@dataclass
class Served:
    """What the server serves: the name clients use, the tokenizer and template, the stop ids, the engine."""

    name: str
    tok: object
    template: str
    chat_stop_ids: list[int]
    eos_ids: list[int]
    vocab_size: int
    engine: AsyncEngine


# -- request -> engine sequences ------------------------------------------------------------------------
def encode_prompts(served: Served, req: GenerationRequest) -> list[list[int]]:
    if req.kind == "chat":
        try:
            prompts = [served.tok.apply_chat_template(req.messages, add_generation_prompt=True,
                                                      template=served.template).ids]
        except LmzooError as e:  # the template refused the conversation (e.g. roles out of order)
            raise ApiError(400, str(e), param="messages") from None
    else:
        prompts = [served.tok.encode(p, add_special_tokens=True) if isinstance(p, str) else p for p in req.prompts]
    param = "messages" if req.kind == "chat" else "prompt"
    for ids in prompts:
        if not ids:
            raise ApiError(400, "the prompt is empty (it encodes to no tokens)", param=param)
        bad = [t for t in ids if not 0 <= t < served.vocab_size]
        if bad:
            raise ApiError(400, f"token ids {bad[:5]} are outside the model's vocabulary of {served.vocab_size}",
                           param=param)
    return prompts


def sampling_params(served: Served, req: GenerationRequest, prompt_len: int, choice: int) -> SamplingParams:
    ctx = served.engine.context_length
    param = "messages" if req.kind == "chat" else "prompt"
    if req.max_tokens is None:  # chat's default: all the room the context (and the cache) leaves
        if prompt_len >= ctx:
            raise ApiError(400, f"the prompt has {prompt_len} tokens, which leaves no room to generate in the "
                           f"model's context of {ctx} tokens", param=param)
        max_tokens = max(1, min(ctx, served.engine.token_slots) - prompt_len)
    elif prompt_len + req.max_tokens > ctx:
        raise ApiError(400, f"the prompt has {prompt_len} tokens and max_tokens is {req.max_tokens}: together "
                       f"{prompt_len + req.max_tokens}, more than the model's context of {ctx} tokens", param=param)
    else:
        max_tokens = req.max_tokens
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          repetition_penalty=req.repetition_penalty,
                          seed=None if req.seed is None else req.seed + choice, stop_token_ids=stop_ids(served, req),
                          ignore_eos=req.ignore_eos, logprobs=req.logprobs)


def stop_ids(served: Served, req: GenerationRequest) -> tuple[int, ...]:
    """The ids that end a sequence: EOS (and the template's end of turn for chat) unless ``ignore_eos``, and the
    request's own ``stop_token_ids``."""
    base = () if req.ignore_eos else served.chat_stop_ids if req.kind == "chat" else served.eos_ids
    return tuple(dict.fromkeys([*base, *req.stop_token_ids]))


class Generation:
    """One HTTP request's sequences in flight: their texts, and the merged stream of what they produce."""

    def __init__(self, served: Served, req: GenerationRequest, prompts: list[list[int]]):
        self.served, self.req = served, req
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.seqs = [ids for ids in prompts for _ in range(req.n)]  # choice index = prompt * n + j
        self.params = [sampling_params(served, req, len(p), j) for p in prompts for j in range(req.n)]
        ends = stop_ids(served, req)
        self.choices = [ChoiceText(served.tok, req.stop, ends, req.logprobs) for _ in self.seqs]
        self.finish: list[str | None] = [None] * len(self.seqs)
        self.rids: list[str] = []
        self.id = f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    async def start(self) -> None:
        limit = self.served.engine.max_queue
        if len(self.seqs) > limit:
            raise ApiError(400, f"this request asks for {len(self.seqs)} sequences (prompts x n); this server takes at "
                           f"most {limit} at once", param="n")
        try:
            self.rids, self.queue = await self.served.engine.add(self.seqs, self.params)
        except QueueFull as e:
            raise ApiError(503, str(e), code="queue_full") from None
        except LmzooError as e:
            raise ApiError(400, str(e)) from None
        self.index = {rid: i for i, rid in enumerate(self.rids)}

    @property
    def done(self) -> bool:
        return all(self.finish)

    async def events(self):
        """(choice, new text, finish reason or None) as the engine produces them, until every choice ended."""
        while not self.done:
            item = await self.queue.get()
            if isinstance(item, EngineFailure):
                self.finish = [f or "error" for f in self.finish]  # the engine dropped them all already
                raise ApiError(500, item.message)
            i = self.index.get(item.request_id)
            if i is None or self.finish[i]:
                continue  # tokens made before our abort arrived
            ch = self.choices[i]
            piece, reason = ch.feed(item.new_token_ids, item.new_logprobs), None
            if ch.stopped:
                reason = "stop"
                self.served.engine.abort([item.request_id], reason="stop")
            elif item.finished:
                if item.finish_reason not in ("stop", "length"):
                    self.finish[i] = "abort"
                    raise ApiError(503, f"the server ended this request ({item.finish_reason}): it is shutting down")
                piece, reason = piece + ch.finish(), item.finish_reason
            self.finish[i] = reason
            yield i, piece, reason

    def abort_unfinished(self) -> None:
        left = [rid for rid, f in zip(self.rids, self.finish) if not f]
        if left:
            self.served.engine.abort(left)
            for rid in left:
                self.finish[self.index[rid]] = "abort"

    def usage(self) -> dict:
        done = sum(ch.n_tokens for ch in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def header(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.served.name}


# -- logprobs in the two endpoints' shapes --------------------------------------------------------------
def _completion_logprobs(entries: list[dict], offset: int) -> dict:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": None, "text_offset": offsets}


def _chat_logprobs(entries: list[dict]) -> dict:
    return {"content": entries, "refusal": None}


# -- whole responses -------------------------------------------------------------------------------------
async def collect(gen: Generation) -> dict:
    texts = [""] * len(gen.choices)
    logprobs: list[list[dict]] = [[] for _ in gen.choices]
    async for i, piece, _ in gen.events():
        texts[i] += piece
        logprobs[i] += gen.choices[i].take_logprobs()
    if gen.req.kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t, "refusal": None},
                    "logprobs": _chat_logprobs(logprobs[i]) if gen.req.logprobs else None,
                    "finish_reason": gen.finish[i]} for i, t in enumerate(texts)]
        return {**gen.header("chat.completion"), "choices": choices, "usage": gen.usage()}
    choices = [{"index": i, "text": t, "logprobs": _completion_logprobs(logprobs[i], 0) if gen.req.logprobs else None,
                "finish_reason": gen.finish[i]} for i, t in enumerate(texts)]
    return {**gen.header("text_completion"), "choices": choices, "usage": gen.usage()}


async def collect_unless_gone(gen: Generation, disconnected) -> dict | None:
    """``collect(gen)``, or None as soon as the awaitable ``disconnected`` completes (the client left)."""
    work = asyncio.ensure_future(collect(gen))
    watch = asyncio.ensure_future(disconnected)
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        work.cancel()
        return None
    finally:
        watch.cancel()
        gen.abort_unfinished()


# -- server-sent events ------------------------------------------------------------------------------
def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse(gen: Generation):
    """The response body of a streamed request: chunks, the usage chunk if asked for, [DONE]."""
    chat = gen.req.kind == "chat"
    head = gen.header("chat.completion.chunk" if chat else "text_completion")
    extra = {"usage": None} if gen.req.include_usage else {}
    offsets = [0] * len(gen.choices)

    def chunk(i, piece, reason, entries):
        if chat:
            lp = _chat_logprobs(entries) if gen.req.logprobs and entries else None
            delta = {"content": piece} if piece or reason is None else {}
            return {**head, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}],
                    **extra}
        lp = _completion_logprobs(entries, offsets[i]) if gen.req.logprobs else None
        offsets[i] += len(piece)
        return {**head, "choices": [{"index": i, "text": piece, "logprobs": lp, "finish_reason": reason}], **extra}

    try:
        if chat:
            for i in range(len(gen.choices)):
                yield _event({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}], **extra})
        async for i, piece, reason in gen.events():
            entries = gen.choices[i].take_logprobs()
            if piece or entries or reason:
                if chat and piece and reason:  # the last words, then an empty delta with the reason
                    yield _event(chunk(i, piece, None, entries))
                    piece, entries = "", []
                yield _event(chunk(i, piece, reason, entries))
        if gen.req.include_usage:
            yield _event({**head, "choices": [], "usage": gen.usage()})
        yield "data: [DONE]\n\n"
    except ApiError as e:  # the headers are gone already: the error is the last event
        yield _event(e.body())
    finally:
        gen.abort_unfinished()
