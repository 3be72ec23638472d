"""The speedrun's stages, each a thin wiring of an lmzoo stage or library call to the run folder.

  pretrain  -> RUN/tokenizer/, RUN/pretrain/  the built-in corpus, an sp-bpe tokenizer, a small LLaMA
                                              pretrained with lmzoo.train (final/: model + tokenizer)
  sft       -> RUN/sft/        lmzoo.stages.sft on the built-in instruction data, with a chat template
  dpo       -> RUN/dpo/        lmzoo.stages.dpo with the SFT term, on the SFT model's greedy mistakes on
               RUN/data/       fresh tasks (dpo_pairs.jsonl), its accuracy hook on held_out.jsonl
  quantize  -> RUN/quantized/  RTN 8-bit (symmetric, blocks of 32) of the last trained model, and
               RUN/model-q8_0.gguf, the same codes in llama.cpp's Q8_0

Every training stage checkpoints into its folder, so a run killed midway resumes there at its last
saved step (``lmzoo speedrun --resume``). ``evaluate`` scores a stage's model on the run's held-out
tasks (never among SFT's conversations or DPO's tasks) and on fresh built-in text.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

import lmzoo
from lmzoo.errors import ConfigError, LmzooError

FRESH_SEED = 7_919  # DPO's tasks are drawn with seed + FRESH_SEED: a draw SFT's data never makes

SAMPLE_PROMPTS = {"en": ["What is 12 + 7?", "Write 58 in Chinese numerals.", "Sort ascending: 7 2 9",
                         "Translate into Chinese: Today Beijing is sunny."],
                  "zh": ["计算 15 - 6。", "把 九十三 写成阿拉伯数字。", "从小到大排序：8 1 5", "把下面的句子翻译成英文：今天北京晴天。"]}
PROMPTS = [q for qs in SAMPLE_PROMPTS.values() for q in qs]  # the order every model answers them in
SPEED_PROMPT = "The number 305 is written"


def say(msg: str) -> None:
    print(msg, flush=True)


# -- pretraining ------------------------------------------------------------------------------------


def build_model(s: dict, tokenizer, seed: int):
    from lmzoo.models.llama.config import LlamaConfig
    from lmzoo.train.init import init_weights

    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, d_model=s["d_model"], n_layers=s["n_layers"],
                      n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"], d_ff=s["d_ff"], max_positions=s["context"],
                      bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    torch.manual_seed(seed)
    return init_weights(lmzoo.build(cfg), 0.02), cfg  # N(0, 0.02²) matrices, as GPT-2 and LLaMA train from


def step_seconds(model, rows, step_fn, batch_size: int) -> float:
    """Seconds of one forward + backward on a training batch (the second of two; weights untouched)."""
    batch = rows.batch(range(min(batch_size, len(rows))))
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        loss, _ = step_fn(model, batch)
        loss.backward()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return times[-1] * 1.1  # + the optimizer step and the loop's bookkeeping


def pick_threads(model, rows, step_fn, batch_size: int, fixed: int | None) -> tuple[int, float]:
    """(threads, seconds per pretraining step): torch's thread count or 1, whichever trains faster here
    (on a busy machine a second thread mostly waits for a core); ``fixed`` (--threads) is only timed."""
    timed = {}
    for k in dict.fromkeys((fixed,) if fixed else (torch.get_num_threads(), 1)):
        torch.set_num_threads(k)
        timed[k] = step_seconds(model, rows, step_fn, batch_size)
    best = min(timed, key=timed.get)
    torch.set_num_threads(best)
    return best, timed[best]


def corpus_and_tokenizer(s: dict, out: Path, seed: int):
    """(documents, corpus description, tokenizer): trained once, then read back from RUN/tokenizer."""
    from lmzoo.data import builtin_corpus
    from lmzoo.data.builtin import describe_corpus

    docs = builtin_corpus(scale=s["scale"], seed=seed)
    if (out / "tokenizer").is_dir():
        return docs, describe_corpus(docs), lmzoo.load_tokenizer(out / "tokenizer")
    tok = lmzoo.train_tokenizer("sp-bpe", texts=docs, vocab_size=s["vocab_size"])
    tok.save(out / "tokenizer")
    return docs, describe_corpus(docs), tok


def pretrain(s: dict, out: Path, state: dict, args, plan_steps) -> dict:
    """Tokenizer, token file, unigram baseline, then lmzoo.train; ``plan_steps(seconds_per_step, threads)``
    fixes every stage's step count once, from this machine's measured pretraining step."""
    from lmzoo.data import pretraining_batches
    from lmzoo.data.baselines import perplexity, unigram_cross_entropy
    from lmzoo.objectives import make_step_fn
    from lmzoo.train import TrainConfig, Trainer

    p, seed = s["pretrain"], args.seed
    t = time.perf_counter()
    docs, corpus, tok = corpus_and_tokenizer(p, out, seed)
    t_tok = time.perf_counter() - t
    say(f"  corpus: {corpus['documents']:,} documents, {corpus['characters']:,} characters "
        f"({corpus['cjk_share']:.0%} Chinese); tokenizer: sp-bpe (byte fallback), {tok.vocab_size:,} tokens")
    train, eval_batches, tf = pretraining_batches(tok, p["seq_len"], p["batch_size"], texts=docs, seed=seed,
                                                  cache_dir=args.cache_dir, progress=not args.no_progress)
    val_rows = eval_batches().rows
    bytes_per_token = sum(len(d.encode("utf-8")) for d in docs) / tf.n_tokens
    val_tokens = torch.cat([val_rows.batch(range(i, min(i + 64, len(val_rows))))["input_ids"][:, 1:].reshape(-1)
                            for i in range(0, len(val_rows), 64)]).numpy()
    uni = unigram_cross_entropy(tf.tokens[train.rows.start:train.rows.end], val_tokens, tok.vocab_size)
    say(f"  {tf.n_tokens:,} tokens ({bytes_per_token:.2f} bytes/token), {len(train.rows):,} training rows of "
        f"{p['seq_len']}; unigram baseline: validation perplexity {perplexity(uni):.1f}")
    model, cfg = build_model(p, tok, seed)
    step_fn = make_step_fn("causal_lm", config=cfg)
    if "plan" not in state:
        threads, sec = pick_threads(model, train.rows, step_fn, p["batch_size"], args.threads)
        plan_steps(sec, threads)
    torch.set_num_threads(state["plan"]["threads"])
    steps = state["plan"]["steps"]["pretrain"]
    tcfg = TrainConfig.from_dict(train_section(p, steps, args, weight_decay=0.1, plot=True), "speedrun pretrain")
    say(f"  a {model.num_parameters() / 1e6:.2f}M-parameter LLaMA (d_model {cfg.d_model}, {cfg.n_layers} layers, "
        f"{cfg.n_heads} query / {cfg.n_kv_heads} KV heads), {steps} steps of {p['batch_size']} x {p['seq_len']} "
        f"tokens, {torch.get_num_threads()} thread(s)")
    result = Trainer(model, train, step_fn, tcfg, out / "pretrain", eval_batches=eval_batches,
                     bytes_per_token=bytes_per_token).fit(resume=True, start_if_missing=True)
    model.eval()
    lmzoo.save(model, out / "pretrain" / "final", tokenizer=tok)
    val = result.eval
    say(f"  validation perplexity {val['ppl']:.1f} vs unigram {perplexity(uni):.1f}")
    return {"tokenizer_seconds": t_tok, "corpus": corpus, "vocab": tok.vocab_size, "n_tokens": tf.n_tokens,
            "bytes_per_token": bytes_per_token, "params": model.num_parameters(), "steps": steps,
            "unigram_ppl": perplexity(uni), "unigram_nats": uni, "val_ppl": val["ppl"], "val_loss": val["loss"],
            "model": {k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")}}


# -- finetuning -------------------------------------------------------------------------------------


def builtin_data(s: dict, seed: int) -> dict:
    """The built-in instruction data SFT trains on (``held_out_tasks`` are unseen in it)."""
    t = s["tasks"]
    return {"n": t["n"], "n_eval": t["n_hook"], "level": t["level"], "kinds": t["kinds"], "seed": seed,
            "translation_fraction": t["translation_fraction"]}


def train_section(sec: dict, steps: int, args, **extra) -> dict:
    """Every stage's TrainConfig fields: cosine from the stage's lr to lr/10, ``n_evals`` evaluations (the
    last is the final one), four checkpoints for --resume; ``extra`` overrides (weight decay, plot)."""
    return {"steps": steps, "lr": sec["lr"], "min_lr": sec["lr"] / 10, "warmup_steps": min(sec["warmup"], steps // 4),
            "schedule": "cosine", "weight_decay": 0.0, "clip_grad": 1.0, "seed": args.seed,
            "precision": args.precision, "log_every": max(1, min(10, steps // 20)),
            "eval_every": max(1, math.ceil(steps / sec["n_evals"])), "save_every": max(1, steps // 4),
            "keep_last": 1, "progress": not args.no_progress, "device": "cpu", **extra}


def sft(s: dict, out: Path, state: dict, args) -> dict:
    from lmzoo.stages.sft import run

    sec, steps = s["sft"], state["plan"]["steps"]["sft"]
    cfg = {"data": {"seq_len": sec["seq_len"], "batch_size": sec["batch_size"], "builtin": builtin_data(s, args.seed)},
           "eval": {"n": s["tasks"]["n_hook"], "max_new_tokens": s["tasks"]["max_new_tokens"]},
           "loss": {"chunk": 0}, "train": train_section(sec, steps, args)}
    say(f"  {steps} steps of {sec['batch_size']} packed rows of {sec['seq_len']} tokens, lr {sec['lr']:g}")
    r = run(cfg, out / "pretrain" / "final", out / "sft", resume_or_start=True, source="speedrun sft")
    return {"steps": steps, "data": r.data_summary, "accuracy_hook": [r.accuracy_before, r.accuracy_after]}


def fresh_tasks(s: dict, seed: int, held: dict[str, list]) -> list:
    """DPO's verifiable tasks: up to ``dpo.n_prompts`` distinct prompts drawn afresh (kinds in turn, a seed
    SFT never used), none of them held out. The small level has few distinct problems (about 1,000
    subtractions), so a prompt drawn twice is kept once: a repeat would be the same pair again, an epoch
    the step count does not see. Problems SFT trained on are allowed (its 8,000 conversations cover most
    subtractions); the ones the SFT model answers right make no mistake pair (``mistake_pairs``)."""
    from lmzoo.data.tasks import make_tasks

    t, n = s["tasks"], s["dpo"]["n_prompts"]
    banned, seen, drawn = {task.prompt for ts in held.values() for task in ts}, set(), []
    for task in make_tasks(t["kinds"], 3 * n, seed=FRESH_SEED + seed, level=t["level"]):
        if task.prompt not in banned and task.prompt not in seen:
            seen.add(task.prompt)
            drawn.append(task)
    return drawn[:n]


def write_records(path: Path, records: list[dict]) -> Path:
    """A JSONL file (``lmzoo dpo --data`` / ``--held-out`` records), written whole or not at all."""
    from lmzoo.train.atomic import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_tasks(path: Path, tasks) -> Path:
    """Verifiable task records ({prompt, kind, answer, lang})."""
    return write_records(path, [{"prompt": t.prompt, "kind": t.kind, "answer": t.answer, "lang": t.lang}
                                for t in tasks])


def mistake_pairs(s: dict, out: Path, seed: int, held: dict[str, list]) -> tuple[Path, dict]:
    """(RUN/data/dpo_pairs.jsonl, counts): the SFT model's greedy reply to each fresh task, and for each
    one it gets wrong the right answer chosen over that reply (the on-policy pairs of Iterative RPO, Pang
    et al. 2024). Greedy, so the rejected answers are the mistakes the report card counts, and a rerun
    (--resume) makes the same pairs. An empty reply (nothing to push down) gets a rule-made near miss.
    ``dpo.replay`` × as many tasks it answers right are kept too, each with a rule-made near miss as the
    rejected answer: without them a model right on nearly every numeral has no pair of that kind, and
    training on the other kinds' mistakes alone unlearns it."""
    import random

    from lmzoo.data.builtin_preference import wrong_answer
    from lmzoo.data.tasks import check
    from lmzoo.eval.model import EvalModel

    tasks = fresh_tasks(s, seed, held)
    replies = EvalModel.from_dir(out / "sft" / "final", batch_size=64).replies([t.prompt for t in tasks],
                                                                                max_new_tokens=s["tasks"]["max_new_tokens"])
    r = random.Random(seed)
    ok = [check(t, x) for t, x in zip(tasks, replies)]
    wrong = [(t, x) for t, x, y in zip(tasks, replies, ok) if not y]
    records = [{"prompt": t.prompt, "chosen": t.answer, "rejected": x if x.strip() else wrong_answer(t, r)}
               for t, x in wrong]
    right = [t for t, y in zip(tasks, ok) if y]
    kept = r.sample(right, min(len(right), round(s["dpo"]["replay"] * len(wrong))))
    counts = {"prompts": len(tasks), "right": 1 - len(wrong) / len(tasks), "pairs": len(records),
              "empty": sum(1 for _, x in wrong if not x.strip()), "replay": len(kept)}
    if len(records) < 2 * s["dpo"]["batch_size"]:
        raise LmzooError(f"speedrun dpo: the SFT model answers {len(tasks) - len(wrong)} of {len(tasks)} fresh tasks "
                         f"right, leaving {len(records)} mistakes to learn from (fewer than two batches of "
                         f"{s['dpo']['batch_size']}); raise dpo.n_prompts")
    records += [{"prompt": t.prompt, "chosen": t.answer, "rejected": wrong_answer(t, r)} for t in kept]
    r.shuffle(records)
    return write_records(out / "data" / "dpo_pairs.jsonl", records), counts


