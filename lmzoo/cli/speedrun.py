"""The main job: the whole lifecycle of a small LLaMA on built-in data, on the CPU, in one command.

Nothing is downloaded; everything lands in the run folder (--out), one sub-folder per stage:
  1. pretrain: the built-in corpus (the Python docs' prose that the standard library ships, and lmzoo's
     bilingual English/Chinese text), an sp-bpe tokenizer trained on it, a small LLaMA pretrained with
     lmzoo.train -> tokenizer/, pretrain/;
  2. sft: supervised finetuning on lmzoo's built-in instruction data (arithmetic, Chinese numerals,
     sorting, translations) with a chat template -> sft/;
  3. dpo: DPO with the SFT term (RPO) on the SFT model's own mistakes: fresh built-in tasks it answers
     wrong (greedy), the right answer chosen over its reply, with twice as many it answers right
     replayed against rule-made near misses -> dpo/;
  4. quantize: RTN 8-bit of the final model -> quantized/, and its GGUF (Q8_0) -> model-q8_0.gguf;
then every stage's model is evaluated alike (exact match per held-out task, perplexity of fresh
built-in text, size, decode speed), answers the same English and Chinese prompts, and report.md +
speedrun.png show the report card (stage x metric), the curves and the time each stage took.
The stages' step counts fill --minutes on *this* machine (from a measured pretraining step) and are
fixed for the run; a killed run continues with --resume at the stage and step where it stopped.
Examples:
  lmzoo speedrun                          # about 10 minutes on 2 CPU cores
  lmzoo speedrun --tiny --out /tmp/sr     # well under a minute: the end-to-end check the tests run
  lmzoo speedrun --out runs/sr --resume   # continue an interrupted run
  lmzoo speedrun --out runs/sr --stages pretrain sft   # a subset (later: --resume --stages dpo quantize)
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

from lmzoo.cli.speedrun_stages import say
from lmzoo.errors import LmzooError

HELP = "the main job: pretrain, SFT, DPO, quantize and evaluate a small LLaMA on built-in data; one report"

STAGES = ("pretrain", "sft", "dpo", "quantize")
TRAINED = STAGES[:3]  # the stages that train a model, in order
NEEDS = {"sft": "pretrain", "dpo": "sft"}  # the stage whose final/ a stage starts from
ABOUT = {"pretrain": "tokenizer + pretraining on the built-in corpus",
         "sft": "supervised finetuning on the built-in instruction data",
         "dpo": "DPO + SFT term on the SFT model's own mistakes",
         "quantize": "RTN int8 of the final model + GGUF Q8_0 export"}
# The report card's rows: (label, the stage that makes it, its model, relative to the run folder).
ROWS = (("pretrain", "pretrain", "pretrain/final"), ("sft", "sft", "sft/final"), ("dpo", "dpo", "dpo/final"),
        ("int8", "quantize", "quantized"), ("gguf q8_0", "quantize", "model-q8_0.gguf"))

# The tasks SFT and DPO train on and every stage is scored on. Not mul: at a size a tiny model learns
# (the "small" level: 0-12) it is a table of 169 facts the training data covers, so nothing is held out.
KINDS = ["add", "sub", "to_chinese", "from_chinese", "sort"]
# Numbers only. "default" is what `make demo` runs; "tiny" is the test suite's. cost: seconds of one
# step of the stage over seconds of one pretraining step, measured on the development machine (2 CPU
# cores); share: the part of --minutes the stage fills (the rest: evaluation, quantization, report).
SETTINGS = {
    "default": dict(
        minutes=11.0,
        pretrain=dict(scale=1.0, vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352,
                      context=512, seq_len=128, batch_size=16, lr=3e-3, warmup=30, n_evals=4, share=0.16, cost=1.0,
                      min_steps=40, max_steps=5000),
        tasks=dict(n=8000, n_eval=100, n_hook=200, level="small", kinds=KINDS, translation_fraction=0.1,
                   max_new_tokens=12),
        sft=dict(seq_len=128, batch_size=16, lr=3e-3, warmup=20, n_evals=4, share=0.5, cost=1.0, min_steps=40,
                 max_steps=5000),
        dpo=dict(n_prompts=16000, replay=2.0, max_epochs=3, batch_size=32, lr=3e-4, beta=0.1, sft_weight=1.0, warmup=10,
                 n_evals=4, share=0.28, cost=1.3, min_steps=8, max_steps=3000),  # cost: a step of 32 pairs + a share of the greedy pass
        sample_tokens=32, speed_tokens=64),
    "tiny": dict(
        minutes=None, threads=1,  # tiny ops: a second thread only waits
        pretrain=dict(scale=0.04, vocab_size=400, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=172,
                      context=256, seq_len=64, batch_size=8, lr=5e-3, warmup=5, n_evals=2, steps=60),
        tasks=dict(n=300, n_eval=5, n_hook=12, level="small", kinds=KINDS, translation_fraction=0.1,
                   max_new_tokens=8),
        sft=dict(seq_len=96, batch_size=8, lr=3e-3, warmup=3, n_evals=2, steps=20),
        dpo=dict(n_prompts=200, replay=2.0, max_epochs=3, batch_size=8, lr=1e-3, beta=0.1, sft_weight=1.0, warmup=1, n_evals=2, steps=6),
        sample_tokens=8, speed_tokens=8),
}


def add_arguments(p) -> None:
    p.add_argument("--out", help="run folder (default: runs/speedrun-<date-time>)")
    p.add_argument("--tiny", action="store_true", help="a setting of seconds (tests, a first look)")
    p.add_argument("--minutes", type=float, help="the whole run's time to fill (default 11); the stages' step "
                   "counts scale with it")
    p.add_argument("--stages", nargs="+", choices=STAGES, metavar="STAGE",
                   help=f"run only these ({' '.join(STAGES)}); a stage's input must be in the run folder or "
                   "among them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16 autocast is faster on CPUs with bf16 units (AVX512-BF16, AMX)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's count or 1, whichever trains faster)")
    p.add_argument("--cache-dir", help="token-file cache (default: $LMZOO_CACHE/tokens or ~/.cache/lmzoo/tokens)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out at the stage and step where "
                   "it stopped (or add --stages to it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    s = copy.deepcopy(SETTINGS["tiny" if args.tiny else "default"])
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or s.get("threads") or threads)
    try:
        return _run(args, s)
    finally:
        torch.set_num_threads(threads)


def open_state(args, out: Path, setting: str, stages: list[str]) -> dict:
    """The run's state.json (plan, finished stages, evaluations), checked against what is asked."""
    from lmzoo.train.atomic import read_json

    path = out / "state.json"
    if args.resume:
        if not path.is_file():
            raise LmzooError(f"--resume: {out} holds no speedrun state (state.json) to resume; start without "
                             "--resume")
        state = read_json(path)
        if state.get("setting") != setting or state.get("seed") != args.seed:
            raise LmzooError(f"--resume: {out} is a {state.get('setting')} run with seed {state.get('seed')}; "
                             f"this is {setting} with seed {args.seed}")
    elif out.exists() and any(out.iterdir()):
        raise LmzooError(f"{out} is not empty: choose another --out, or add --resume to continue that run")
    else:
        state = {"setting": setting, "seed": args.seed, "precision": args.precision, "stages": {}, "evals": {}}
    for stage in stages:  # each stage's input: made earlier in this call, or by a finished stage of the run
        need = NEEDS.get(stage)
        if need and need not in stages and not state["stages"].get(need, {}).get("done"):
            raise LmzooError(f"--stages {stage}: it starts from {need}'s model, which {out} does not hold; "
                             f"add {need} to --stages")
    trained = [x for x in TRAINED if x in stages or state["stages"].get(x, {}).get("done")]
    if "quantize" in stages and not trained:
        raise LmzooError(f"--stages quantize: {out} holds no trained model to quantize; add pretrain to --stages")
    return state


