"""Supervised finetuning, the thin way: conversations, a chat template, a loaded decoder (optionally
LoRA or QLoRA on top) and the SFT loss, wired into the shared training loop (``lmzoo.train``).

A run config has these sections (``configs/sft/tiny.yaml`` is a complete example; docs/sft.md):

  data:   files: [...] (empty: lmzoo's built-in bilingual instruction data), format (auto: alpaca |
          sharegpt | openai | prompt_completion), template (a built-in name or Jinja; default: the
          model's own, else the family's), seq_len, batch_size, packing (true: padding-free rows of
          several conversations, each attending only to itself), overflow (truncate | drop),
          train_on_prompt, val_fraction, builtin: {n, n_eval, lang}
  lora:   r, alpha, dropout, targets, rslora (used with --lora / --qlora, or enabled: true | qlora: true)
  loss:   chunk (tokens per chunk of the fused head + cross-entropy; 0: the plain loss)
  eval:   accuracy (built-in data: exact-match accuracy of greedy answers on held-out tasks), n,
          max_new_tokens
  train:  every TrainConfig field (lmzoo/train/config.py)

The run folder: checkpoints/, metrics.jsonl (train loss, held-out loss on the response tokens,
accuracy), loss.png, sft.png, run.json, final/ (a full model directory in the Hugging Face layout
with its tokenizer and the chat template it was trained with; with LoRA the merged model) and, with
LoRA, adapter/ (PEFT's layout). Later stages (reward, dpo, ppo, grpo) follow the same contract.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import lmzoo
from lmzoo.errors import ConfigError
from lmzoo.models.config_base import check_integer
from lmzoo.train import TrainConfig, Trainer, TrainResult
from lmzoo.interop.checkpoint import read_hf_config
from lmzoo.models.registry import family_for_hf
from lmzoo.stages.pretrain import check_resume, check_sections, load_with_tokenizer
from lmzoo.train.distributed import setup

SECTIONS = {
    "data": {"files", "format", "template", "seq_len", "batch_size", "packing", "overflow", "train_on_prompt",
             "val_fraction", "builtin", "split"},
    "lora": {"enabled", "qlora", "r", "alpha", "dropout", "targets", "rslora"},
    "loss": {"chunk"},
    "eval": {"accuracy", "n", "max_new_tokens", "batch_size"},
    "train": None,  # TrainConfig checks its own keys
}
INTEGERS = {"data": ("seq_len", "batch_size"), "lora": ("r",), "eval": ("n", "max_new_tokens", "batch_size")}
BUILTIN_KEYS = {"n", "n_eval", "lang", "seed", "kinds", "level", "translation_fraction"}


@dataclass
class SFTResult:
    train: TrainResult
    final_dir: Path | None
    adapter_dir: Path | None
    accuracy_before: float | None
    accuracy_after: float | None
    data_summary: str


def check_config(cfg: dict, source: str = "config") -> None:
    check_sections(cfg, SECTIONS, source, "an SFT", INTEGERS)
    builtin = (cfg.get("data") or {}).get("builtin") or {}
    if not isinstance(builtin, dict) or set(builtin) - BUILTIN_KEYS:
        raise ConfigError(f"{source}: data.builtin takes {sorted(BUILTIN_KEYS)}")
    chunk = (cfg.get("loss") or {}).get("chunk")
    if chunk is not None:
        check_integer("loss.chunk", chunk)
        if chunk < 0:
            raise ConfigError(f"{source}: loss.chunk must be 0 (off) or a positive number of tokens, got {chunk}")


# -- the pieces -------------------------------------------------------------------------------------


def load_model(model_dir: str | Path):
    """(model, tokenizer, family) of a decoder directory; SFT trains in float32 (autocast gives bf16)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model {model_dir}: no config.json there (a Hugging Face model directory, or a run's "
                          "final/)")
    fam = family_for_hf(read_hf_config(model_dir), str(model_dir / "config.json"))
    if fam.shape not in ("causal decoder", "prefix decoder"):  # before any weight is read
        raise ConfigError(f"--model {model_dir} is a {fam.name} {fam.shape}; lmzoo sft trains causal decoders "
                          "(gpt2, llama, bloom, chatglm2, deepseek_v2) and the prefix decoder (chatglm)")
    model, tok = load_with_tokenizer(model_dir, "--model", "SFT renders conversations with it")
    return model, tok, fam


def pick_template(tok, given: str | None, fam) -> str:
    """``chat.choose_template``; when nothing was asked for and the usual choice needs special tokens
    this tokenizer lacks (a base model's tokenizer), the first built-in it can render, said once."""
    from lmzoo.tokenizers.chat import TEMPLATE_INFO, choose_template, missing_tokens

    try:
        return choose_template(tok, given, default=fam.chat_template or None)
    except ConfigError:
        if given:
            raise
        fits = [n for n in ("llama2", *TEMPLATE_INFO) if not missing_tokens(tok, n)]
        if not fits:
            raise
        print(f"lmzoo sft: the tokenizer has no chat template and lacks the special tokens of "
              f"'{fam.chat_template or 'chatml'}'; using the built-in '{fits[0]}', which needs none (pass "
              f"--template to choose)", file=sys.stderr)
        return fits[0]


