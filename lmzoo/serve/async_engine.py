"""The continuous-batching engine behind asyncio: one thread steps it, the event loop only talks to it.

``continuous.Engine`` is not thread-safe and never waits for clients, so a single background thread owns it:
it applies the commands the HTTP side queued (add, abort) between two ``step()`` calls, steps while any
request is unfinished, and sleeps on a condition when there is none. Each HTTP request gets one
``asyncio.Queue`` for all its sequences (``n`` choices, several prompts); the thread pushes every
``RequestOutput`` into it with ``loop.call_soon_threadsafe``, so the event loop never blocks on the model.

Admission is all-or-nothing and immediate: a request whose sequences would make more than ``max_queue`` in
flight (waiting + running) is refused with ``QueueFull`` before it reaches the engine (HTTP 503). An abort
(stop string found, client gone) frees the sequence's blocks at the next command round and ends its stream
at once; whatever the engine still reports for it is dropped. If ``step()`` itself fails, every request in
flight gets an ``EngineFailure`` instead of hanging, and the traceback goes to the server's log.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import threading
import time
import traceback
import uuid

from lmzoo.errors import LmzooError
from lmzoo.generate.requests import RequestOutput, SamplingParams

RATE_WINDOW_S = 10.0  # tokens/s in stats() is the tokens of the last this many seconds / this


class QueueFull(LmzooError):
    pass


class EngineFailure:
    """Put in a request's queue when the engine thread could not serve it."""

    def __init__(self, message: str):
        self.message = message


