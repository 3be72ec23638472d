"""Preference learning, the shared parts: pairs of answers to one prompt (the chosen and the rejected)
and what the stages that learn from them have in common (docs/preference.md). The stages:

- ``lmzoo.stages.reward.run_reward``: a reward model (the decoder plus a scalar head, transformers'
  ``<Arch>ForSequenceClassification`` layout) trained with the Bradley–Terry loss
  ``-log σ(r_chosen − r_rejected)``; held-out pairwise accuracy, margin and a reward histogram.
- ``lmzoo.stages.dpo.run_dpo``: the policy trained directly on the pairs with DPO or a variant (``--loss``), against a
  frozen reference whose log-probs are computed once over the data before the first step (so no
  second model is kept: with LoRA the base is the reference, with ``--ref DIR`` another model is).

A run config (``configs/reward/tiny.yaml``, ``configs/dpo/tiny.yaml``) has the sections
  data:   files (empty: built-in pairs, a task's right answer chosen over a wrong one), format,
          template, max_len, max_prompt_len, batch_size, overflow (truncate | drop), val_fraction,
          builtin: {n, n_eval, lang, level, kinds}
  loss:   reward: margin-free BT, center (reward centering coefficient);
          dpo: name (sigmoid | hinge | ipo | robust | simpo | orpo), beta, label_smoothing, gamma
  lora:   as in SFT (dpo only)
  eval:   accuracy (dpo on built-in data: exact-match of greedy answers), n, max_new_tokens
  train:  every TrainConfig field
The run folder is the SFT contract: metrics.jsonl, checkpoints/, loss.png, a stage plot, final/
(with its tokenizer and chat template) and, with LoRA, adapter/.
"""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

import torch

from lmzoo.errors import ConfigError, LmzooError
from lmzoo.stages.pretrain import check_resume, check_sections
from lmzoo.stages.sft import load_model, pick_template
from lmzoo.train import TrainConfig
from lmzoo.train.distributed import setup

SECTIONS = {"data": {"files", "format", "template", "max_len", "max_prompt_len", "batch_size", "overflow",
                     "val_fraction", "builtin", "held_out"},
            "loss": {"name", "beta", "label_smoothing", "gamma", "center", "sft_weight", "desirable_weight",
                     "undesirable_weight"},
            "lora": {"enabled", "qlora", "r", "alpha", "dropout", "targets", "rslora"},
            "eval": {"accuracy", "n", "max_new_tokens", "batch_size"},
            "train": None}
BUILTIN_DEFAULTS = {"n": 2000, "n_eval": 100, "lang": "mixed", "level": "full", "kinds": "all", "rejected": "rule",
                    "samples": 4, "temperature": 0.7}
BUILTIN_KEYS = {"seed", *BUILTIN_DEFAULTS}



def check_config(cfg: dict, source: str = "config") -> None:
    check_sections(cfg, SECTIONS, source, "a preference", {"data": ("max_len", "max_prompt_len", "batch_size")})
    data = cfg.get("data") or {}
    builtin = data.get("builtin") or {}
    if not isinstance(builtin, dict) or set(builtin) - BUILTIN_KEYS:
        raise ConfigError(f"{source}: data.builtin takes {sorted(BUILTIN_KEYS)}")
    if builtin.get("rejected", "rule") not in ("rule", "policy"):
        raise ConfigError(f"{source}: data.builtin.rejected must be rule (made-up near misses) or policy (the "
                          f"model's own wrong replies), got {builtin['rejected']!r}")
    for key, low in (("samples", 1), ("temperature", 0)):
        v = builtin.get(key, low + 1)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < low or (key == "samples" and v != int(v)):
            raise ConfigError(f"{source}: data.builtin.{key} must be {'an integer ≥ 1' if low else '≥ 0'}, got {v!r}")
    if data.get("held_out") and not data.get("files"):
        raise ConfigError(f"{source}: data.held_out is for pairs from files (--data); the built-in pairs hold out "
                          "their own tasks")
    beta = (cfg.get("loss") or {}).get("beta")
    if beta is not None and (not isinstance(beta, (int, float)) or beta <= 0):
        raise ConfigError(f"{source}: loss.beta must be a positive number, got {beta!r}")