def conversations(data: dict, seed: int):
    """(train conversations, held-out conversations, held-out tasks or None)."""
    from lmzoo.data.conversations import read_conversations
    from lmzoo.data.instructions import builtin_sft_data
    from lmzoo.data.sft import split_conversations

    val_fraction = float(data.get("val_fraction", 0.05))
    if data.get("files"):
        convs = []
        for f in data["files"]:
            convs += read_conversations(f, fmt=data.get("format"), split=data.get("split", "train"))
        if not convs:
            raise ConfigError(f"data: {data['files']} hold no conversation")
        train, val = split_conversations(convs, val_fraction, seed)
        return train, val, None
    opts = {"n": 2000, "n_eval": 100, "lang": "mixed", "seed": seed, "kinds": "all", "level": "full",
            "translation_fraction": 0.25, **(data.get("builtin") or {})}
    built = builtin_sft_data(n=opts["n"], seed=opts["seed"], lang=opts["lang"], n_eval=opts["n_eval"],
                             kinds=opts["kinds"], level=opts["level"],
                             translation_fraction=float(opts["translation_fraction"]))
    train, val = split_conversations(built.train, val_fraction, seed)
    return train, val, built.eval_tasks


def attach_lora(model, section: dict, qlora: bool) -> str:
    from lmzoo.peft import apply_lora, prepare_qlora, trainable_parameters

    opts = dict(r=section.get("r", 8), alpha=section.get("alpha", 16), dropout=section.get("dropout", 0.05),
                targets=section.get("targets"), rslora=bool(section.get("rslora", False)))
    (prepare_qlora if qlora else apply_lora)(model, **opts)
    rep = trainable_parameters(model)
    return (f"{'QLoRA (NF4 base)' if qlora else 'LoRA'} r={opts['r']} alpha={opts['alpha']}: "
            f"{rep.trainable:,} of {rep.total:,} parameters train")


def accuracy_hook(tok, tasks, template: str, eval_cfg: dict, stops: list[int], context: int | None):
    from lmzoo.eval import task_accuracy

    n = eval_cfg.get("n", 100)
    chosen = tasks[:n]

    def hook(model) -> dict:
        acc, _ = task_accuracy(model, tok, chosen, template, max_new_tokens=eval_cfg.get("max_new_tokens", 24),
                               stop_ids=stops, batch_size=eval_cfg.get("batch_size", 25), max_len=context)
        return {"accuracy": acc}

    return hook


# -- the run ----------------------------------------------------------------------------------------