def dpo(s: dict, out: Path, state: dict, args) -> dict:
    from lmzoo.stages.dpo import run_dpo

    sec, steps = s["dpo"], state["plan"]["steps"]["dpo"]
    held = held_out_tasks(s, args.seed)
    by_turn = [ts[k] for k in range(max(map(len, held.values()))) for ts in held.values() if k < len(ts)]
    t0 = time.perf_counter()
    pairs, counts = mistake_pairs(s, out, args.seed, held)
    say(f"  the SFT model's greedy replies to {counts['prompts']} fresh tasks: {counts['right']:.0%} right, "
        f"{counts['pairs']} mistakes"
        + (f" ({counts['empty']} empty replies, each paired with a near miss)" if counts["empty"] else "")
        + (f" + {counts['replay']} right answers over near misses" if counts["replay"] else "")
        + f" -> {pairs.name} ({time.perf_counter() - t0:.0f} s)")
    n_pairs, val_fraction = counts["pairs"] + counts["replay"], 0.02
    # the pairs are few when SFT went well: more passes over them overfit
    cap = max(sec.get("min_steps", 1),
              math.ceil(sec["max_epochs"] * n_pairs * (1 - val_fraction) / sec["batch_size"]))
    if cap < steps:
        say(f"  {steps} planned steps would pass over the pairs {steps * sec['batch_size'] / n_pairs:.1f} times: "
            f"{cap} steps ({sec['max_epochs']:g} passes)")
        steps = state["plan"]["steps"]["dpo"] = cap
    cfg = {"data": {"files": [str(pairs)], "batch_size": sec["batch_size"], "max_len": 128, "val_fraction": val_fraction,
                    "held_out": str(write_tasks(out / "data" / "held_out.jsonl", by_turn))},  # the hook: kinds in turn
           "loss": {"name": "sigmoid", "beta": sec["beta"], "sft_weight": sec["sft_weight"]},
           "eval": {"n": s["tasks"]["n_hook"], "max_new_tokens": s["tasks"]["max_new_tokens"]},
           "train": train_section(sec, steps, args)}
    say(f"  {steps} steps of {sec['batch_size']} pairs, lr {sec['lr']:g}, beta {sec['beta']:g}, SFT term weight "
        f"{sec['sft_weight']:g}")
    r = run_dpo(cfg, out / "sft" / "final", out / "dpo", resume_or_start=True, source="speedrun dpo")
    return {"steps": steps, "pairs": counts, "accuracy_hook": [r.before.get("accuracy"), (r.after or {}).get("accuracy")]}