def preference_pairs(data: dict, seed: int, sample=None):
    """(train pairs, held-out pairs, held-out tasks or None, a note on how they were made): files split
    by val_fraction (the tasks: ``data.held_out``'s verifiable records, if given), or built-in. Built-in rejected answers are rule-made near misses
    (``builtin.rejected: rule``) or the model's own wrong replies (``policy``): ``sample(tasks, seed)``
    gives ``builtin.samples`` replies per task, and a held-out task the model always answers right
    keeps a rule-made wrong answer, so every held-out task has a pair."""
    from lmzoo.data.builtin_preference import builtin_preference_data, policy_pairs, wrong_answer
    from lmzoo.data.preference import PreferencePair, read_pairs
    from lmzoo.data.sft import split_conversations

    if data.get("files"):
        from lmzoo.stages.rl import held_out_tasks

        pairs = [p for f in data["files"] for p in read_pairs(f, fmt=data.get("format"))]
        train, val = split_conversations(pairs, float(data.get("val_fraction", 0.05)), seed)
        tasks = held_out_tasks(data["held_out"]) if data.get("held_out") else None  # greedy accuracy as it trains
        return train, val, tasks, ""
    opts = {**BUILTIN_DEFAULTS, "seed": seed, **(data.get("builtin") or {})}
    built = builtin_preference_data(n=opts["n"], seed=opts["seed"], lang=opts["lang"], level=opts["level"],
                                    n_eval=opts["n_eval"], kinds=opts["kinds"])
    r = random.Random(opts["seed"] + 1)
    held = [PreferencePair([{"role": "user", "content": t.prompt}], t.answer, wrong_answer(t, r))
            for t in built.eval_tasks]
    if opts["rejected"] == "rule":
        return built.train, held, built.eval_tasks, "rule-made wrong answers"
    if sample is None:
        raise ConfigError("data.builtin.rejected: policy needs the model to sample from")
    train = policy_pairs(built.train_tasks, sample(built.train_tasks, opts["seed"]))
    if not train.pairs:
        raise LmzooError(f"data.builtin.rejected: policy: {train.summary()}: nothing to learn from (the model "
                         "answers every training prompt right); use rejected: rule or harder tasks (level: full)")
    own = policy_pairs(built.eval_tasks, sample(built.eval_tasks, opts["seed"] + 1))
    mine = {p.prompt[0]["content"]: p for p in own.pairs}
    held = [mine.get(p.prompt[0]["content"], p) for p in held]
    return train.pairs, held, built.eval_tasks, (f"the model's own wrong replies: train {train.summary()}; held out "
                                                 f"{own.counts['pairs']} of {len(held)} from its replies")


