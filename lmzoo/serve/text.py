"""One choice's text as its tokens arrive: what may be sent now, and whether a stop string ended it.

Two things are held back from a stream: a character whose UTF-8 bytes are split across tokens
(``lmzoo.cli.generate.TextStream``: the decoded text ends in U+FFFD until it is whole), and any tail of the
text that could still grow into a stop string ("\\n\\nUs" while "\\n\\nUser:" is a stop). A stop string
found ends the choice there, itself left out (OpenAI's rule); the caller then aborts the engine request.
Stop *tokens* (EOS, end of turn) end the request inside the engine and never become text.
"""

from __future__ import annotations

from lmzoo.cli.generate import TextStream


class ChoiceText:
    def __init__(self, tok, stops: list[str], stop_ids, logprobs: bool = False):
        self.tok, self.stops, self.stop_ids, self.want_logprobs = tok, stops, set(stop_ids), logprobs
        self.stream = TextStream(tok)
        self.text = ""  # decoded so far (whole characters only)
        self.sent = 0  # characters of ``text`` already handed out
        self.n_tokens = 0  # tokens generated, stop tokens included (usage counts them)
        self.stopped = False  # a stop string was found
        self.pending: list[tuple[int, float]] = []  # (token id, logprob) not yet handed out

    def feed(self, ids: list[int], logprobs: list[float]) -> str:
        """The text that may be sent after these tokens ('' while it is held back)."""
        for k, t in enumerate(ids):
            if self.stopped:
                break  # tokens the engine made before it heard of the stop
            self.n_tokens += 1
            if t in self.stop_ids:
                continue
            if self.want_logprobs:
                self.pending.append((t, logprobs[k] if k < len(logprobs) else float("nan")))
            self.text += self.stream.add(t)
            self._find_stop()
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The rest once the engine says the request ended (a held-back partial character included)."""
        if not self.stopped:
            self.text += self.stream.flush()
            self._find_stop()
        return self._release(final=True)

    def take_logprobs(self) -> list[dict]:
        """OpenAI's per-token entries for the tokens released so far: token, logprob, bytes."""
        out = []
        for t, lp in self.pending:
            piece = self.tok.decode([t])
            out.append({"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8")), "top_logprobs": []})
        self.pending = []
        return out

    def _find_stop(self) -> None:
        hits = [k for k in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if k >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held()
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def _held(self) -> int:
        """The length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