# -- quantization -----------------------------------------------------------------------------------


def last_trained(out: Path) -> Path:
    for stage in ("dpo", "sft", "pretrain"):
        if (out / stage / "final" / "config.json").is_file():
            return out / stage / "final"
    raise ConfigError(f"{out}: no trained model to quantize (run pretrain first)")


def quantize(s: dict, out: Path, state: dict, args) -> dict:
    """RTN 8-bit, symmetric, one scale per 32 weights: at 8 bits round-to-nearest loses least and needs no
    calibration data, and its codes are Q8_0's, so the GGUF file computes with exactly these weights."""
    from lmzoo.interop.gguf import export_gguf

    src = last_trained(out)
    tok = lmzoo.load_tokenizer(src)
    model = lmzoo.load(src, dtype="float32").eval()
    lmzoo.quantize(model, method="rtn", bits=8, group_size=32)
    lmzoo.save(model, out / "quantized", tokenizer=src)
    kept: dict[str, bool] = {}
    gguf = out / "model-q8_0.gguf"
    export_gguf(model, tok, gguf, type="q8_0", kept=kept)
    say(f"  {src.parent.name}'s model -> quantized/ (RTN int8, blocks of 32) and {gguf.name} "
        f"({sum(kept.values())} of {len(kept)} matrices with their own codes)")
    return {"source": src.parent.name, "method": "rtn", "bits": 8, "group_size": 32,
            "kept_codes": [sum(kept.values()), len(kept)]}


