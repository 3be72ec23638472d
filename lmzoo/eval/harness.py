"""The lm-evaluation-harness adapter: any lmzoo model directory as an ``lm_eval`` model named "lmzoo".

    python -m lmzoo.eval.harness run --model lmzoo --model_args path=DIR --tasks lmzoo_add \
        --include_path lmzoo/eval/harness_tasks
    run_harness("DIR", ["lmzoo_zh_numbers"], limit=20)          # from Python (``lmzoo eval --harness``)

``LmzooLM`` is a ``TemplateLM``: lm-eval's own tokenization rules (the context/continuation split, the
prefix token of an empty context, the BOS check) decide the ids exactly as ``HFLM`` does, and lmzoo does
the rest: ``likelihood.loglikelihoods`` scores them, ``likelihood.rolling_loglikelihoods`` scores whole
documents in lm-eval's rolling windows, and ``generate_until`` decodes with ``lmzoo.generate.stream``
(the one engine), cutting each reply at the first ``until`` string itself (EOS also stops a row).
diff from HFLM: the length limit is the model's ``config.max_positions`` (no ``max_length`` argument),
and a prefix decoder (ChatGLM-6B) or an encoder-decoder (T5) encodes context and continuation apart
(lm-eval's "seq2seq" split) so the tokenizer's ``[gMASK] <sop>`` / ``</s>`` stay on the context.

lm-eval 0.4.13 finds models only in its own registry (no entry points, no plugins): importing this
module registers "lmzoo" there, so the plain ``lm_eval`` command does not know it; ``python -m
lmzoo.eval.harness ...`` imports it first and then runs lm-eval's own CLI with the same arguments.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lmzoo.errors import ConfigError
from lmzoo.eval.likelihood import loglikelihoods, max_length, model_shape, rolling_loglikelihoods, with_prompt_tail

NEEDS_LM_EVAL = "lmzoo eval --harness needs lm-eval: pip install 'lmzoo[eval]'"
TASKS_DIR = Path(__file__).resolve().parent / "harness_tasks"
MODEL_ARGS = ("path", "pretrained", "adapter", "dtype", "device", "batch_size", "max_batch_size", "max_gen_toks",
              "seed")
GEN_KWARGS = ("until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
              "repetition_penalty")

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # lm-eval is the optional extra "eval": this module imports, LmzooLM() raises
    TemplateLM = object


def _require_lm_eval() -> None:
    if TemplateLM is object:
        raise ConfigError(NEEDS_LM_EVAL)


class LmzooLM(TemplateLM):
    """``--model lmzoo --model_args path=DIR[,adapter=LORA_DIR][,dtype=bfloat16][,max_gen_toks=256][,seed=0]``."""

    def __init__(self, path: str | None = None, pretrained: str | None = None, adapter: str | None = None,
                 dtype: str = "float32", device: str | None = None, batch_size=16, max_batch_size=None,
                 max_gen_toks: int = 256, seed: int = 0, **unknown):
        _require_lm_eval()
        super().__init__()
        if unknown:
            raise ConfigError(f"lmzoo harness model: unknown model_args {sorted(unknown)}; known: {list(MODEL_ARGS)}")
        import lmzoo

        directory = path or pretrained  # pretrained=: the name lm-eval's own models use
        if not directory:
            raise ConfigError("lmzoo harness model: give the model directory, --model_args path=DIR")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ConfigError(f"lmzoo harness model: batch_size must be a positive integer, got {batch_size!r} "
                              "('auto' is HFLM's)")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's CLI asks for cuda unless told otherwise: run on the CPU and say so once
            print(f"lmzoo harness model: device {device} is not available here; running on the CPU", file=sys.stderr)
            device = "cpu"
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = lmzoo.load(directory, dtype=dtype, device=self._device)
        try:
            self.tokenizer = lmzoo.load_tokenizer(directory)
        except ConfigError as e:
            raise ConfigError(f"lmzoo harness model: {directory} holds no tokenizer ({e})") from e
        if adapter:
            from lmzoo.peft.adapter_files import load_adapter

            load_adapter(self.model, adapter, trainable=False)
        self.model.eval()
        self.shape = model_shape(self.model)
        self.backend = "causal" if self.shape == "causal decoder" else "seq2seq"  # how _encode_pair splits
        self.batch_size, self.max_gen_toks, self.seed = int(batch_size), int(max_gen_toks), int(seed)
        self.source = str(directory)

    # -- what TemplateLM asks --------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and each document's first rolling window) starts from: BOS, else EOS."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return max_length(self.model)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **_) -> list[int]:
        """HFLM's rule: the tokenizer's special tokens are added unless asked not to, or unless the string
        already starts with the prefix token's text."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tokenizer.decode([self.prefix_token_id]))
        ids = self.tokenizer.encode(string, add_special_tokens=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _progress(self, total: int, what: str, disable: bool):
        from tqdm import tqdm

        bar = tqdm(total=total, disable=disable, desc=f"lmzoo {what}")

        def progress(done: int, of: int) -> None:
            bar.total = of  # rolling: the windows, known only once the documents are cut
            bar.update(done - bar.n)
        return bar, progress

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
        bar, progress = self._progress(len(requests), "loglikelihood", disable_tqdm)
        scores = loglikelihoods(self.model, [(ctx, cont) for _, ctx, cont in requests], batch_size=self.batch_size,
                                progress=progress)
        bar.close()
        for (key, _, _), answer in zip(requests, scores):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        bar, progress = self._progress(len(texts), "loglikelihood_rolling (windows)", disable_tqdm)
        totals = rolling_loglikelihoods(self.model, [self.tok_encode(t) for t in texts],
                                        prefix_token=self.prefix_token_id, batch_size=self.batch_size,
                                        progress=progress)
        bar.close()
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``/``temperature``) replies, grouped by their gen_kwargs."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar, _ = self._progress(len(requests), "generate_until", disable_tqdm)
        for indices in groups.values():
            until, max_new, sampling = self._gen_settings(requests[indices[0]].args[1])
            prompts = {i: self._prompt(requests[i].args[0], max_new) for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                for i, text in zip(chunk, self._generate([prompts[i] for i in chunk], until, max_new, sampling)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    # -- generation ------------------------------------------------------------------------------
    def _gen_settings(self, kw: dict) -> tuple[list[str], int, dict]:
        unknown = sorted(set(kw) - set(GEN_KWARGS))
        if unknown:
            raise ConfigError(f"lmzoo harness model: gen_kwargs {unknown} are not supported; known: {list(GEN_KWARGS)}")
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_new = int(kw.get("max_gen_toks", kw.get("max_new_tokens", self.max_gen_toks)))
        temperature = float(kw.get("temperature", 0.0) or 0.0)
        sample = bool(kw.get("do_sample", temperature > 0)) and temperature > 0  # lm-eval: temperature 0 is greedy
        sampling = {"do_sample": sample, "temperature": temperature if sample else 1.0,
                    **{k: kw[k] for k in ("top_k", "top_p", "repetition_penalty") if kw.get(k) is not None}}
        return until, max_new, sampling

    def _prompt(self, context: str, max_new: int) -> list[int]:
        """The context's ids, left-truncated so that the prompt and ``max_new`` tokens fit (an encoder reads
        the whole limit), ending with a prefix decoder's ``[gMASK] <sop>``."""
        ids = self.tok_encode(context)
        tail = len(with_prompt_tail(self.model, [])) if self.shape == "prefix decoder" else 0
        room = self.max_length - (0 if self.shape == "encoder-decoder" else max_new + tail)
        if room < 1:
            raise ConfigError(f"lmzoo harness model: max_gen_toks {max_new} leaves no room for a prompt in the "
                              f"model's max_positions {self.max_length}")
        ids = with_prompt_tail(self.model, ids)
        return ids[-(room + tail):]

    def _generate(self, prompts: list[list[int]], until: list[str], max_new: int, sampling: dict) -> list[str]:
        """Left-padded prompts through the engine; a row is done at EOS or once its text holds a stop string
        (the batch stops when every row is done), and each text is cut before its first stop string."""
        from lmzoo.generate import stream

        eos, pad = self.tokenizer.eos_id, self.tokenizer.pad_id
        pad = pad if pad is not None else (eos if eos is not None else 0)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # (B, T) left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        gen = torch.Generator(device=self._device).manual_seed(self.seed) if sampling["do_sample"] else None
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in stream(self.model, ids, mask, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad,
                           generator=gen, **sampling):
            for b, t in enumerate(step.tolist()):
                if done[b]:
                    continue
                if t == eos:
                    done[b] = True
                    continue
                rows[b].append(t)
                done[b] = any(s in self.tokenizer.decode(rows[b], skip_special_tokens=True) for s in until)
            if all(done):
                break
        return [cut_at_stops(self.tokenizer.decode(r, skip_special_tokens=True), until) for r in rows]

    # -- chat templates (simple_evaluate(apply_chat_template=True), lm_eval --apply_chat_template) ----------
    @property
    def tokenizer_name(self) -> str:
        return self.source.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's own template when templating is asked for (None when not)."""
        return (self.tokenizer.chat_template or "") if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The harness's turns rendered by the model's chat template (its text; ``tok_encode`` then sees
        the template's BOS and adds no second one)."""
        if not self.tokenizer.chat_template:
            raise ConfigError(f"lmzoo harness model: {self.source} has no chat template; run without "
                              "apply_chat_template")
        text, _ = self.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)
        return text

    def get_model_info(self) -> dict:
        return {"model_source": self.source, "model_shape": self.shape,
                "model_num_parameters": sum(p.numel() for p in self.model.parameters())}


def cut_at_stops(text: str, until: list[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    ends = [text.find(s) for s in until if s and s in text]
    return text[:min(ends)] if ends else text


def register() -> None:
    """Make "lmzoo" a model name lm-eval knows (idempotent; importing this module calls it)."""
    import lm_eval.models  # noqa: F401  lm-eval lists its own models only while its registry is empty
    from lm_eval.api.registry import model_registry, register_model

    if "lmzoo" not in model_registry:
        register_model("lmzoo")(LmzooLM)


if TemplateLM is not object:
    register()


def run_harness(model_dir: str, tasks: list[str], *, include_path: str | None = None, limit=None, batch_size=16,
                adapter=None, num_fewshot=None, apply_chat_template: bool = False) -> dict:
    """lm-eval's results dict (``results``, ``configs``, ``versions``...) for ``tasks`` on the model in
    ``model_dir``. Tasks are looked up in lmzoo's shipped ``harness_tasks`` folder and ``include_path``
    only (lm-eval's own task index is not read: fast and offline). ``apply_chat_template``: the prompts
    go through the model's chat template (lm-eval's option of that name)."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path else [])
    manager = TaskManager(include_path=paths, include_defaults=False)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise ConfigError(f"lmzoo eval --harness: unknown task(s) {missing}; known here: {sorted(manager.all_tasks)} "
                          f"(from {paths}; add a folder of task YAML files with include_path)")
    lm = LmzooLM(path=model_dir, adapter=adapter, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              log_samples=False, bootstrap_iters=0, apply_chat_template=apply_chat_template)
    return results


def main() -> None:
    """``python -m lmzoo.eval.harness ARGS``: lm-eval's CLI with "lmzoo" registered."""
    _require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