def run(cfg: dict, model_dir: str | Path, out_dir: str | Path, *, lora: bool = False, qlora: bool = False,
        resume: bool = False, resume_or_start: bool = False, source: str = "config") -> SFTResult:
    """Finetune the decoder in ``model_dir`` as ``cfg`` says, into ``out_dir``."""
    from lmzoo.data.sampler import Batches
    from lmzoo.data.sft import sft_batches
    from lmzoo.objectives import make_step_fn
    from lmzoo.tokenizers.chat import TEMPLATE_INFO, builtin_name, fold_system, stop_ids

    cfg = copy.deepcopy(cfg)
    check_config(cfg, source)
    data, lsec, esec = cfg.get("data") or {}, cfg.get("lora") or {}, cfg.get("eval") or {}
    tcfg = TrainConfig.from_dict(cfg.get("train"), f"{source}: train")
    qlora = qlora or bool(lsec.get("qlora"))
    lora = lora or qlora or bool(lsec.get("enabled"))
    out_dir = Path(out_dir)
    check_resume(out_dir, resume, resume_or_start)
    env = setup(tcfg.parallel, tcfg.device)
    model, tok, fam = load_model(model_dir)
    template = pick_template(tok, data.get("template"), fam)
    context = getattr(model, "max_positions", None) or getattr(model.config, "max_positions", None)
    seq_len = data.get("seq_len", 256)
    if context and seq_len > context:
        raise ConfigError(f"data.seq_len {seq_len} is longer than the model's context of {context} tokens")
    train_convs, val_convs, eval_tasks = conversations(data, tcfg.seed)
    info = TEMPLATE_INFO.get(builtin_name(template) or "")
    if info is not None and not info.system:  # e.g. ChatGLM's formats: the system prompt joins the first question
        train_convs, val_convs = [fold_system(c) for c in train_convs], [fold_system(c) for c in val_convs]
    prefix = fam.shape == "prefix decoder"
    if prefix and data.get("packing", True):  # its prefix is read off each row's [gMASK] <sop>: one per row
        if env.is_main and data.get("packing") is not None:
            print("lmzoo sft: a prefix decoder takes one conversation per row; packing is off", file=sys.stderr)
        data["packing"] = False
    batch = data.get("batch_size", 16)
    if batch % env.world_size:
        raise ConfigError(f"data: batch_size {batch} (the global batch) is not divisible by {env.world_size} ranks")
    common = dict(template=template, packing=bool(data.get("packing", True)),
                  overflow=data.get("overflow", "truncate"), train_on_prompt=bool(data.get("train_on_prompt", False)),
                  rank=env.rank, world_size=env.world_size)
    batches, examples = sft_batches(tok, train_convs, seq_len, batch // env.world_size, seed=tcfg.seed, **common)
    val, val_examples = sft_batches(tok, val_convs, seq_len, batch // env.world_size, shuffle=False, epochs=1,
                                    drop_last=False, **common)

    def eval_batches():  # one pass over the held-out rows, encoded once above
        return Batches(val.rows, val.batch_size, shuffle=False, epochs=1, rank=env.rank, world_size=env.world_size,
                       drop_last=False)

    torch.manual_seed(tcfg.seed)  # the adapters' initial values
    note = attach_lora(model, lsec, qlora) if lora else f"full finetuning: {model.num_parameters():,} parameters"
    if env.is_main:
        print(f"lmzoo sft: {fam.name} from {model_dir}; {note}; template "
              f"{_template_name(template)}; train data: {examples.summary()}; held out: {val_examples.summary()}",
              file=sys.stderr)
    chunk = (cfg.get("loss") or {}).get("chunk") or 0
    step_fn = make_step_fn("sft", loss_chunk=chunk, config=model.config)
    stops = stop_ids(tok, template)
    hooks = []
    if eval_tasks and esec.get("accuracy", True):
        hooks.append(accuracy_hook(tok, eval_tasks, template, esec, stops, context))
    tcfg.extra = {**tcfg.extra, "stage": "sft", "family": fam.name, "model": str(model_dir),
                  "template": _template_name(template), "lora": lora, "qlora": qlora, "data": examples.counts}
    trainer = Trainer(model, batches, step_fn, tcfg, out_dir, eval_batches=eval_batches, env=env, eval_hooks=hooks)
    result = trainer.fit(resume=resume or resume_or_start, start_if_missing=resume_or_start)
    before, after = result.initial_eval.get("accuracy"), (result.eval or {}).get("accuracy")
    final, adapter = save_outputs(trainer, model_dir, tok, template, out_dir, lora, env)
    if env.is_main:
        plot_sft(out_dir / "metrics.jsonl", out_dir / "sft.png")
    return SFTResult(result, final, adapter, before, after, examples.summary())


def _template_name(template: str) -> str:
    from lmzoo.tokenizers.chat import builtin_name

    return builtin_name(template) or "the model's own"


def save_outputs(trainer: Trainer, model_dir, tok, template: str, out_dir: Path, lora: bool, env):
    """final/ (full weights, tokenizer with the chat template used) and, with LoRA, adapter/."""
    from lmzoo.peft import adapters, save_adapter, unload_lora
    from lmzoo.quant.linear import QuantLinear
    from lmzoo.tokenizers.chat import resolve_template

    model = trainer.trained_model()  # a collective under FSDP: every rank calls it
    if not env.is_main:
        return None, None
    tok.chat_template = resolve_template(template)  # chat and generate find it in final/
    adapter_dir = None
    if lora:
        adapter_dir = save_adapter(model, out_dir / "adapter")
        if any(isinstance(m, QuantLinear) for m in model.modules()):  # QLoRA: merge into the float base
            from lmzoo.peft import load_adapter

            base = lmzoo.load(model_dir, dtype="float32")
            load_adapter(base, adapter_dir)
            model = base
        unload_lora(model, merge=True)  # W' = W + (α/r)·B·A, then the adapters are gone: a plain checkpoint
        assert not adapters(model)
    final = lmzoo.save(model, out_dir / "final", tokenizer=tok)
    return final, adapter_dir


def plot_sft(metrics_path: Path, png: Path) -> None:
    """Train and held-out loss, and accuracy when measured, against the step."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").split("\n") if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and "loss" in r]
    held = [(r["step"], r["loss"]) for r in rows if r.get("split") == "eval" and "loss" in r]
    acc = [(r["step"], r["accuracy"]) for r in rows if r.get("split") == "eval" and "accuracy" in r
           and not math.isnan(r["accuracy"])]
    fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(10 if acc else 5.5, 3.6), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train (response tokens)")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out (response tokens)")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.set_title("SFT loss")
    if acc:
        ax = axes[0][1]
        ax.plot(*zip(*acc), "o-", color="tab:green")
        ax.set_ylim(0, 1), ax.set_xlabel("step"), ax.set_ylabel("exact match")
        ax.set_title("greedy answers, held-out built-in tasks")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
