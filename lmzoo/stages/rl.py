"""The RL stages' shared parts (``lmzoo grpo``, ``lmzoo ppo``): prompts, their ids, the reference
policy, the sample log and the plot; the stages themselves only add their make() and loss.

    prompts (built-in tasks | a JSONL file) --encode_prompts--> ids --RolloutBatches(make)--> the loop

**Prompts** (``rl_prompts``). Without ``data.files``: the verifiable tasks of ``lmzoo.data.tasks``, drawn
exactly as ``lmzoo sft``'s built-in data draws them (``builtin_sft_data`` with the same ``data.builtin``
keys and seed), so the training prompts are the SFT run's task prompts and the held-out tasks are the
SFT run's held-out ones (never among either run's training prompts): a GRPO run from an SFT model
starts from the accuracy that SFT reported. With ``data.files``: JSONL (or a JSON list), one record per
line::

    {"prompt": "What is 2 + 3?"}                                    a string: one user turn
    {"prompt": [{"role": "system", ...}, {"role": "user", ...}]}    messages ending with a user turn
    {"prompt": "What is 2 + 3?", "kind": "add", "answer": "5"}      a verifiable task (for task: rewards)

``data.held_out`` (GRPO) names a file of such verifiable records, never trained on: the accuracy the
run measures as it trains (built-in data holds out its own).

Any other fields are kept: a reward function gets them as ``ctx["records"]`` (TRL passes a dataset's
extra columns to its reward functions the same way). Rewards get ``ctx["tasks"]`` (a ``Task`` or None
per response) too; a ``task:`` reward over a file without ``kind``/``answer`` is refused before training.

**The reference** (``reference_logps``): β = 0 keeps none; with LoRA the frozen base *is* the reference
(``lmzoo.peft.disable_adapters``, no copy); otherwise a frozen copy of the starting model, made before
the first step (and, on resume, of the starting model again: the run's reference never moves).

**Parallelism**: DDP works (each rank samples its share of the prompts on the
unwrapped module; the loop wraps for the update). Under FSDP every forward all-gathers parameters, so
ranks must make the same calls: a rank's generation would stop when *its* rows end (EOS), so a
rollout on a sharded model decodes until every rank is done (``lmzoo.rl.rollout.ranks_done``, an
all-reduce per step), and the stages call the module FSDP2 sharded at its root (GRPO's policy is that
root; PPO's policy and critic are called through their shared root, ``lmzoo.rl.value.Part``).

**Layout.** ``Rollout`` tensors are (N, T) with the prompt in the first ``prompt_len`` columns and
log-probs aligned with the tokens; ``objectives.rl`` wants (N, T_resp) over response tokens only.
``response_part`` is that conversion: the columns from ``prompt_len`` on.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmzoo.errors import ConfigError

BUILTIN_KEYS = {"n", "n_eval", "lang", "level", "kinds", "seed", "translation_fraction"}
BUILTIN_DEFAULTS = {"n": 2000, "n_eval": 100, "lang": "mixed", "level": "full", "kinds": "all",
                    "translation_fraction": 0.25}


@dataclass
class Prompt:
    prompt: str | list  # as the reward sees it: a user turn's text, or messages ending with a user turn
    task: object = None  # the Task it asks (built-in data, or a file record with kind and answer)
    record: dict = field(default_factory=dict)  # the file's fields

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else list(self.prompt)


@dataclass
class RLPrompts:
    train: list[Prompt]
    held_out: list  # Tasks never among the training prompts (built-in data), else []
    summary: str


def check_builtin(data: dict, source: str) -> None:
    builtin = data.get("builtin") or {}
    if not isinstance(builtin, dict) or set(builtin) - BUILTIN_KEYS:
        raise ConfigError(f"{source}: data.builtin takes {sorted(BUILTIN_KEYS)}")


def rl_prompts(data: dict, seed: int) -> RLPrompts:
    """The training prompts and held-out tasks (see the module docstring)."""
    from lmzoo.data.instructions import builtin_sft_data

    if data.get("files"):
        prompts = [p for f in data["files"] for p in read_prompts(f)]
        held = held_out_tasks(data["held_out"]) if data.get("held_out") else []
        return RLPrompts(prompts, held, f"{len(prompts)} prompts from {', '.join(map(str, data['files']))}"
                         + (f", {len(held)} held-out tasks from {data['held_out']}" if held else ""))
    opts = {**BUILTIN_DEFAULTS, "seed": seed, **(data.get("builtin") or {})}
    built = builtin_sft_data(n=opts["n"], seed=opts["seed"], lang=opts["lang"], n_eval=opts["n_eval"],
                             kinds=opts["kinds"], level=opts["level"],
                             translation_fraction=float(opts["translation_fraction"]))
    prompts = [Prompt(t.prompt, t) for t in built.train_tasks]
    return RLPrompts(prompts, built.eval_tasks, f"{len(prompts)} built-in task prompts ({opts['kinds']}, level "
                     f"{opts['level']}), {len(built.eval_tasks)} held-out tasks")


def read_prompts(path) -> list[Prompt]:
    """A JSONL file (or a JSON list) of prompt records; one ConfigError naming the file and line."""
    from lmzoo.data.tasks import TASKS, Task

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--data {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.split("\n") if line.strip()]
    except ValueError as e:
        raise ConfigError(f"--data {path}: not JSON lines of {{\"prompt\": ...}} records ({e})") from e
    out = []
    for k, rec in enumerate(records, 1):
        where = f"--data {path}: record {k}"
        if not isinstance(rec, dict) or "prompt" not in rec:
            raise ConfigError(f"{where}: expected {{\"prompt\": text or messages, ...}}, got {str(rec)[:80]}")
        p = rec["prompt"]
        ok = (isinstance(p, str) and p.strip()) or (isinstance(p, list) and p and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user",
                                                                                              "assistant")
            for m in p) and p[-1]["role"] == "user")
        if not ok:
            raise ConfigError(f"{where}: 'prompt' must be non-empty text or messages ({{role, content}}) ending "
                              "with a user turn")
        task = None
        if "answer" in rec or "kind" in rec:
            if rec.get("kind") not in TASKS or not isinstance(rec.get("answer"), (str, int)):
                raise ConfigError(f"{where}: a verifiable prompt needs 'kind' (one of {sorted(TASKS)}) and "
                                  f"'answer' together, got kind={rec.get('kind')!r}, answer={rec.get('answer')!r}")
            text = p if isinstance(p, str) else p[-1]["content"]
            task = Task(rec["kind"], text, str(rec["answer"]), rec.get("lang", "en"))
        out.append(Prompt(p, task, {k2: v for k2, v in rec.items() if k2 != "prompt"}))
    if not out:
        raise ConfigError(f"--data {path}: holds no prompt")
    return out


def held_out_tasks(path) -> list:
    """``data.held_out``: a JSONL file of verifiable records (``kind`` and ``answer`` on every one) whose
    accuracy the run measures as it trains, for prompts from files (built-in data holds out its own)."""
    prompts = read_prompts(path)
    for k, p in enumerate(prompts, 1):
        if p.task is None or not isinstance(p.prompt, str):
            raise ConfigError(f"data.held_out {path}: record {k} is not a verifiable task (a text 'prompt' with "
                              "'kind' and 'answer')")
    return [p.task for p in prompts]


def needs_tasks(spec) -> bool:
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    return any(isinstance(s, str) and s.startswith("task:") for s in specs)


def encode_prompts(tok, prompts: list[Prompt], template: str, context: int | None,
                   max_new_tokens: int) -> list[list[int]]:
    """Each prompt rendered with the chat template (``add_generation_prompt``), as ids. A prompt that
    leaves no room for ``max_new_tokens`` in the model's context is an error naming it (not cut)."""
    out = []
    for k, p in enumerate(prompts):
        ids = tok.apply_chat_template(p.messages, add_generation_prompt=True, template=template).ids
        if context is not None and len(ids) + max_new_tokens > context:
            raise ConfigError(f"prompt {k + 1} is {len(ids)} tokens long: with rollout.max_new_tokens "
                              f"{max_new_tokens} it does not fit the model's context of {context} tokens "
                              f"({str(p.prompt)[:60]!r}); shorten it or lower max_new_tokens")
        out.append(ids)
    return out


