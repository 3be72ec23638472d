"""Reward functions for the RL stages: one interface, several sources.

    RewardFn(prompts: list[str], responses: list[str], **ctx) -> list[float]     (one reward per response)

``prompts[i]`` is the prompt response i answers (a string is one user turn; a list of messages ending
with a user turn is taken as it is), so with n samples per prompt each prompt appears n times.
``load_reward(spec)`` builds a ``RewardFn`` from

| spec | reward |
|---|---|
| a directory | a reward model's score of prompt + response (``lmzoo reward``'s ``final/``, or any |
| | ``*ForSequenceClassification`` with ``num_labels: 1`` that ``lmzoo.load`` reads) |
| ``task:NAME`` | 1 if ``lmzoo.data.tasks.check`` accepts the reply, else 0, + ``format_reward`` for the |
| | bare-answer form (``answer_form``); NAME a task kind or ``all`` |
| ``module:function`` | ``function(prompts, responses, **ctx)``, imported with ``importlib`` |
| a callable | called the same way |
| a list of the above | their sum |

The context a stage passes (``ctx``): ``tasks`` (the ``Task`` each response answers; ``task:`` needs it),
``ended_with_eos`` and ``response_lengths`` (the rollout's, which the penalties read). A function is given
the ``ctx`` keys its signature names (all of them if it takes ``**kwargs``).

**Fail loudly.** Whatever the source, the values are checked: a function that raises, returns a
non-number, NaN or inf, or the wrong number of values is one ``LmzooError`` naming it
(``reward mypkg.rewards:brevity returned 3 values for 4 responses``).

**A reward model scores text, not the policy's tokens.** Each (prompt, response) is rendered with the
reward model's own tokenizer and chat template (its directory's, or ``template=``) and encoded as
``lmzoo reward`` encoded its training pairs (``lmzoo.data.preference.encode_response``: the reply's
end-of-turn token is the last token, where the score is read). So the policy and the reward model may
use different tokenizers; the responses are decoded text. Only when the reward model's directory holds
no tokenizer is the policy's used, and then its vocabulary must fit the reward model's embeddings
(one ``ConfigError`` otherwise). Scoring is batched (``batch_size``) and without grad.

**Penalties** (``with_penalties``; ``load_reward`` applies them to the total): ``missing_eos`` is
subtracted from a response that did not end with EOS (it ran into ``max_new_tokens``), and
``length_penalty`` per token beyond ``length_target`` (tokens as the rollout counts them, EOS included).
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from pathlib import Path
from typing import Callable, Protocol

from lmzoo.errors import ConfigError, LmzooError


class RewardFn(Protocol):
    def __call__(self, prompts: list, responses: list[str], **ctx) -> list[float]: ...


def _floats(values, n: int, name: str) -> list[float]:
    """``values`` as n finite floats, or one LmzooError naming the reward."""
    if hasattr(values, "tolist"):  # a tensor or an array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise LmzooError(f"reward {name} returned {type(values).__name__}; expected a list of {n} numbers")
    if len(values) != n:
        raise LmzooError(f"reward {name} returned {len(values)} values for {n} responses")
    out = []
    for k, v in enumerate(values):
        if hasattr(v, "item") and not isinstance(v, (list, tuple)):
            v = v.item()
        if isinstance(v, str) or not isinstance(v, numbers.Real):
            raise LmzooError(f"reward {name} returned {type(v).__name__} {v!r} for response {k}; expected a number")
        if not math.isfinite(float(v)):
            raise LmzooError(f"reward {name} returned {v} for response {k}; rewards must be finite")
        out.append(float(v))
    return out


class Checked:
    """A reward function whose calls are checked (see "Fail loudly"); ``name`` says which one it is."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):  # a builtin without a signature: give it everything
            params = None
        self._wants = None if params is None or any(p.kind is p.VAR_KEYWORD for p in params) else {
            p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def __call__(self, prompts: list, responses: list[str], **ctx) -> list[float]:
        if len(prompts) != len(responses):
            raise LmzooError(f"reward {self.name}: {len(prompts)} prompts for {len(responses)} responses; give each "
                             "response its prompt")
        kw = ctx if self._wants is None else {k: v for k, v in ctx.items() if k in self._wants}
        try:
            out = self.fn(list(prompts), list(responses), **kw)
        except LmzooError:
            raise
        except Exception as e:
            raise LmzooError(f"reward {self.name} raised {type(e).__name__}: {e}") from e
        return _floats(out, len(responses), self.name)

    def __repr__(self) -> str:
        return f"RewardFn({self.name})"


# -- task: verifiable rewards ----------------------------------------------------------------------


def answer_form(task, response: str) -> bool:
    """Is the reply the bare answer SFT trained (one line the kind's parser reads, no label or words)?"""
    from lmzoo.data.tasks import TASKS

    text = response.strip()
    if not text or "\n" in text:
        return False
    try:
        TASKS[task.kind][1](text)
    except (ValueError, TypeError):
        return False
    return True


def task_reward(kind: str = "all", *, format_reward: float = 0.0) -> Checked:
    """Exact match by value (``check``): 1.0 or 0.0, plus ``format_reward`` when the reply has the bare
    answer form (``answer_form``). Reads ``ctx["tasks"]``, one ``Task`` (or its dict) per response."""
    from lmzoo.data.tasks import TASKS, Task, check

    if kind != "all" and kind not in TASKS:
        raise ConfigError(f"reward task:{kind}: unknown task kind; known: {sorted(TASKS)} or 'all'")

    def verify(prompts, responses, tasks=None):
        if tasks is None:
            raise LmzooError(f"reward task:{kind} needs ctx tasks=[...] (the task each response answers)")
        if len(tasks) != len(responses):
            raise LmzooError(f"reward task:{kind}: {len(tasks)} tasks for {len(responses)} responses")
        out = []
        for k, (t, r) in enumerate(zip(tasks, responses)):
            t = Task(**t) if isinstance(t, dict) else t
            if kind != "all" and t.kind != kind:
                raise LmzooError(f"reward task:{kind}: response {k} answers a {t.kind!r} task")
            out.append(float(check(t, r)) + (format_reward if format_reward and answer_form(t, r) else 0.0))
        return out

    return Checked(verify, f"task:{kind}")


# -- reward models ---------------------------------------------------------------------------------


class ModelReward:
    """A reward model's score of each (prompt, response), rendered as ``lmzoo reward`` trained on."""

    def __init__(self, directory, *, tokenizer=None, template: str | None = None, batch_size: int = 8,
                 device=None, dtype=None, max_len: int | None = None):
        from lmzoo.data.preference import _check_template
        from lmzoo.models.reward import reward_model
        from lmzoo.tokenizers import find_tokenizer, load_tokenizer

        self.model = reward_model(directory, dtype=dtype, device=device).eval().requires_grad_(False)
        vocab = self.model.decoder.embed.weight.shape[0]
        if find_tokenizer(directory) is not None:
            self.tok = load_tokenizer(directory)
        elif tokenizer is not None:
            if tokenizer.vocab_size > vocab:
                raise ConfigError(f"reward model {directory} has no tokenizer, and the policy's ({tokenizer.vocab_size}"
                                  f" tokens) does not fit its vocabulary of {vocab}: save the reward model with its "
                                  "tokenizer (it then scores text through its own)")
            self.tok = tokenizer
        else:
            raise ConfigError(f"reward model {directory} has no tokenizer; save it with one or pass tokenizer=")
        self.template = template or self.tok.chat_template
        if self.template is None:
            raise ConfigError(f"reward model {directory}: its tokenizer has no chat template; pass template= (the one "
                              "it was trained with)")
        _check_template(self.tok, self.template)
        self.batch_size = batch_size if self.model.pad_token_id is not None else 1  # no pad: one row at a time
        self.max_len = max_len or self.model.decoder.max_positions

    def encode(self, prompt, response: str) -> list[int]:
        """The ids the reward model reads: the rendered prompt + response, cut after the end-of-turn token."""
        from lmzoo.data.preference import _fit, _fold, encode_response

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        seq = encode_response(self.tok, _fold(messages, self.template, self.tok), response, self.template)
        if self.max_len is not None and len(seq[0]) > self.max_len:  # keep the prompt's end, as training did
            return _fit([seq], self.max_len, self.max_len // 2)[0][0]
        return seq[0]

    def __call__(self, prompts: list, responses: list[str], **ctx) -> list[float]:
        from lmzoo.models.reward import score

        rows = [self.encode(p, r) for p, r in zip(prompts, responses)]
        return score(self.model, rows, batch_size=self.batch_size)


# -- building one ------------------------------------------------------------------------------------


def _import(spec: str) -> Callable:
    module, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"reward {spec}: cannot import module {module!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward {spec}: module {module!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward {spec}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def _one(spec, opts: dict) -> Checked:
    if callable(spec):
        return Checked(spec, getattr(spec, "__qualname__", type(spec).__name__))
    if isinstance(spec, Path) or (isinstance(spec, str) and Path(spec).is_dir()):
        return Checked(ModelReward(spec, **opts["model"]), f"model {spec}")
    if not isinstance(spec, str):
        raise ConfigError(f"a reward spec is a directory, 'task:NAME', 'module:function' or a callable, got "
                          f"{type(spec).__name__}")
    if spec.startswith("task:"):
        return task_reward(spec[len("task:"):], format_reward=opts["format_reward"])
    if ":" in spec:
        return Checked(_import(spec), spec)
    raise ConfigError(f"reward {spec!r} is neither a reward-model directory, 'task:NAME' nor 'module:function'")


def with_penalties(fn: Callable, *, missing_eos: float = 0.0, length_target: int | None = None,
                   length_penalty: float = 0.0) -> Checked:
    """``fn``'s rewards less ``missing_eos`` where ``ctx["ended_with_eos"]`` is false and ``length_penalty``
    per token of ``ctx["response_lengths"]`` beyond ``length_target``."""
    fn = fn if isinstance(fn, Checked) else _one(fn, {})
    if not missing_eos and not (length_penalty and length_target is not None):
        return fn

    def need(ctx: dict, key: str, n: int) -> list:
        if key not in ctx:
            raise LmzooError(f"reward penalties need ctx {key}=[...] (from the rollout)")
        v = ctx[key].tolist() if hasattr(ctx[key], "tolist") else list(ctx[key])
        if len(v) != n:
            raise LmzooError(f"reward penalties: {len(v)} {key} for {n} responses")
        return v

    def penalised(prompts, responses, **ctx):
        out = list(fn(prompts, responses, **ctx))
        if missing_eos:
            out = [r - (0.0 if e else missing_eos) for r, e in zip(out, need(ctx, "ended_with_eos", len(out)))]
        if length_penalty and length_target is not None:
            lengths = need(ctx, "response_lengths", len(out))
            out = [r - length_penalty * max(0, L - length_target) for r, L in zip(out, lengths)]
        return out

    return Checked(penalised, f"{fn.name} with penalties")


def load_reward(spec, *, tokenizer=None, template: str | None = None, batch_size: int = 8, device=None,
                dtype=None, max_len: int | None = None, format_reward: float = 0.0, missing_eos_penalty: float = 0.0,
                length_target: int | None = None, length_penalty: float = 0.0) -> RewardFn:
    """A checked ``RewardFn`` from ``spec`` (see the module docstring; a list sums its parts).
    ``tokenizer``, ``template``, ``batch_size``, ``device``, ``dtype`` and ``max_len`` are the reward model's
    (``tokenizer`` only when its directory has none); ``format_reward`` is ``task:``'s; the penalties apply
    to the total."""
    opts = {"format_reward": format_reward, "model": dict(tokenizer=tokenizer, template=template, device=device,
                                                          batch_size=batch_size, dtype=dtype, max_len=max_len)}
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError("reward: an empty list of rewards")
        parts = [_one(s, opts) for s in spec]

        def total(prompts, responses, **ctx):
            values = [p(prompts, responses, **ctx) for p in parts]
            return [sum(v) for v in zip(*values)]

        fn = Checked(total, " + ".join(p.name for p in parts))
    else:
        fn = _one(spec, opts)
    return with_penalties(fn, missing_eos=missing_eos_penalty, length_target=length_target,
                          length_penalty=length_penalty)
