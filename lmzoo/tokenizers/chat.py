"""Chat templates: Jinja in transformers' ``tokenizer_config.json`` convention, plus built-ins.

Rendering uses the same Jinja settings as transformers (sandboxed, ``trim_blocks``,
``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, a non-escaping ``tojson``), so a
template renders to the same string here and there. The ids are ``encode(rendered text)``, as in
transformers' ``apply_chat_template``.

The assistant mask marks every token that overlaps text inside a ``{% generation %}`` block
(transformers' marker). Templates without the marker fall back to the assistant messages' own
contents, found in the rendered text in order.

Built-ins (each marks what the model must learn to write, including the end-of-turn token):

- ``llama2``: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>``,
  Meta's format; the ids equal Meta's per-turn ``encode(..., bos=True, eos=True)``.
- ``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` (Qwen, and many others).
- ``chatglm2``: ``[gMASK]<sop>[Round 1]\\n\\n问：{user}\\n\\n答：{answer}``, EOS after the last answer.
- ``chatglm3``: ``[gMASK]<sop><|system|>\\n {system}<|user|>\\n {user}<|assistant|>\\n {answer}``;
  the space after "\\n" stands for SentencePiece's dummy prefix on separately encoded messages,
  so the ids equal ChatGLM3's own ``build_chat_input``.
- ``llama3``: ``<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``,
  Meta-Llama-3-Instruct's published template (contents trimmed, BOS once at the start).

``TEMPLATE_INFO`` says, per built-in, which special tokens it writes (a tokenizer trained from
scratch must have each as one id: ``missing_tokens``) and where a generated turn ends
(``stop_ids``). ``choose_template`` is the rule ``--template`` follows: the name asked for, else the
tokenizer's own template (``chat_template`` of tokenizer_config.json), else the family's published
format (the name in its registry record), else ChatML.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from lmzoo.errors import ConfigError, LmzooError



def _alternate(name: str) -> str:
    return "{{ raise_exception('" + name + " needs user and assistant turns alternating, starting with user') }}"


BUILTIN_TEMPLATES = {
    "llama2": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" + _alternate("llama2") +
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% set content = message['content'] %}"
        "{% if loop.first and system is not none %}"
        "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{% endif %}"
        "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
        "{% else %}"
        "{% generation %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endgeneration %}"
        "{% endif %}"
        "{% endfor %}"),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
        "{{ '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "chatglm2": (
        "{{ '[gMASK]<sop>' }}{% set ns = namespace(round=0) %}"
        "{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" + _alternate("chatglm2") +
        "{% endif %}"
        "{% if message['role'] == 'user' %}{% set ns.round = ns.round + 1 %}"
        "{{ '[Round ' ~ ns.round ~ ']\\n\\n问：' + message['content'] + '\\n\\n答：' }}"
        "{% else %}"
        "{% generation %}{{ message['content'] }}{% if loop.last %}{{ eos_token }}{% endif %}{% endgeneration %}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
        "{% endif %}"
        "{% endfor %}"),
    # ChatGLM-6B's chat(): earlier rounds "[Round i]\n问：q\n答：a\n", the last question "[Round n]\n问：q\n答："
    # (a lone question is just itself), then the tokenizer's [gMASK] <sop>; the answer and <eop> follow.
    # Everything before <sop> is the prefix the model reads bidirectionally, so only the last answer is trained.
    "chatglm": (
        "{% set ns = namespace(round=0, last_user=-1, users=0) %}"
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{% set ns.last_user = loop.index0 %}{% set ns.users = ns.users + 1 %}{% endif %}{% endfor %}"
        "{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" + _alternate("chatglm") +
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if ns.users == 1 %}{{ message['content'] }}"
        "{% else %}{{ '[Round ' ~ ns.round ~ ']\n问：' + message['content'] + '\n答：' }}{% endif %}"
        "{% if loop.index0 == ns.last_user %}{{ '[gMASK]<sop>' }}{% endif %}"
        "{% set ns.round = ns.round + 1 %}"
        "{% elif loop.last %}"
        "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '\n' }}{% endif %}"
        "{% endfor %}"),
    "chatglm3": (
        "{{ '[gMASK]<sop>' }}"
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ '\\n ' + message['content'] }}{% if loop.last %}{{ eos_token }}{% endif %}"
        "{% endgeneration %}"
        "{% else %}{{ '\\n ' + message['content'] }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"),
    "llama3": (
        "{% for message in messages %}"
        "{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
}


@dataclass(frozen=True)
class TemplateInfo:
    """What a built-in template needs from a tokenizer, and where a generated assistant turn ends."""

    special_tokens: tuple[str, ...]  # strings the template writes that must each be one id
    roles: tuple[str, ...]  # named special tokens it writes (bos_token, eos_token)
    stop_tokens: tuple[str, ...]  # end of a turn besides the tokenizer's eos
    system: bool = True  # renders a system turn (ChatGLM-6B's and ChatGLM2's formats have none)


TEMPLATE_INFO = {
    "llama2": TemplateInfo((), ("bos", "eos"), ()),
    "chatml": TemplateInfo(("<|im_start|>", "<|im_end|>"), (), ("<|im_end|>",)),
    "chatglm2": TemplateInfo(("[gMASK]", "<sop>"), ("eos",), (), system=False),
    "chatglm": TemplateInfo(("[gMASK]", "<sop>"), ("eos",), (), system=False),
    # ChatGLM3 ends a reply by naming the next speaker (its chat() stops at <|user|> and <|observation|>)
    "chatglm3": TemplateInfo(("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"), ("eos",),
                             ("<|user|>", "<|observation|>")),
    "llama3": TemplateInfo(("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), ("bos",), ("<|eot_id|>",)),
}
DEFAULT_TEMPLATE = "chatml"  # for a model whose tokenizer and family name none


def template_info(name: str) -> TemplateInfo:
    if name not in TEMPLATE_INFO:
        raise ConfigError(f"unknown chat template {name!r}; built-ins: {sorted(TEMPLATE_INFO)}")
    return TEMPLATE_INFO[name]


# A vocabulary that holds the special tokens of exactly one of these built-ins was made for it (ChatGLM2's
# [gMASK] <sop> are not asked: ChatGLM3's vocabulary has them too).
VOCABULARY_ORDER = ("llama3", "chatml", "chatglm3")


def choose_template(tok, template: str | None = None, default: str | None = None) -> str:
    """The template to use (a built-in name or Jinja source): ``template`` when given (``--template``),
    else the tokenizer's own, else the built-in whose special tokens the vocabulary holds, else
    ``default`` (the family record's ``chat_template``), else ChatML. A built-in whose tokens the
    tokenizer lacks is refused here, naming them and the built-ins that would fit."""
    if template:
        resolve_template(template)  # an unknown name fails here, before any data is read
        chosen = template
    elif tok.chat_template:
        return tok.chat_template
    else:
        found = [n for n in VOCABULARY_ORDER if TEMPLATE_INFO[n].special_tokens and not missing_tokens(tok, n)]
        chosen = found[0] if len(found) == 1 else default or DEFAULT_TEMPLATE  # one match, or it says nothing
    missing = missing_tokens(tok, chosen)
    if missing:
        fits = [n for n in TEMPLATE_INFO if not missing_tokens(tok, n)]
        raise ConfigError(f"chat template {builtin_name(chosen)!r} writes {missing}, which this tokenizer does not "
                          f"have; choose one it can render ({fits or 'none'}), or give the tokenizer a chat_template")
    return chosen


def fold_system(conversation: list[dict]) -> list[dict]:
    """For a template without a system turn: the system prompt goes in front of the first user message
    (as LLaMA-Factory does for such formats); other conversations are returned as they are."""
    if not conversation or conversation[0].get("role") != "system" or len(conversation) < 2:
        return conversation
    system, first, rest = conversation[0], conversation[1], conversation[2:]
    return [{**first, "content": system["content"] + "\n\n" + first["content"]}, *rest]


def builtin_name(template: str) -> str | None:
    """The built-in's name for a name or for its Jinja source (a tokenizer loaded with a flavor holds
    the source); None for any other template."""
    if template in TEMPLATE_INFO:
        return template
    return next((name for name, source in BUILTIN_TEMPLATES.items() if source == template), None)


def missing_tokens(tok, template: str) -> list[str]:
    """The special tokens (or special-token roles) a built-in template writes that ``tok`` lacks;
    [] for other Jinja source (nothing is known about it)."""
    name = builtin_name(template)
    if name is None:
        return []
    info = TEMPLATE_INFO[name]
    return ([t for t in info.special_tokens if tok.token_to_id(t) is None]
            + [f"{r}_token" for r in info.roles if tok.special_id(r) is None])


def stop_ids(tok, template: str) -> list[int]:
    """Ids that end a generated assistant turn under ``template``: the eos and the template's own. Jinja
    source that is no built-in (a directory's own ChatML, Qwen's) gets every built-in end-of-turn token its
    text writes, so the model does not talk past the end of its turn."""
    stops = [tok.eos_id] if tok.eos_id is not None else []
    name = builtin_name(template)
    ends = TEMPLATE_INFO[name].stop_tokens if name else \
        [t for info in TEMPLATE_INFO.values() for t in info.stop_tokens if t in template]
    for t in ends:
        i = tok.token_to_id(t)
        if i is not None and i not in stops:
            stops.append(i)
    return stops


def resolve_template(template: str) -> str:
    """A built-in name -> its Jinja source; a Jinja string is returned as is."""
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template]
    if "{" not in template:
        raise ConfigError(f"unknown chat template {template!r}; built-ins: {sorted(BUILTIN_TEMPLATES)} "
                          "(or pass Jinja source)")
    return template


_TRACK: ContextVar = ContextVar("lmzoo_generation_spans", default=None)


@lru_cache(maxsize=32)
def _compile(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: record where the enclosed text lands."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            track = _TRACK.get()
            if track is not None:
                blocks, spans = track
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not compile: {e} (line {e.lineno})") from e


def _content_spans(text: str, messages) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for m in messages:
        if m.get("role") == "assistant" and m.get("content"):
            k = text.find(m["content"], pos)
            if k < 0:
                raise LmzooError("the chat template has no {% generation %} block and an assistant message does not "
                                 "appear verbatim in the rendered text, so its tokens cannot be found")
            spans.append((k, k + len(m["content"])))
            pos = k + len(m["content"])
    return spans


def render(tok, messages, add_generation_prompt: bool = False, template: str | None = None, **kwargs):
    """(rendered text, [(start, end)] character spans of the assistant's text)."""
    import jinja2

    source = resolve_template(template) if template else tok.chat_template
    if source is None:
        raise ConfigError(f"{tok.name} has no chat template; pass template= (a Jinja string or one of "
                          f"{sorted(BUILTIN_TEMPLATES)})")
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise LmzooError("messages must be a list of {'role': ..., 'content': ...} dicts")
    messages = [{k: tok.backend.prepare(v) if isinstance(v, str) else v for k, v in m.items()} for m in messages]
    context = {f"{role}_token": token for role, token in tok.roles.items()}
    context.update(kwargs)
    blocks, spans = [], []
    reset = _TRACK.set((blocks, spans))
    try:
        for block in _compile(source).generate(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                               **context):
            blocks.append(block)
    except jinja2.exceptions.TemplateError as e:
        raise LmzooError(f"chat template: {e}") from e
    finally:
        _TRACK.reset(reset)
    text = "".join(blocks)
    if "{% generation" not in source and "{%- generation" not in source:
        spans = _content_spans(text, messages)
    return text, spans


@dataclass
class ChatEncoding:
    text: str
    ids: list[int]
    assistant_mask: list[int]
    spans: list[tuple[int, int]]


def token_mask(offsets, spans) -> list[int]:
    """1 for every token whose character span overlaps one of ``spans`` (both sorted)."""
    mask, k = [0] * len(offsets), 0
    for i, (s, e) in enumerate(offsets):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if e > spans[k][0]:  # transformers' rule: overlap, so a token cut by a span edge counts
            mask[i] = 1
    return mask


def apply_chat_template(tok, messages, add_generation_prompt=False, template=None, **kwargs) -> ChatEncoding:
    text, spans = render(tok, messages, add_generation_prompt=add_generation_prompt, template=template, **kwargs)
    ids, offsets = tok.encode_with_offsets(text)
    return ChatEncoding(text=text, ids=ids, assistant_mask=token_mask(offsets, spans), spans=spans)