class PromptRows:
    """Prompt positions as ``Batches`` rows: a batch is {"index": (B,) prompt numbers}."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def batch(self, rows) -> dict:
        return {"index": torch.as_tensor([int(r) for r in rows])}


def prompt_batches(n_prompts: int, per_rank: int, env, seed: int):
    """A resumable, endless, shuffled ``Batches`` of ``per_rank`` prompt numbers per rank and step."""
    from lmzoo.data.sampler import Batches

    return Batches(PromptRows(n_prompts), per_rank, seed=seed, rank=env.rank, world_size=env.world_size)


def device_generator(gen: torch.Generator, device) -> torch.Generator:
    """A generator on ``device`` seeded from ``gen`` (RolloutBatches' CPU generator), for sampling there."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    return torch.Generator(device=device).manual_seed(seed)


def response_part(x: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(N, T) rollout layout -> (N, T - prompt_len) over response tokens, as ``objectives.rl`` wants."""
    return x[:, prompt_len:]


def reference_logps(model, *, beta: float, lora: bool, temperature: float):
    """``ref(input_ids, attention_mask, response_mask) -> (N, T)`` log-probs under the reference, or None
    when β = 0 (no reference kept). Call it before training starts (it copies the starting model)."""
    import copy

    from lmzoo.rl.rollout import sequence_token_logps

    if beta == 0:
        return None
    if lora:
        from lmzoo.peft import disable_adapters

        def base(ids, am, rm):
            with disable_adapters(model), _eval(model):
                return sequence_token_logps(model, ids, am, rm, temperature)
        return base
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def ref(ids, am, rm):
        if next(frozen.parameters()).device != ids.device:
            frozen.to(ids.device)
        return sequence_token_logps(frozen, ids, am, rm, temperature)
    ref.model = frozen
    return ref


class _eval:
    def __init__(self, model):
        self.model, self.was = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)
        return False


def samples_hook(tok, prompts: list[Prompt], ids: list[list[int]], stops: list[int], reward, out: Path, step,
                 max_new_tokens: int, env, n: int = 8):
    """An eval hook: greedy replies to the first ``n`` prompts with their rewards, appended to
    ``out/samples.jsonl`` as {step, prompt, response, reward} (rank 0); logs ``samples/reward``."""
    from lmzoo.rl.rollout import rollout

    chosen = list(range(min(n, len(prompts))))
    pad = tok.pad_id if tok.pad_id is not None else (stops[0] if stops else 0)

    def hook(model) -> dict:
        r = rollout(model, [ids[i] for i in chosen], n=1, max_new_tokens=max_new_tokens, temperature=0,
                    eos_token_id=stops or None, pad_token_id=pad)
        texts = [tok.decode(x, skip_special_tokens=True) for x in r.response_ids()]
        ps = [prompts[i] for i in chosen]
        values = reward([p.prompt for p in ps], texts, **reward_context(ps, r))
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            _drop_from(out / "samples.jsonl", step())  # a resumed run writes its steps again: no repeats
            with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
                for p, t, v in zip(ps, texts, values):
                    f.write(json.dumps({"step": step(), "prompt": p.prompt, "response": t, "reward": v},
                                       ensure_ascii=False) + "\n")
        return {"samples/reward": sum(values) / len(values)}

    return hook


def _drop_from(path: Path, step: int) -> None:
    """Keep only the rows of ``path`` written before ``step`` (rewritten atomically; absent: nothing)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", -1) < step]
    if len(kept) != len(lines):
        from lmzoo.train.atomic import write_text

        write_text(path, "".join(kept))


def reward_context(rows: list[Prompt], r) -> dict:
    """The ctx a reward function gets for the rollout's rows (one Prompt per row)."""
    return {"tasks": [p.task for p in rows], "records": [p.record for p in rows],
            "ended_with_eos": r.ended_with_eos.cpu(), "response_lengths": r.response_lengths.cpu()}


def score(reward, rows: list[Prompt], texts: list[str], r) -> torch.Tensor:
    """(N,) float32 rewards of the rollout's responses; the reward's own errors are one LmzooError."""
    values = reward([p.prompt for p in rows], texts, **reward_context(rows, r))
    return torch.tensor(values, dtype=torch.float32)


def figure(metrics: Path, panels: int, width: float):
    """(pyplot, figure, axes, train records, eval records) of a run's metrics.jsonl, for a row of plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmzoo.train.metrics import read_metrics

    rows = read_metrics(metrics)
    train = [r for r in rows if r.get("split") == "train"]
    ev = [r for r in rows if r.get("split") == "eval"]
    fig, ax = plt.subplots(1, panels, figsize=(width, 3.6))
    return plt, fig, ax, train, ev


def plot_rl(metrics: Path, png: Path) -> None:
    """Reward (train rollouts), KL to the reference and held-out accuracy against the step."""
    plt, fig, ax, train, ev = figure(metrics, 3, 14)
    for key, axis, title in (("reward/mean", ax[0], "reward (rollout mean)"), ("kl", ax[1], "KL(π_θ ‖ π_ref), k3")):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            axis.plot(*zip(*pts))
        axis.set_title(title), axis.set_xlabel("step")
    for key, label in (("accuracy", "greedy answers right (held out)"), ("samples/reward", "greedy samples' reward")):
        pts = [(r["step"], r[key]) for r in ev if key in r]
        if pts:
            ax[2].plot(*zip(*pts), "o-", label=label)
    if ax[2].get_legend_handles_labels()[0]:
        ax[2].legend()
    ax[2].set_title("evaluation"), ax[2].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def say(env, stage: str, text: str) -> None:
    if env.is_main:
        print(f"lmzoo {stage}: {text}", file=sys.stderr)