# -- evaluation -------------------------------------------------------------------------------------


def held_out_tasks(s: dict, seed: int) -> dict[str, list]:
    """``tasks.n_eval`` held-out tasks of each kind, none of whose prompts is among SFT's conversations
    (DPO's tasks are drawn without them: ``fresh_tasks``), drawn with seeds training never uses."""
    from lmzoo.data.instructions import builtin_sft_data
    from lmzoo.data.tasks import make_tasks
    from lmzoo.eval.suite import EVAL_SEED

    b, per_kind = builtin_data(s, seed), s["tasks"]["n_eval"]
    built = builtin_sft_data(n=b["n"], seed=seed, n_eval=0, kinds=b["kinds"], level=b["level"],
                             translation_fraction=b["translation_fraction"])
    seen = {m["content"] for c in built.train for m in c if m["role"] == "user"}
    out = {}
    for kind in sorted(b["kinds"]):
        got: list = []
        for k in range(50):  # fresh draws until enough unseen prompts
            for t in make_tasks(kind, 4 * per_kind, seed=EVAL_SEED + 1000 * k + seed, level=b["level"]):
                if t.prompt not in seen and len(got) < per_kind:
                    seen.add(t.prompt)
                    got.append(t)
            if len(got) == per_kind:
                break
        else:
            raise ConfigError(f"speedrun: only {len(got)} {kind} tasks at level {b['level']} are unseen in the "
                              f"{b['n']} training conversations; {per_kind} asked")
        out[kind] = got
    return out


