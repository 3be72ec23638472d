"""Generate from a checkpoint directory or a preset, streaming tokens as they come.

With a directory that holds a tokenizer (tokenizer.json, tokenizer.model, vocab.json + merges.txt,
vocab.txt or *.tiktoken; see lmzoo.load_tokenizer), --prompt takes text; otherwise give --ids.
Examples:
  lmzoo generate --model path/to/llama --prompt "The capital of France is" --max-new-tokens 20
  lmzoo generate --model gpt2 --ids "464 3139 286 4881 318" --max-new-tokens 5   # random weights
  lmzoo generate --model TinyLlama/TinyLlama-1.1B-Chat-v1.0 --prompt "Hello" --max-new-tokens 20   # a Hub id

Text output stops before the end-of-sequence token and leaves special tokens out; --ids output
prints every id generated, the EOS id included. Sampling settings are checked before the model is
built, and a model whose estimated size exceeds the available memory is refused (naming both).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import lmzoo
from lmzoo.cli.common import DECODER_SHAPES, add_model_argument, require_decoder, resolve_model, takes_model
from lmzoo.errors import LmzooError
from lmzoo.generate.sampling import LogitsProcessor
from lmzoo.generate.compiled import compile_for_decode
from lmzoo.generate.fastpath import fuse_for_decode

HELP = "generate text or token ids with the KV cache (greedy or sampled, streamed)"


def add_arguments(p) -> None:
    add_model_argument(p, shapes=DECODER_SHAPES)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer in the model directory)")
    src.add_argument("--ids", help="prompt as space-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (faster tokens after a "
                   "20-40 s compile on first use; needs a C++ compiler, else decodes eagerly with a message)")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--draft", metavar="DIR", help="speculative decoding with this draft model (same vocabulary; "
                      "a directory, preset or Hub id); greedy output is unchanged, sampled output keeps the model's "
                      "distribution")
    takes_model(p, "draft", allow_presets=True)
    spec.add_argument("--prompt-lookup", type=int, metavar="N", help="speculative decoding drafted by matching the "
                      "last N tokens earlier in the text (no draft model)")
    p.add_argument("--draft-k", type=int, default=4, help="tokens drafted per round (with --draft / --prompt-lookup)")


def _tokenizer(model_spec: str):
    """The directory's tokenizer in any format lmzoo.load_tokenizer reads, or None when it has none."""
    from lmzoo.tokenizers import find_tokenizer

    if find_tokenizer(model_spec) is None:
        return None
    return lmzoo.load_tokenizer(model_spec)


class TextStream:
    """Prints decoded text as ids arrive, holding back a character split across byte-level tokens."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], ""

    def add(self, t: int) -> str:
        self.ids.append(t)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        return "" if text.endswith("\ufffd") else self._take(text)  # U+FFFD: a character not complete yet

    def flush(self) -> str:
        """Whatever is still held back once generation ends (invalid bytes stay visible as U+FFFD)."""
        return self._take(self.tok.decode(self.ids, skip_special_tokens=True))

    def _take(self, text: str) -> str:
        new, self.shown = text[len(self.shown):], text
        return new


def check_settings(args) -> None:
    """The decoding flags, checked by the engine's own rules before any model is built."""
    if args.max_new_tokens < 0:
        raise LmzooError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    try:
        LogitsProcessor(args.do_sample, args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    except ValueError as e:  # "top_p must be in (0, 1], got 2.0": name the flag, not the field
        field, _, rest = str(e).partition(" ")
        raise LmzooError(f"--{field.replace('_', '-')} {rest}") from e
    if getattr(args, "draft", None) or getattr(args, "prompt_lookup", None) is not None:  # lmzoo chat has neither
        if args.draft_k < 1 or (args.prompt_lookup is not None and args.prompt_lookup < 1):
            raise LmzooError("--draft-k and --prompt-lookup must be at least 1")
        if args.repetition_penalty not in (None, 1.0):
            raise LmzooError("--repetition-penalty does not combine with speculative decoding (the penalty would "
                             "change with every accepted draft inside one forward)")


def _eos_ids(model, tok) -> list[int]:
    """The model's EOS id(s) and the tokenizer's, which a chat checkpoint may set differently."""
    eos = model.config.eos_token_id if hasattr(model.config, "eos_token_id") else None
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tok is not None and tok.special_id("eos") is not None:
        ids.append(tok.special_id("eos"))
    return list(dict.fromkeys(ids))


def run(args) -> int:
    check_settings(args)
    require_decoder(args.model, "generate")
    tok = _tokenizer(args.model) if Path(args.model).is_dir() else None
    if args.prompt is not None and tok is None:
        raise LmzooError(f"--prompt needs a tokenizer in the model directory ('{args.model}'): tokenizer.json, "
                         "tokenizer.model, vocab.json + merges.txt, vocab.txt or *.tiktoken; "
                         "pass token ids with --ids instead")
    if args.prompt is not None:
        # With the tokenizer's own special prefix (LLaMA's <s>, none for GPT-2), as the model was trained.
        ids = tok.encode(args.prompt, add_special_tokens=True)
    else:
        try:
            ids = [int(t) for t in args.ids.replace(",", " ").split()]
        except ValueError as e:
            raise LmzooError(f"--ids must be integers separated by spaces: {e}") from e
    model = resolve_model(args.model, args.dtype, args.seed, skip_memory_check=args.skip_memory_check)
    fuse_for_decode(model)  # inference only: fused, GEMV-friendly weights (generate/fastpath.py)
    if args.compile:
        compile_for_decode(model)  # generate/compiled.py
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise LmzooError(f"token ids {bad[:5]} are outside the model's vocabulary of {vocab}")
    gen = torch.Generator().manual_seed(args.seed)
    text = TextStream(tok) if tok is not None else None
    eos = _eos_ids(model, tok)
    if args.draft or args.prompt_lookup is not None:
        return _speculative(args, model, ids, eos, text, gen)
    for nxt in lmzoo.stream(model, torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, eos_token_id=eos or None, generator=gen):
        t = int(nxt[0])
        if text is not None and t in eos:
            break  # the end of the text, not a part of it
        sys.stdout.write(text.add(t) if text is not None else f"{t} ")
        sys.stdout.flush()
    sys.stdout.write((text.flush() if text is not None else "") + "\n")
    return 0


def _speculative(args, model, ids, eos, text, gen) -> int:
    """``--draft`` / ``--prompt-lookup``: the whole reply at once (rounds of k drafts), then its stats."""
    from lmzoo.generate.speculative import speculative_generate

    draft = resolve_model(args.draft, args.dtype, args.seed, skip_memory_check=args.skip_memory_check) \
        if args.draft else None
    out, stats = speculative_generate(model, torch.tensor([ids]), draft=draft, prompt_lookup=args.prompt_lookup,
                                      k=args.draft_k, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                      eos_token_id=eos or None, generator=gen)
    new = out[0, len(ids):].tolist()
    if text is not None:
        cut = next((k for k, t in enumerate(new) if t in eos), len(new))
        sys.stdout.write("".join(text.add(t) for t in new[:cut]) + text.flush() + "\n")
    else:
        sys.stdout.write(" ".join(map(str, new)) + "\n")
    print(f"speculative: {stats.accepted} of {stats.proposed} drafted tokens accepted "
          f"({stats.acceptance_rate:.0%}), {stats.tokens_per_forward:.2f} tokens per forward of the model",
          file=sys.stderr)
    return 0