def _deliver(loop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed (server shutting down): nobody is waiting any more
        pass


def _settle(fut: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if not fut.done():  # cancelled: the client went away while the request was being added
        fut.set_exception(error) if error is not None else fut.set_result(result)


class AsyncEngine:
    def __init__(self, engine, max_queue: int = 64):
        if max_queue < 1:
            raise LmzooError(f"max_queue must be >= 1, got {max_queue}")
        self.engine, self.max_queue = engine, max_queue
        self._cv = threading.Condition()
        self._commands: list[tuple] = []
        self._live: dict[str, tuple] = {}  # request id -> (loop, queue), from admission to its last output
        self._closing = False
        self._rate: collections.deque = collections.deque()  # (time, tokens) per step in the window
        self.counters = {"requests_total": 0, "requests_rejected": 0, "sequences_total": 0,
                         "generated_tokens_total": 0, "engine_errors": 0}
        self._snapshot = dict(engine.stats())
        self._thread = threading.Thread(target=self._run, name="lmzoo-engine", daemon=True)

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    @property
    def token_slots(self) -> int:
        """Tokens the whole paged cache holds: no sequence can be longer."""
        s = self._snapshot
        return s["blocks_total"] * s["block_size"] if "blocks_total" in s else self.context_length

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current step; requests still in flight end with reason "abort"."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the event loop's side ------------------------------------------------------------------
    async def add(self, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[str], asyncio.Queue]:
        """Queue one sequence per prompt; returns their ids and the queue their outputs arrive in, once the
        engine accepted all of them. Raises ``QueueFull``, or the engine's ``LmzooError`` (none is queued then)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        rids = [f"seq-{uuid.uuid4().hex[:16]}" for _ in prompts]
        fut = loop.create_future()
        with self._cv:
            self.counters["requests_total"] += 1
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._live) + len(rids) > self.max_queue:
                self.counters["requests_rejected"] += 1
                raise QueueFull(f"the server is at its limit of {self.max_queue} sequences in flight "
                                f"({len(self._live)} now, this request needs {len(rids)}); retry later")
            for rid in rids:
                self._live[rid] = (loop, queue)
            self._commands.append(("add", rids, prompts, params, loop, fut))
            self._cv.notify()
        try:
            await fut
        except asyncio.CancelledError:
            self.abort(rids)
            raise
        return rids, queue

    def abort(self, rids, reason: str = "abort") -> None:
        """Free these sequences at the next command round (thread-safe; unknown or finished ids are ignored)."""
        with self._cv:
            self._commands.append(("abort", list(rids), reason))
            self._cv.notify()

    def stats(self) -> dict:
        """This layer's counters, with ``engine``: the engine's own ``stats()`` as its thread took them after its
        last step (the engine itself is never called from here)."""
        now = time.monotonic()
        with self._cv:
            tokens = sum(n for t, n in self._rate if t >= now - RATE_WINDOW_S)
            return {**self.counters, "in_flight": len(self._live), "max_queue": self.max_queue,
                    "tokens_per_s": tokens / RATE_WINDOW_S, "alive": self._thread.is_alive(),
                    "engine": dict(self._snapshot)}

    # -- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._commands and not self._closing and not self.engine.has_unfinished():
                    self._cv.wait()
                commands, self._commands = self._commands, []
                closing = self._closing
            aborted = any(c[0] == "abort" for c in commands)
            for cmd in commands:
                self._apply(cmd)
            if closing:
                self._abort_all("abort")
                return
            if self.engine.has_unfinished() or aborted:  # an abort is reported by the next step
                try:
                    self._dispatch(self.engine.step())
                except Exception as e:  # a bug must not hang every client: fail them, log it, go on
                    traceback.print_exc(file=sys.stderr)
                    with self._cv:
                        self.counters["engine_errors"] += 1
                    self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
            snapshot = dict(self.engine.stats())
            with self._cv:
                self._snapshot = snapshot

    def _apply(self, cmd) -> None:
        if cmd[0] == "add":
            _, rids, prompts, params, loop, fut = cmd
            added = []
            try:
                for rid, ids, p in zip(rids, prompts, params):
                    self.engine.add_request(ids, p, request_id=rid)
                    added.append(rid)
            except Exception as e:  # all or nothing: the ones already added go again
                for rid in added:
                    self._engine_abort(rid, "abort")
                with self._cv:
                    for rid in rids:
                        self._live.pop(rid, None)
                _deliver(loop, _settle, fut, None, e)  # LmzooError: the client's fault (400); others: 500
                return
            with self._cv:
                self.counters["sequences_total"] += len(rids)
            _deliver(loop, _settle, fut, rids)
        else:
            _, rids, reason = cmd
            for rid in rids:
                self._engine_abort(rid, reason)
                self._end(rid, reason)

    def _engine_abort(self, rid: str, reason: str) -> None:
        try:
            self.engine.abort(rid, reason=reason)
        except Exception:  # already finished, or never added: nothing to free
            pass

    def _end(self, rid: str, reason: str) -> None:
        """Close ``rid``'s stream with a final empty output, if it is still open."""
        with self._cv:
            entry = self._live.pop(rid, None)
        if entry is not None:
            loop, queue = entry
            _deliver(loop, queue.put_nowait, RequestOutput(rid, [], [], finished=True, finish_reason=reason))

    def _dispatch(self, outs: list[RequestOutput]) -> None:
        groups: dict[int, tuple] = {}
        n = 0
        with self._cv:
            for out in outs:
                n += len(out.new_token_ids)
                entry = self._live.get(out.request_id)
                if entry is None:
                    continue  # aborted here already
                if out.finished:
                    del self._live[out.request_id]
                groups.setdefault(id(entry[1]), (entry, []))[1].append(out)
            self.counters["generated_tokens_total"] += n
            now = time.monotonic()
            self._rate.append((now, n))
            while self._rate and self._rate[0][0] < now - RATE_WINDOW_S:
                self._rate.popleft()
        for (loop, queue), items in groups.values():
            _deliver(loop, _put_all, queue, items)

    def _fail_all(self, message: str) -> None:
        with self._cv:
            live, self._live = self._live, {}
        for rid, (loop, queue) in live.items():
            self._engine_abort(rid, "abort")
            _deliver(loop, queue.put_nowait, EngineFailure(message))

    def _abort_all(self, reason: str) -> None:
        with self._cv:
            rids = list(self._live)
        for rid in rids:
            self._engine_abort(rid, reason)
            self._end(rid, reason)


def _put_all(queue: asyncio.Queue, items) -> None:
    for item in items:
        queue.put_nowait(item)
