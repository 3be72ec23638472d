"""The OpenAI request bodies this server takes, checked field by field before anything is queued.

Every problem is one ``ApiError`` in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``)
that names the field. Unknown top-level fields are refused (a typo must not be silently ignored), but the
standard fields the official client may send are known: those that change nothing here (``user``,
``metadata``, ...) are accepted, and those asking for something this server cannot do (``tools``,
``response_format`` JSON, ``logit_bias``, non-zero presence/frequency penalties, alternatives in
``logprobs``) are refused unless they hold their do-nothing value. Extensions (as in vLLM): ``top_k``,
``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# Standard fields accepted and ignored: they change nothing about the tokens generated.
IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
SHARED = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream", "stream_options",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs", "ignore_eos",
          "stop_token_ids"}
CHAT_FIELDS = SHARED | IGNORED | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                                  "tool_choice", "parallel_tool_calls", "functions", "function_call", "modalities"}
COMPLETION_FIELDS = SHARED | IGNORED | {"prompt", "echo", "suffix", "best_of"}
ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_N = 16


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """A checked request. ``prompts``: text or token ids per prompt (completions) or None (chat);
    ``max_tokens`` None means as many as the context leaves (chat's default)."""

    kind: str  # "chat" | "completion"
    model: str | None
    prompts: list[str | list[int]] | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False


def _show(v) -> str:
    text = json.dumps(v, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _bad(name: str, what: str, v) -> ApiError:
    return ApiError(400, f"'{name}' must be {what}, got {_show(v)}", param=name)


def _int(body, name, default, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, "an integer", v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise _bad(name, f"an integer {bounds}", v)
    return v


def _num(body, name, default, lo, hi, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, "a number", v)
    if v < lo or v > hi or (lo_open and v == lo):
        raise _bad(name, f"a number in {'(' if lo_open else '['}{lo}, {hi}]", v)
    return float(v)


def _bool(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, "true or false", v)
    return v


def _only_default(body, name, allowed, what):
    """A standard field this server cannot honour: accepted only with a value that asks for nothing."""
    if name in body and body[name] not in allowed:
        raise ApiError(400, f"'{name}' is not supported by this server ({what}); got {_show(body[name])}",
                       param=name)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _check_fields(body: dict, known: set, endpoint: str) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for "
                       f"{endpoint} (this server takes: {', '.join(sorted(known))})", param=unknown[0])


def _stop(body) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", "a non-empty string or a list of them", v)
    return stops


def _stop_token_ids(body) -> list[int]:
    v = body.get("stop_token_ids")
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        raise _bad("stop_token_ids", "a list of token ids", v)
    return v


def _shared(body: dict) -> dict:
    for name in ("presence_penalty", "frequency_penalty"):
        if _num(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise ApiError(400, f"'{name}' is not supported by this server (only 0); use the extension "
                           "'repetition_penalty' (1 is off, > 1 discourages repeats) instead", param=name)
    _only_default(body, "logit_bias", (None, {}), "it cannot bias logits")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not stream:
            raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_obfuscation"}:
            raise _bad("stream_options", "an object with 'include_usage'", opts)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "a string", model)
    return dict(model=model, temperature=_num(body, "temperature", 1.0, 0.0, 2.0),
                top_p=_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                top_k=max(_int(body, "top_k", 0, lo=-1), 0),  # vLLM's -1 and 0 both mean off
                repetition_penalty=_num(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
                n=_int(body, "n", 1, 1, MAX_N), stop=_stop(body), stop_token_ids=_stop_token_ids(body),
                seed=_int(body, "seed", None), ignore_eos=_bool(body, "ignore_eos"), stream=stream,
                include_usage=_bool(opts or {}, "include_usage"))


def _prompts(body) -> list[str | list[int]]:
    """str | [str] | [int] | [[int]] -> one entry per prompt."""
    p = body.get("prompt")
    if p is None:
        raise ApiError(400, "'prompt' is required: a string, a list of strings, or token ids", param="prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [list(p)]
        if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
               for x in p):
            return [list(x) for x in p]
    raise _bad("prompt", "a string, a non-empty list of strings, a list of token ids or a list of such lists", p)


def parse_completion(body: dict) -> GenerationRequest:
    _check_fields(body, COMPLETION_FIELDS, "/v1/completions")
    _only_default(body, "echo", (None, False), "it does not echo the prompt")
    _only_default(body, "suffix", (None, ""), "no insertion")
    if body.get("best_of") not in (None, 1, body.get("n", 1)):
        raise ApiError(400, "'best_of' other than n is not supported by this server", param="best_of")
    logprobs = _int(body, "logprobs", None, lo=0)
    if logprobs:
        raise ApiError(400, f"'logprobs' must be 0 here: this server returns the chosen tokens' log-probabilities "
                       f"only (tokens, token_logprobs), no alternatives; got {logprobs}", param="logprobs")
    return GenerationRequest(kind="completion", prompts=_prompts(body), max_tokens=_int(body, "max_tokens", 16, lo=1),
                             logprobs=logprobs is not None, **_shared(body))


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if c is None and m.get("role") == "assistant":
        return ""
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise _bad(f"messages[{i}].content", "a string or a list of {'type': 'text', 'text': ...} parts", c)


def _messages(body) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError(400, "'messages' is required: a list of {'role', 'content'} objects", param="messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "a non-empty list of {'role', 'content'} objects", msgs)
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "an object with 'role' and 'content'", m)
        if m.get("role") not in ROLES:
            raise _bad(f"messages[{i}].role", f"one of {', '.join(sorted(ROLES))}", m.get("role"))
        extra = sorted(k for k, v in m.items() if k not in ("role", "content", "name") and v not in (None, [], ""))
        if extra:
            raise ApiError(400, f"messages[{i}] has fields this server does not support: {', '.join(extra)}",
                           param=f"messages[{i}].{extra[0]}")
        role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name for the system turn
        out.append({"role": role, "content": _content(m, i)})
    return out


def parse_chat(body: dict) -> GenerationRequest:
    _check_fields(body, CHAT_FIELDS, "/v1/chat/completions")
    messages = _messages(body)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError(400, f"'response_format' must be {{\"type\": \"text\"}} here (no JSON mode); got {_show(fmt)}",
                       param="response_format")
    for name in ("tools", "functions"):
        _only_default(body, name, (None, []), "no tool calls")
    for name in ("tool_choice", "function_call"):
        _only_default(body, name, (None, "none", "auto"), "no tool calls")
    _only_default(body, "modalities", (None, ["text"]), "text only")
    _bool(body, "parallel_tool_calls")
    limit = _int(body, "max_tokens", None, lo=1)
    completion_limit = _int(body, "max_completion_tokens", None, lo=1)
    if limit is not None and completion_limit is not None and limit != completion_limit:
        raise ApiError(400, f"'max_tokens' ({limit}) and 'max_completion_tokens' ({completion_limit}) disagree; "
                       "give one", param="max_completion_tokens")
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", None, lo=0, hi=20)
    if top is not None and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if top:
        raise ApiError(400, f"'top_logprobs' must be 0 here: this server returns the chosen tokens' log-probabilities "
                       f"only, no alternatives; got {top}", param="top_logprobs")
    return GenerationRequest(kind="chat", messages=messages, logprobs=logprobs,
                             max_tokens=completion_limit if completion_limit is not None else limit,
                             **_shared(body))