def weight_bytes(path: Path) -> int:
    """Bytes of a model's tensors: its safetensors files, or a GGUF file's tensor data (the file also
    holds the tokenizer's vocabulary and the metadata)."""
    if path.suffix == ".gguf":
        from lmzoo.interop.gguf import _gguf

        return sum(int(t.n_bytes) for t in _gguf().GGUFReader(str(path)).tensors)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def decode_speed(model, tok, n_new: int, repeats: int = 3) -> float:
    """Greedy tokens/s of one sequence from a short prompt, the best of ``repeats`` (after a warm-up)."""
    ids = torch.tensor([tok.encode(SPEED_PROMPT)])
    lmzoo.generate(model, ids, max_new_tokens=4)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        got = lmzoo.generate(model, ids, max_new_tokens=n_new)
        best = min(best, (time.perf_counter() - t) / (got.shape[1] - ids.shape[1]))
    return 1.0 / best


def load_for_eval(path: Path):
    from lmzoo.eval.model import EvalModel

    if path.suffix == ".gguf":
        from lmzoo.interop.gguf import read_gguf

        model, tok = read_gguf(path)  # the file's weights, dequantized: what llama.cpp computes with
        # an sp-bpe vocabulary does not give its merges back: the tokenizer the file was written from
        # (same ids, tests/interop/test_gguf.py), with its chat template
        tok = tok or lmzoo.load_tokenizer(path.parent / "quantized")
        return EvalModel(model.eval(), tok, name=path.name)
    return EvalModel.from_dir(path, name=path.parent.name if path.name == "final" else path.name)


def evaluate(s: dict, path: Path, tasks: dict[str, list], texts: list[str], *, speed: bool) -> dict:
    """Exact match per held-out task kind (greedy), perplexity of fresh built-in text, the answers to
    the sample prompts, the weights' bytes, and (``speed``) greedy decode tokens/s."""
    from lmzoo.eval.perplexity import text_perplexity
    from lmzoo.eval.suite import score_tasks

    t0 = time.perf_counter()
    lm = load_for_eval(path)
    max_new = s["tasks"]["max_new_tokens"]
    scores = {k: score_tasks(lm, k, ts, max_new_tokens=max_new) for k, ts in tasks.items()}
    exact = {k: r.metrics["exact_match"] for k, r in scores.items()}
    ppl = text_perplexity(lm.model, lm.tok, texts, batch_size=lm.batch_size)
    replies = lm.replies(PROMPTS, max_new_tokens=s["sample_tokens"])
    row = {"exact_match": exact, "mean_exact_match": sum(exact.values()) / len(exact),
           "n_tasks": {k: len(v) for k, v in tasks.items()}, "examples": {k: r.examples[:2] for k, r in scores.items()},
           "right": {k: "".join("1" if x else "0" for x in r.right) for k, r in scores.items()},  # paired tests
           "perplexity": ppl["perplexity"], "bits_per_byte": ppl["bits_per_byte"], "bytes": weight_bytes(path),
           "file_bytes": path.stat().st_size if path.is_file() else None,
           "samples": dict(zip(PROMPTS, replies)),
           "template": "plain (Question/Answer)" if lm.plain else "chat"}
    if speed:
        row["decode_tok_s"] = decode_speed(lm.model, lm.tok, s["speed_tokens"])
    row["seconds"] = time.perf_counter() - t0
    return row