def plan_maker(s: dict, state: dict, args, save):
    """The function the pretraining stage calls with its measured step time: fixes every stage's steps."""

    def plan(sec: float, threads: int) -> None:
        minutes = args.minutes or s["minutes"]
        steps = {}
        for stage in TRAINED:
            sec_ = s[stage]
            if "steps" in sec_:
                steps[stage] = sec_["steps"]
            else:
                n = int(minutes * 60 * sec_["share"] / (sec * sec_["cost"]))
                steps[stage] = max(sec_["min_steps"], min(sec_["max_steps"], n))
        how = ("fixed (tiny)" if minutes is None else
               f"fills {minutes:g} min at {sec:.2f} s per pretraining step measured on this machine, "
               f"{threads} thread{'s' if threads > 1 else ''}")
        state["plan"] = {"steps": steps, "threads": threads, "sec_per_step": sec, "minutes": minutes, "how": how}
        save()
        say(f"  plan: {', '.join(f'{k} {v} steps' for k, v in steps.items())} ({how})")

    return plan


def refit(s: dict, state: dict, stage: str) -> None:
    """Before a training stage that has not started: its steps again from the machine's speed as the stage
    before it measured it (its seconds per planned step over its relative cost). Shared machines change
    speed within minutes (pretraining's step took 0.13 s at the start of a run and 0.26 s later in it), so
    one measurement at the start would leave the later stages too long or too short. A stage keeps its
    share of the budget; an earlier overrun is not taken out of it."""
    plan = state.get("plan") or {}
    if plan.get("minutes") is None or "steps" in s[stage]:
        return  # fixed steps (tiny), or a plan made before this was kept
    order = list(TRAINED)
    # a resumed stage's seconds are its last call's only: no measure of the machine
    before = [x for x in order[:order.index(stage)] if state["stages"].get(x, {}).get("done")
              and not state["stages"][x].get("resumed")]
    if not before:
        return
    prev, info = before[-1], state["stages"][before[-1]]
    sec = info["seconds"] / (plan["steps"][prev] * s[prev]["cost"])  # per pretraining-step equivalent
    n = int(plan["minutes"] * 60 * s[stage]["share"] / (sec * s[stage]["cost"]))
    steps = max(s[stage]["min_steps"], min(s[stage]["max_steps"], n))
    if steps != plan["steps"][stage]:
        say(f"  refit: {stage} {plan['steps'][stage]} -> {steps} steps ({prev} ran at {sec:.2f} s per "
            f"pretraining-step equivalent, planned {plan['sec_per_step']:.2f})")
    plan["steps"][stage] = steps
    plan.setdefault("refit", {})[stage] = {"from": prev, "sec_per_step": sec, "steps": steps}


