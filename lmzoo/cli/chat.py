"""Chat with a model directory in the terminal: streamed answers, multi-turn history rendered
through the chat template, and the commands /system, /reset, /help and /exit.

The directory must hold a tokenizer. The template is --template (a built-in name, a Jinja file or
Jinja source), else the directory's own (tokenizer_config.json or chat_template.jinja), else the
built-in whose special tokens the vocabulary has (chatml for <|im_start|>, chatglm3 for <|user|>)
or the one for the model family (llama2, chatglm2). Each answer stops at EOS or at the template's
end-of-turn token (<|im_end|> for chatml), and neither is printed. When the conversation and
--max-new-tokens no longer fit the model's context, the oldest turns are dropped (the system
prompt stays), and a note says so once on stderr.

Examples:
  lmzoo chat --model path/to/qwen-chat
  lmzoo chat --model path/to/llama-2-chat --system "Answer in one sentence." --max-new-tokens 64
  lmzoo chat --model path/to/chatglm3 --prompt "你好" --do-sample --top-p 0.8 --seed 1   # one turn, then exit

Interactive commands:
  /system TEXT  set the system prompt for the next turns (/system alone removes it)
  /reset        forget the conversation (the system prompt stays)
  /help         list the commands
  /exit         leave (Ctrl-D and Ctrl-C at the prompt leave too; Ctrl-C during an answer stops it)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lmzoo.cli.common import DECODER_SHAPES, add_model_argument, family_of, require_decoder, resolve_model
from lmzoo.cli.generate import TextStream, _eos_ids, _tokenizer, check_settings
from lmzoo.errors import LmzooError
from lmzoo.generate import stream
from lmzoo.errors import ConfigError
from lmzoo.tokenizers.chat import BUILTIN_TEMPLATES, builtin_name, choose_template, stop_ids
from lmzoo.generate.compiled import compile_for_decode
from lmzoo.generate.fastpath import fuse_for_decode

HELP = "chat with a model directory in the terminal (streamed, multi-turn, through its chat template)"

COMMAND_HELP = """commands:
  /system TEXT  set the system prompt for the next turns (/system alone removes it)
  /reset        forget the conversation (the system prompt stays)
  /help         list the commands
  /exit         leave (also Ctrl-D, or Ctrl-C at the prompt)"""

DEFAULT_MAX_NEW_TOKENS = 256


def add_arguments(p) -> None:
    add_model_argument(p, shapes=DECODER_SHAPES)
    p.add_argument("--template", help=f"chat template: a built-in ({', '.join(sorted(BUILTIN_TEMPLATES))}), a "
                                      "Jinja file or Jinja source (default: the directory's own)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--prompt", help="answer this one user message and exit (no interactive session)")
    p.add_argument("--max-new-tokens", type=int, help=f"most tokens per answer (default {DEFAULT_MAX_NEW_TOKENS}, "
                                                      "or half the model's context when that is less)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (faster tokens after a "
                   "20-40 s compile on first use; needs a C++ compiler, else decodes eagerly with a message)")


# -- the template --------------------------------------------------------------------------------
def template_for(option: str | None, tok, model_dir: str) -> tuple[str, str]:
    """(Jinja source, what it is called): ``chat.choose_template``'s choice (--template, the directory's
    own, the vocabulary's built-in, the family record's ``chat_template``), said once when it is a built-in."""
    given = option
    if option is not None and option not in BUILTIN_TEMPLATES and "{" not in option:
        if not Path(option).is_file():
            raise LmzooError(f"--template '{option}' is neither a built-in ({', '.join(sorted(BUILTIN_TEMPLATES))}) "
                             "nor a file, nor Jinja source")
        given = Path(option).read_text(encoding="utf-8")
    try:
        chosen = choose_template(tok, given, default=family_of(model_dir).chat_template or None)
    except ConfigError as e:
        where = f"'{model_dir}' has no chat template, and the " if option is None and not tok.chat_template else "the "
        raise LmzooError(f"{where}{e}; pass --template ({', '.join(sorted(BUILTIN_TEMPLATES))}, a Jinja file or source)") from None
    name = builtin_name(chosen)
    if name is not None:
        if option is None and not tok.chat_template:
            print(f"note: '{model_dir}' has no chat template; using the built-in '{name}'", file=sys.stderr)
        return BUILTIN_TEMPLATES[name], name
    if option is not None and given != option:  # a file
        return chosen, option
    return chosen, "the directory's own" if option is None else "--template"


# -- a conversation -----------------------------------------------------------------------------
class Chat:
    """The history, its rendering under the template, and one streamed answer per user message."""

    def __init__(self, model, tok, template: str, *, system: str | None, stop: list[int], context: int | None,
                 max_new_tokens: int, sampling: dict, seed: int, out=None):
        self.model, self.tok, self.template = model, tok, template
        self.system, self.turns = system, []  # turns: user/assistant messages after the system one
        self.stop, self.context, self.max_new_tokens = stop, context, max_new_tokens
        self.sampling, self.out = sampling, out or sys.stdout
        self.generator = torch.Generator().manual_seed(seed)
        self.trim_noted = False

    def messages(self, turns=None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + list(self.turns if turns is None else turns)

    def prompt_ids(self, turns) -> list[int]:
        enc = self.tok.apply_chat_template(self.messages(turns), add_generation_prompt=True, template=self.template)
        return enc.ids

    def fit(self, user: str) -> list[int]:
        """The ids of the history + ``user``, the oldest turns dropped while it would not fit."""
        turns = self.turns + [{"role": "user", "content": user}]
        ids = self.prompt_ids(turns)
        dropped = 0
        while self.context is not None and len(ids) + self.max_new_tokens > self.context and len(turns) > 1:
            turns = turns[2:] if len(turns) > 2 and turns[1]["role"] == "assistant" else turns[1:]
            dropped += 1
            ids = self.prompt_ids(turns)
        if self.context is not None and len(ids) + self.max_new_tokens > self.context:
            raise LmzooError(f"this message takes {len(ids)} tokens under the template; with --max-new-tokens "
                             f"{self.max_new_tokens} that exceeds the model's context of {self.context} tokens")
        if dropped and not self.trim_noted:
            print(f"note: the conversation no longer fits the model's context of {self.context} tokens; dropping "
                  "the oldest turns (the system prompt stays)", file=sys.stderr)
            self.trim_noted = True
        self.turns = turns[:-1]
        return ids

    def answer(self, user: str) -> str:
        """Stream the answer to ``user`` to ``out``; it joins the history once complete."""
        ids = self.fit(user)
        text, started = TextStream(self.tok), False
        try:
            for nxt in stream(self.model, torch.tensor([ids]), max_new_tokens=self.max_new_tokens,
                              eos_token_id=self.stop or None, generator=self.generator, **self.sampling):
                t = int(nxt[0])
                if t in self.stop:
                    break  # EOS or end of turn: the end of the answer, not a part of it
                piece = text.add(t)
                if not started:  # a template's "\n " before the answer is not worth printing
                    piece = piece.lstrip()
                    started = bool(piece)
                self._write(piece)
        except KeyboardInterrupt:  # Ctrl-C during an answer stops it; the turn is forgotten
            self._write("\n")
            raise
        rest = text.flush()
        self._write(rest.lstrip() if not started else rest)
        self._write("\n")
        reply = self.tok.decode(text.ids, skip_special_tokens=True).strip()
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return reply

    def _write(self, s: str) -> None:
        if s:
            self.out.write(s)
            self.out.flush()


def interact(chat: Chat, read=None) -> None:
    """Read lines (``input()`` unless ``read`` is given) until /exit, EOF or Ctrl-C at the prompt;
    commands start with '/'."""
    read = read or input
    prompt = ">>> " if sys.stdin is not None and sys.stdin.isatty() else ""
    while True:
        try:
            line = read(prompt)
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/help":
                print(COMMAND_HELP, file=sys.stderr)
            elif cmd == "/reset":
                chat.turns = []
                print("(conversation reset)", file=sys.stderr)
            elif cmd == "/system":
                chat.system = rest.strip() or None
                print("(system prompt set)" if chat.system else "(system prompt removed)", file=sys.stderr)
            else:
                print(f"unknown command {cmd}; /help lists them", file=sys.stderr)
            continue
        try:
            chat.answer(line)
        except KeyboardInterrupt:
            continue
        except LmzooError as e:  # one bad turn (too long, a template that refuses it) does not end the session
            print(f"lmzoo chat: error: {e}", file=sys.stderr)


def run(args) -> int:
    given = args.max_new_tokens
    args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS if given is None else given
    check_settings(args)
    if not Path(args.model).is_dir():
        raise LmzooError(f"--model '{args.model}' is not a directory: chat needs a checkpoint directory (or a Hub id) "
                         "with a tokenizer (a preset has neither weights worth talking to nor a tokenizer)")
    require_decoder(args.model, "chat")
    tok = _tokenizer(args.model)
    if tok is None:
        raise LmzooError(f"'{args.model}' holds no tokenizer (tokenizer.json, tokenizer.model, vocab.json + "
                         "merges.txt, vocab.txt or *.tiktoken); chat needs one to read and write text")
    source, name = template_for(args.template, tok, args.model)
    probe = [{"role": "user", "content": "hi"}]
    tok.apply_chat_template(([{"role": "system", "content": args.system}] if args.system else []) + probe,
                            add_generation_prompt=True, template=source)  # a broken template fails before loading
    try:
        model = resolve_model(args.model, args.dtype, args.seed, skip_memory_check=args.skip_memory_check)
        fuse_for_decode(model)  # inference only: fused, GEMV-friendly weights (generate/fastpath.py)
        if args.compile:
            compile_for_decode(model)  # generate/compiled.py
        context = None if getattr(model, "is_encoder_decoder", False) else getattr(model.config, "max_positions", None)
        if context is not None and given is None:
            args.max_new_tokens = min(args.max_new_tokens, context // 2)
        if context is not None and args.max_new_tokens >= context:
            raise LmzooError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a message in the model's "
                             f"context of {context} tokens")
        stop = list(dict.fromkeys(_eos_ids(model, tok) + stop_ids(tok, source)))
        sampling = dict(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty)
        chat = Chat(model, tok, source, system=args.system, stop=stop, context=context,
                    max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed)
        if args.prompt is not None:
            chat.answer(args.prompt)
            return 0
        print(f"lmzoo chat: {args.model} (template: {name}); /help lists the commands, /exit leaves", file=sys.stderr)
        interact(chat)
    except KeyboardInterrupt:  # Ctrl-C while loading or during a --prompt answer
        print(file=sys.stderr)
        return 130
    return 0
