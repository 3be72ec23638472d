"""The model under evaluation: any decoder lmzoo loads (a causal decoder, the prefix decoder, T5; a
quantized checkpoint; a base plus a LoRA adapter) with its tokenizer and the way it is asked.

``EvalModel`` answers the two questions the built-in tasks ask (``lmzoo.eval.suite``):

- ``replies(prompts)``: greedy replies through the one inference engine (``lmzoo.generate``);
- ``option_logps([(prompt, options)])``: each option's summed log-probability as the reply to the
  prompt (``lmzoo.eval.likelihood.loglikelihoods``).

A test's stub with these two methods stands in for a model (tests/eval/test_suite.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmzoo.errors import ConfigError
from lmzoo.eval.suite import PLAIN_TEMPLATE, plain_template


class EvalModel:
    """``model`` + ``tok``; ``template`` a built-in name or Jinja source (default: the tokenizer's own,
    else ``PLAIN_TEMPLATE``, also chosen by "plain"); ``name`` labels it in reports. The harness tasks go
    through the same choice: the chat template unless the prompts are plain."""

    def __init__(self, model, tok, *, template: str | None = None, name: str = "model", batch_size: int = 16):
        from lmzoo.tokenizers.chat import stop_ids

        self.model, self.tok, self.name, self.batch_size = model, tok, name, batch_size
        self.seq2seq = bool(getattr(model, "is_encoder_decoder", False))
        template = PLAIN_TEMPLATE if template == "plain" else template
        self.template = None if self.seq2seq else (template or tok.chat_template or PLAIN_TEMPLATE)
        self.plain = self.template == PLAIN_TEMPLATE  # one-line answers: the reply ends at its first newline
        if self.plain and hasattr(model, "prompt_tail"):  # a prefix decoder's question ends with [gMASK] <sop>
            self.template = plain_template(tok.decode(list(model.prompt_tail())))
        self.stops = ([tok.eos_id] if tok.eos_id is not None else []) if self.seq2seq or self.plain \
            else stop_ids(tok, self.template)
        self.context = getattr(model.config, "max_positions", None)

    @classmethod
    def from_dir(cls, path: str | Path, *, adapter: str | Path | None = None, template: str | None = None,
                 dtype: str = "float32", batch_size: int = 16, name: str | None = None) -> "EvalModel":
        """Load a model directory (and a PEFT adapter on it); it must carry its tokenizer."""
        import lmzoo
        from lmzoo.cli.common import require_decoder

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {path}: no config.json there (a Hugging Face model directory or a run's final/)")
        require_decoder(str(path), "lmzoo eval")
        try:
            tok = lmzoo.load_tokenizer(path)
        except ConfigError as e:
            raise ConfigError(f"--model {path} holds no tokenizer; lmzoo eval reads text with it ({e})") from e
        model = lmzoo.load(path, dtype=dtype)
        if adapter is not None:
            from lmzoo.peft.adapter_files import load_adapter

            load_adapter(model, adapter, trainable=False)
        if tok.vocab_size > model.config.vocab_size:
            raise ConfigError(f"--model {path}: its tokenizer has {tok.vocab_size} tokens, more than the model's "
                              f"vocab_size {model.config.vocab_size}")
        label = name or (f"{_short(path)}+{_short(Path(adapter))}" if adapter else _label(path))
        return cls(model.eval(), tok, template=template, name=label, batch_size=batch_size)

    # -- generation ---------------------------------------------------------------------------
    def replies(self, prompts: list[str], *, max_new_tokens: int = 24) -> list[str]:
        """The greedy reply to each prompt (a user turn), cut at the first stop token (and, for plain
        prompts, at the first newline)."""
        if self.seq2seq:
            return self._seq2seq_replies(prompts, max_new_tokens)
        from lmzoo.eval.tasks import greedy_replies

        texts = greedy_replies(self.model, self.tok, [[{"role": "user", "content": p}] for p in prompts],
                               self.template, max_new_tokens=max_new_tokens, stop_ids=self.stops,
                               batch_size=self.batch_size, max_len=self.context)
        return [t.split("\n", 1)[0] if self.plain else t for t in texts]

    @torch.no_grad()
    def _seq2seq_replies(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        from lmzoo.generate import generate

        pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        out = []
        for start in range(0, len(prompts), self.batch_size):
            rows = [self.tok.encode(p, add_special_tokens=True) for p in prompts[start:start + self.batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (B, S) right-padded encoder input
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            gen = generate(self.model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=self.stops or None,
                           pad_token_id=pad)  # (B, 1 + new): the decoder's start token, then the reply
            for row in gen[:, 1:].tolist():
                cut = next((k for k, t in enumerate(row) if t in self.stops), len(row))
                out.append(self.tok.decode(row[:cut], skip_special_tokens=True))
        return out

    # -- likelihood ----------------------------------------------------------------------------
    def option_logps(self, items: list[tuple[str, list[str]]], progress=None) -> list[list[float]]:
        """For each (prompt, options): log p(option | prompt) of every option, summed over its tokens."""
        from lmzoo.eval.likelihood import loglikelihoods

        requests, sizes = [], []
        for prompt, options in items:
            ctx, conts = self.choice_ids(prompt, options)
            requests += [(ctx, c) for c in conts]
            sizes.append(len(conts))
        lls = [lp for lp, _ in loglikelihoods(self.model, requests, batch_size=self.batch_size, progress=progress)]
        out, at = [], 0
        for k in sizes:
            out.append(lls[at:at + k])
            at += k
        return out

    def choice_ids(self, prompt: str, options: list[str]) -> tuple[list[int], list[list[int]]]:
        """(context ids, each option's continuation ids). Through a chat template the continuation is
        what the full conversation (prompt + the option as the assistant's reply) adds to the generation
        prompt, end-of-turn tokens included; T5: the prompt for its encoder, the option (+ EOS) for its decoder."""
        if self.seq2seq:
            return (self.tok.encode(prompt, add_special_tokens=True),
                    [self.tok.encode(o, add_special_tokens=True) for o in options])
        user = [{"role": "user", "content": prompt}]
        ctx = self.tok.apply_chat_template(user, add_generation_prompt=True, template=self.template)
        conts = []
        for o in options:
            full = self.tok.apply_chat_template(user + [{"role": "assistant", "content": o}], template=self.template)
            if full.ids[:len(ctx.ids)] == ctx.ids:
                conts.append(full.ids[len(ctx.ids):])
            elif full.text.startswith(ctx.text):  # the boundary tokenised differently: encode the rest alone
                conts.append(self.tok.encode(full.text[len(ctx.text):]))
            else:
                raise ConfigError(f"chat template {self.template[:40]!r}: the conversation with a reply does not "
                                  "begin with its generation prompt, so a reply's likelihood is undefined")
        return ctx.ids, conts


def _label(path: Path) -> str:
    """A run's final/ is named after its run folder (runs/sft/final -> sft)."""
    return path.parent.name if path.name == "final" and path.parent.name else _short(path)


def _short(path: Path) -> str:
    """A folder's name; a Hub cache snapshot's (models--org--name/snapshots/<commit>) is its Hub id."""
    from lmzoo.interop.hub import repo_id_of

    return repo_id_of(path) or path.name