def _run(args, s: dict) -> int:
    from lmzoo.cli import speedrun_stages as st
    from lmzoo.cli.speedrun_report import write_report
    from lmzoo.train.atomic import write_json

    setting = "tiny" if args.tiny else "default"
    if args.minutes is not None and not args.minutes > 0:
        raise LmzooError(f"--minutes must be a positive number of minutes, got {args.minutes:g}")
    out = Path(args.out or f"runs/speedrun-{time.strftime('%Y%m%d-%H%M%S')}")
    stages = [x for x in STAGES if x in (args.stages or STAGES)]
    state = open_state(args, out, setting, stages)
    out.mkdir(parents=True, exist_ok=True)
    save = lambda: write_json(out / "state.json", state)  # noqa: E731
    save()
    if "plan" in state:
        torch.set_num_threads(state["plan"]["threads"])
    funcs = {"pretrain": lambda: st.pretrain(s, out, state, args, plan_maker(s, state, args, save)),
             "sft": lambda: st.sft(s, out, state, args), "dpo": lambda: st.dpo(s, out, state, args),
             "quantize": lambda: st.quantize(s, out, state, args)}
    say(f"lmzoo speedrun ({setting} setting) -> {out}")
    t_run = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        done = state["stages"].get(stage, {})
        if done.get("done"):
            say(f"[{i}/{len(stages)}] {stage}: done in an earlier call ({done['seconds']:.0f} s), kept")
            continue
        say(f"[{i}/{len(stages)}] {stage}: {ABOUT[stage]} -> {out / ('quantized' if stage == 'quantize' else stage)}")
        if stage in ("sft", "dpo") and not done.get("started"):  # a started stage keeps its steps (checkpoints)
            refit(s, state, stage)
        state["stages"][stage] = {"started": True}  # a later --resume continues it from its checkpoints
        save()
        t = time.perf_counter()
        info = funcs[stage]()
        state["stages"][stage] = {**info, "done": True, "seconds": time.perf_counter() - t,
                                  "resumed": bool(done.get("started"))}
        for label, made_by, _ in ROWS:  # a stage that ran again invalidates its evaluation
            if made_by == stage:
                state["evals"].pop(label, None)
        save()
        say(f"  {stage}: {state['stages'][stage]['seconds']:.0f} s")
    evaluate_rows(s, out, state, args, save)
    total = time.perf_counter() - t_run
    state["seconds"] = state.get("seconds", 0.0) + total  # every call's time: a resumed run adds up
    save()
    report = write_report(out, state, s)
    say(f"report: {report}; total {total:.0f} s")
    say(f"  chat:  lmzoo chat --model {st.last_trained(out)}")
    return 0


def evaluate_rows(s: dict, out: Path, state: dict, args, save) -> None:
    from lmzoo.cli import speedrun_stages as st
    from lmzoo.eval.report import builtin_text

    rows = [(label, out / rel) for label, made_by, rel in ROWS if state["stages"].get(made_by, {}).get("done")]
    todo = [(label, path) for label, path in rows if label not in state["evals"]]
    if not todo:
        return
    tasks = st.held_out_tasks(s, args.seed)
    texts = builtin_text(n=8 if args.tiny else 40)
    say(f"evaluating {', '.join(label for label, _ in todo)}: {sum(map(len, tasks.values()))} held-out tasks "
         f"({', '.join(f'{k} {len(v)}' for k, v in tasks.items())}), {len(texts)} fresh built-in documents")
    for label, path in todo:
        row = st.evaluate(s, path, tasks, texts, speed=not path.suffix == ".gguf")
        state["evals"][label] = row
        save()
        speed = f", {row['decode_tok_s']:.0f} tok/s" if "decode_tok_s" in row else ""
        say(f"  {label:10s} exact match {row['mean_exact_match']:.3f} "
             f"({', '.join(f'{k} {v:.2f}' for k, v in row['exact_match'].items())}), perplexity "
             f"{row['perplexity']:.2f}, {row['bytes'] / 1e6:.2f} MB{speed}")
    from lmzoo.cli.speedrun_report import changes

    for label, src, c in changes(state):
        say(f"  {label} against {src}: {c['change'] * 100:+.1f} points ({c['gained']} newly right, {c['lost']} "
            f"newly wrong; sign test p {c['p']:.2g})")
    source = state["stages"].get("quantize", {}).get("source")  # the model that was quantized
    if source in state["evals"] and "gguf q8_0" in state["evals"]:
        drop = state["evals"][source]["mean_exact_match"] - state["evals"]["gguf q8_0"]["mean_exact_match"]
        if drop > 0.02:
            print(f"warning: the quantized model loses {drop:.3f} exact match", file=sys.stderr)