def policy_sampler(model, tok, template: str, cfg: dict, stops: list[int], env):
    """``sample(tasks, seed)``: ``data.builtin.samples`` replies of ``model`` to each task at
    ``data.builtin.temperature``, through the one inference engine, with a progress line."""
    from lmzoo.data.instructions import task_messages
    from lmzoo.eval import sampled_replies

    opts = {**BUILTIN_DEFAULTS, **((cfg.get("data") or {}).get("builtin") or {})}
    max_new = int((cfg.get("eval") or {}).get("max_new_tokens", 24))
    context = getattr(model.config, "max_positions", None)

    def progress(done: int, total: int) -> None:
        if env.is_main and sys.stderr.isatty():
            print(f"\rsampling the model's replies: {done}/{total}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    def sample(tasks, seed: int) -> list[list[str]]:
        return sampled_replies(model, tok, [task_messages(t) for t in tasks], template, n=int(opts["samples"]),
                               temperature=float(opts["temperature"]), seed=seed, max_new_tokens=max_new,
                               stop_ids=stops, batch_size=64, max_len=context, progress=progress)

    return sample


def reference_model(ref_dir, tok, model):
    """The ``--ref`` model, refused when its vocabulary is not the policy's (the log-probs would not compare)."""
    reference, ref_tok, _ = load_model(ref_dir)
    if ref_tok.vocab_size != tok.vocab_size or reference.config.vocab_size != model.config.vocab_size:
        raise ConfigError(f"--ref {ref_dir}: its vocabulary ({ref_tok.vocab_size} tokens, vocab_size "
                          f"{reference.config.vocab_size}) differs from the policy's ({tok.vocab_size}, "
                          f"{model.config.vocab_size}); the log-probs would not compare")
    return reference


def _prepare(cfg: dict, model_dir, out_dir, resume, resume_or_start, source):
    cfg = copy.deepcopy(cfg)
    check_config(cfg, source)
    tcfg = TrainConfig.from_dict(cfg.get("train"), f"{source}: train")
    out_dir = Path(out_dir)
    check_resume(out_dir, resume, resume_or_start)
    env = setup(tcfg.parallel, tcfg.device)
    model, tok, fam = load_model(model_dir)  # a causal or a prefix decoder; anything else is refused there
    data = cfg.get("data") or {}
    template = pick_template(tok, data.get("template"), fam)
    if fam.shape == "prefix decoder":  # GLM reads its prefix and 2D positions off each row's [gMASK] <sop>
        from lmzoo.data.preference import encode_response

        tail = list(model.prompt_tail())  # the tokens every prompt must end with, right before the response
        ids, _, start = encode_response(tok, [{"role": "user", "content": "1 + 1?"}], "2", template)
        if ids[max(0, start - len(tail)):start] != tail:
            raise ConfigError(f"--model {model_dir}: {fam.name} reads its prefix off {tok.decode(tail)!r} (ids "
                              f"{tail}) at the end of each prompt, and chat template {_name(template)!r} does not "
                              f"put them there; use --template {fam.chat_template}")
        max_len = data.get("max_len", 256)
        kept = data.get("max_prompt_len") or max_len // 2  # what truncation keeps of a prompt, from its end
        if kept < len(tail):
            given = "" if data.get("max_prompt_len") else f" (max_len {max_len} // 2)"
            raise ConfigError(f"{source}: data.max_prompt_len is {kept}{given}, but a truncated {fam.name} prompt "
                              f"must keep its last {len(tail)} tokens {tok.decode(tail)!r}")
    return cfg, tcfg, out_dir, env, model, tok, fam, data, template


def _encode(tok, items, template, data, what: str, encode=None, noun: str = "pairs"):
    """``encode`` (``encode_pairs`` by default, or ``encode_unpaired``) with the data section's limits; an
    error in one item names its split (``train pairs: ...``)."""
    from lmzoo.data.preference import encode_pairs

    try:
        return (encode or encode_pairs)(tok, items, template, data.get("max_len", 256),
                                        data.get("overflow", "truncate"), data.get("max_prompt_len"))
    except ConfigError:
        raise
    except LmzooError as e:  # it names the item's number: say which split
        raise LmzooError(f"{what} {noun}: {e}") from None


class _Rows:
    """``PaddedPairs`` rows plus per-pair tensors (the reference log-probs) picked by the same rows."""

    def __init__(self, base, **extra: torch.Tensor):
        self.base, self.extra = base, extra

    def __len__(self) -> int:
        return len(self.base)

    def batch(self, rows) -> dict:
        out = self.base.batch(rows)
        idx = torch.as_tensor([int(r) for r in rows])
        return {**out, **{k: v[idx] for k, v in self.extra.items()}}


def _batches(examples, batch: int, env, tcfg, pad_id: int, shuffle: bool = True, **extra):
    from lmzoo.data.preference import PaddedPairs
    from lmzoo.data.sampler import Batches

    rows = _Rows(PaddedPairs(examples, pad_id), **extra)
    return Batches(rows, batch // env.world_size, seed=tcfg.seed, shuffle=shuffle, epochs=None if shuffle else 1,
                   rank=env.rank, world_size=env.world_size, drop_last=shuffle)


def _pad_id(tok, stops: list[int], for_reward: bool = False) -> int:
    """The id rows are padded with. The policy's losses only read labelled tokens, so any id will do; a
    reward model reads its score at the last non-pad token, so its pad must differ from the end-of-turn
    tokens (the tokenizer's pad, else its unk, said once)."""
    pad = tok.pad_id
    if not for_reward:
        return pad if pad is not None else (stops[0] if stops else 0)
    if pad is not None and pad not in stops:
        return pad
    unk = tok.unk_id
    if unk is not None and unk not in stops:
        print(f"lmzoo reward: {tok.name} has no pad token apart from its end-of-turn ones; padding with its unk "
              f"token ({unk}), which the score head skips back over", file=sys.stderr)
        return unk
    raise ConfigError(f"{tok.name}: a reward model needs a pad token distinct from the end-of-turn tokens {stops} "
                      "(the reward is read at the last non-pad token); set one with tok.set_special('pad', ...) "
                      "and save the tokenizer with the model")


@torch.no_grad()
def _over_pairs(model, examples, pad: int, per_row, batch: int = 32):
    """(chosen, rejected) float32 (N,) of ``per_row(model, rows) -> (2B,)`` over every encoded pair, in eval
    mode, in batches of ``batch`` pairs (chosen rows then rejected rows, ``concatenated``)."""
    from lmzoo.data.preference import PaddedPairs, concatenated

    was = model.training
    model.eval()
    rows, cs, rs = PaddedPairs(examples, pad), [], []
    for start in range(0, len(rows), batch):
        both = _to(concatenated(rows.batch(range(start, min(start + batch, len(rows))))), model)
        c, r = per_row(model, both).float().cpu().chunk(2)
        cs.append(c)
        rs.append(r)
    model.train(was)
    return torch.cat(cs), torch.cat(rs)


def _to(batch: dict, model) -> dict:
    """The batch's tensors on the model's device (the evaluation passes; the loop moves training batches)."""
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _extra(ref, split: str) -> dict:
    return {} if ref is None else {"ref_chosen": ref[split][0], "ref_rejected": ref[split][1]}


def _made(note: str) -> str:
    return f"; rejected answers: {note}" if note else ""


def _name(template: str) -> str:
    from lmzoo.tokenizers.chat import builtin_name

    return builtin_name(template) or "the model's own"


# -- plots -------------------------------------------------------------------------------------------


def _records(path: Path) -> list[dict]:
    from lmzoo.train.metrics import read_metrics

    return read_metrics(path)
