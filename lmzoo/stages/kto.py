"""KTO as a training stage (``lmzoo dpo --loss kto``): the policy learns from single completions, each
marked desirable or not (Ethayarajh et al. 2024, §4.1), against the frozen reference of ``run_dpo``
(the starting model, or ``--ref DIR``; with LoRA the base), whose log-probs are computed once::

    L = λ_D·(1 − σ(β·(r − z)))  if y is desirable,   λ_U·(1 − σ(β·(z − r)))  if not
    r = log π_θ(y|x)/π_ref(y|x),   z = max(0, mean_j log π_θ(y'_j|x_j)/π_ref(y'_j|x_j))  (no gradient)

Data: ``data.files`` of TRL's unpaired records ``{prompt, completion, label: bool}``, or of preference
pairs (each gives a desirable and an undesirable example, as TRL's ``unpair_preference_dataset``; a
pair's two halves land on one side of the held-out split); with no files, the built-in pairs of
``run_dpo`` unpaired the same way, whose held-out tasks also give the greedy exact-match accuracy.

**The KL term** needs mismatched pairs (x_j, y'_j). TRL fixes them when it builds the data: it rotates
the completions by one within each run of ``per_device_train_batch_size`` rows (x_j gets y_{j−1}, the
first the last's) and, with transformers < 5.2, feeds those runs in order, so a batch's y' are its own
y with other prompts. Here the examples are shuffled once (seeded) and cut into fixed batches of
``data.batch_size`` per rank (``n // batch`` of them, so each has between batch and 2·batch − 1
examples, or all n when n < batch; never one), rotated the same way; a step takes one whole fixed batch (the sampler shuffles
the batches' order every epoch, never their members). So z is estimated, as TRL intends, on exactly
the batch's completions, and, the KL pairs never changing, the reference's log-probs of the KL rows
are computed once with the others. The policy's are computed at every step under no_grad (TRL's),
and under data parallelism the ranks' means are averaged before the clamp (TRL's). Re-drawing the
batches every epoch would cost a reference forward over the KL rows per epoch; it is not done.

Held-out data is cut into fixed batches the same way (TRL builds its eval KL rows with the train batch
size too); ``kl`` is their mean z, the rewards and log-probs are means over all held-out examples.
Logged under TRL's names (``kto_metrics``): ``kl``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (chosen = desirable); ``dpo.png`` plots them.
"""

from __future__ import annotations

import copy
import sys

import torch

from lmzoo.errors import ConfigError, LmzooError
from lmzoo.stages import StageResult
from lmzoo.stages.preference import (_encode, _made, _name, _pad_id, _prepare, policy_sampler,
                                     preference_pairs, reference_model)
from lmzoo.stages.preference import check_config as check_preference_config

WEIGHTS = ("desirable_weight", "undesirable_weight")  # λ_D, λ_U
PAIRWISE_ONLY = {"label_smoothing": 0.0, "gamma": None, "center": None, "sft_weight": 0.0}  # and their "off"


# -- the config ----------------------------------------------------------------------------------


def _split_weights(cfg: dict) -> tuple[dict, dict]:
    """(a copy of ``cfg`` without λ_D, λ_U, {name: value} of those it had)."""
    cfg = copy.deepcopy(cfg)
    loss = cfg.get("loss") if isinstance(cfg, dict) else None
    if not isinstance(loss, dict):
        return cfg, {}
    return cfg, {k: loss.pop(k) for k in WEIGHTS if k in loss}


def check_config(cfg: dict, source: str = "config") -> None:
    """``preference.check_config``, plus ``loss.desirable_weight`` / ``loss.undesirable_weight``: numbers ≥ 0,
    for ``loss.name: kto`` only."""
    rest, weights = _split_weights(cfg)
    check_preference_config(rest, source)
    name = (rest.get("loss") or {}).get("name", "sigmoid")
    if weights and name != "kto":
        raise ConfigError(f"{source}: loss.{next(iter(weights))} is KTO's (λ_D, λ_U); loss.name is {name!r}")
    for key, v in weights.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{source}: loss.{key} must be a number ≥ 0, got {v!r}")


def balance_warning(desirable: list[bool], desirable_weight: float, undesirable_weight: float) -> str | None:
    """The KTO paper's advice (eq. 8), as TRL words it: λ_D·n_D / (λ_U·n_U) in [1, 4/3]; None when it holds.
    TRL checks only when n_D ≠ n_U; this checks the ratio always (equal counts need λ_D ≥ λ_U too)."""
    n_d = sum(desirable)
    n_u = len(desirable) - n_d
    if not n_d or not n_u:
        return (f"all {len(desirable)} training examples are {'un' if not n_d else ''}desirable: KTO only pushes "
                f"their rewards {'below' if not n_d else 'above'} the reference point (the KL estimate), with "
                "nothing to contrast them with")
    lo_d, hi_d = round(n_u * undesirable_weight / n_d, 2), round(1.33 * n_u * undesirable_weight / n_d, 2)
    lo_u, hi_u = round(n_d * desirable_weight / (1.33 * n_u), 2), round(n_d * desirable_weight / n_u, 2)
    if lo_d <= desirable_weight <= hi_d or lo_u <= undesirable_weight <= hi_u:
        return None
    ratio = desirable_weight * n_d / (undesirable_weight * n_u) if undesirable_weight else float("inf")
    return (f"λ_D·n_D / (λ_U·n_U) = {desirable_weight}·{n_d} / ({undesirable_weight}·{n_u}) = {ratio:.2f} is "
            f"outside [1, 4/3] (the KTO paper's eq. 8); set EITHER loss.desirable_weight in [{lo_d}, {hi_d}] OR "
            f"loss.undesirable_weight in [{lo_u}, {hi_u}]")


# -- the data ------------------------------------------------------------------------------------


def _read(path, fmt: str | None) -> list:
    """A file's records: ``UnpairedExample``s when its first record has a completion, else pairs."""
    from lmzoo.data.conversations import read_records
    from lmzoo.data.preference import read_pairs, read_unpaired

    if fmt is None:
        first = next(iter(read_records(path)), (None, None))[1]
        if isinstance(first, dict) and "completion" in first:
            return read_unpaired(path)
    return read_pairs(path, fmt=fmt)


def unpair(items) -> list:
    """``UnpairedExample``s: a ``PreferencePair`` gives (prompt, chosen, desirable) then (prompt, rejected,
    undesirable), TRL's ``unpair_preference_dataset``; an ``UnpairedExample`` stays as it is."""
    from lmzoo.data.preference import PreferencePair, UnpairedExample

    out = []
    for x in items:
        if isinstance(x, PreferencePair):
            out += [UnpairedExample(x.prompt, x.chosen, True), UnpairedExample(x.prompt, x.rejected, False)]
        else:
            out.append(x)
    return out


def kto_examples(data: dict, seed: int, sample=None):
    """(train examples, held-out examples, held-out tasks or None, a note on how they were made)."""
    from lmzoo.data.sft import split_conversations

    if not data.get("files"):
        train, held, tasks, made = preference_pairs(data, seed, sample)
        return unpair(train), unpair(held), tasks, made
    items = [x for f in data["files"] for x in _read(f, data.get("format"))]
    train, val = split_conversations(items, float(data.get("val_fraction", 0.05)), seed)  # before unpairing
    return unpair(train), unpair(val), None, ""


class KTORows:
    """``Batches`` rows: row g is the fixed batch ``groups[g]``, with its examples (``input_ids``, ``labels``,
    ``attention_mask``, ``desirable``), their KL rows (``kl_input_ids``, ...) and the reference's log-probs
    of both (``ref_logps``, ``ref_kl_logps``; set by ``score_reference``)."""

    def __init__(self, examples, kl, groups: list[list[int]]):
        self.examples, self.kl, self.groups = examples, kl, groups
        self.ref: torch.Tensor | None = None
        self.ref_kl: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.groups)

    def batch(self, rows) -> dict[str, torch.Tensor]:
        idx = [i for r in rows for i in self.groups[int(r)]]
        out = self.examples.batch(idx)
        out.update({f"kl_{k}": v for k, v in self.kl.batch(idx).items() if k != "desirable"})
        t = torch.as_tensor(idx)
        return {**out, "ref_logps": self.ref[t], "ref_kl_logps": self.ref_kl[t]}

    def score_reference(self, model) -> None:
        self.ref, self.ref_kl = _logps(model, self.examples), _logps(model, self.kl)


def _start(labels: list[int]) -> int:
    from lmzoo.data.sft import IGNORE

    return next(k for k, y in enumerate(labels) if y != IGNORE)


def mismatched(examples, batch: int, seed: int, max_len: int, max_prompt_len: int | None = None,
               what: str = "the") -> KTORows:
    """The fixed batches and their KL rows (module docstring): example j of a batch gets, as its KL row,
    its own prompt followed by the completion of example j − 1. A KL row longer than ``max_len`` loses
    its prompt's beginning first (down to ``max_prompt_len``, default ``max_len // 2``), then the end."""
    from lmzoo.data.preference import UnpairedExamples
    from lmzoo.data.sft import IGNORE

    n = len(examples)
    if n < 2:
        raise LmzooError(f"{what} examples: {examples.summary()}: KTO's KL term pairs each prompt with another "
                         "example's completion, so it needs at least 2 (a larger data.val_fraction, or more data)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    groups = [g.tolist() for g in order.tensor_split(max(1, n // batch))]  # sizes in [batch, 2·batch): never 1
    partner = [0] * n
    for g in groups:
        for j, i in enumerate(g):
            partner[i] = g[j - 1]  # TRL's rotation: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})
    keep = max_len // 2 if max_prompt_len is None else max_prompt_len
    ids, labels = [], []
    for i, p in enumerate(partner):
        s, t = _start(examples.labels[i]), _start(examples.labels[p])
        completion = examples.input_ids[p][t:]
        prompt = examples.input_ids[i][:s]
        prompt = prompt[len(prompt) - min(len(prompt), max(max_len - len(completion), keep)):]
        ids.append((prompt + completion)[:max_len])
        labels.append(([IGNORE] * len(prompt) + examples.labels[p][t:])[:max_len])
    kl = UnpairedExamples(ids, labels, list(examples.desirable), max_len, pad_id=examples.pad_id)
    return KTORows(examples, kl, groups)


@torch.no_grad()
def _logps(model, rows, batch: int = 32) -> torch.Tensor:
    """(N,) float32 summed log-probs of every row of ``rows`` (``UnpairedExamples``), in eval mode, on CPU."""
    from lmzoo.objectives.logprobs import response_logps

    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    for start in range(0, len(rows), batch):
        b = rows.batch(range(start, min(start + batch, len(rows))))
        out.append(response_logps(model, b["input_ids"].to(device), b["labels"].to(device),
                                  b["attention_mask"].to(device)).float().cpu())
    model.train(was)
    return torch.cat(out)


def reference_point(policy_kl: torch.Tensor, ref_kl: torch.Tensor, world_size: int = 1) -> torch.Tensor:
    """``kto_reference_point``; with several ranks, their means averaged before the clamp (TRL's)."""
    from lmzoo.objectives.preference import kto_reference_point
    from lmzoo.train.distributed import all_reduce

    if world_size == 1:
        return kto_reference_point(policy_kl, ref_kl)
    return (all_reduce((policy_kl - ref_kl).mean().detach().clone()) / world_size).clamp(min=0)


def step_metrics(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, z: torch.Tensor, beta: float,
                 world_size: int = 1) -> dict[str, float]:
    """``kto_metrics`` of a step; with several ranks TRL's: each side's sums and counts gathered over the
    ranks, so every rank logs the same keys (the loop averages them) even when its batch lacks a side."""
    from lmzoo.objectives.preference import kto_metrics
    from lmzoo.train.distributed import all_reduce

    if world_size == 1:
        return kto_metrics(policy, ref, desirable, z, beta=beta)
    good = desirable.to(torch.bool)
    rewards, logps = beta * (policy - ref).detach(), policy.detach()
    sums = all_reduce(torch.stack([t.double() for sel in (good, ~good)
                                   for t in (rewards[sel].sum(), logps[sel].sum(), sel.sum())])).tolist()
    out = {"kl": float(z)}
    for k, side in enumerate(("chosen", "rejected")):
        total_reward, total_logp, n = sums[3 * k:3 * k + 3]
        if n:
            out[f"rewards/{side}"], out[f"logps/{side}"] = total_reward / n, total_logp / n
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


# -- the run -------------------------------------------------------------------------------------


def run_kto(cfg: dict, model_dir, out_dir, *, ref_dir=None, lora: bool = False, qlora: bool = False,
            resume: bool = False, resume_or_start: bool = False, source: str = "config") -> StageResult:
    from lmzoo.data.sampler import Batches
    from lmzoo.objectives.logprobs import sequence_logps
    from lmzoo.objectives.preference import kto_loss, kto_metrics
    from lmzoo.stages.sft import accuracy_hook, attach_lora, save_outputs
    from lmzoo.tokenizers.chat import stop_ids
    from lmzoo.train import Trainer
    from lmzoo.train.evaluate import to_device

    check_config(cfg, source)
    cfg, weights = _split_weights(cfg)
    name = (cfg.get("loss") or {}).get("name", "kto")
    if name != "kto":
        raise ConfigError(f"{source}: run_kto trains loss.name kto, got {name!r} (run_dpo trains the pairwise ones)")
    cfg, tcfg, out_dir, env, model, tok, fam, data, template = _prepare(cfg, model_dir, out_dir, resume,
                                                                       resume_or_start, source)
    lsec, esec, lora_sec = cfg.get("loss") or {}, cfg.get("eval") or {}, cfg.get("lora") or {}
    beta = float(lsec.get("beta", 0.1))
    weights = {k: float(weights.get(k, 1.0)) for k in WEIGHTS}
    per_rank = int(data.get("batch_size", 16)) // env.world_size
    if per_rank < 2:
        raise ConfigError(f"{source}: data.batch_size {data.get('batch_size', 16)} over {env.world_size} rank(s) "
                          "leaves fewer than 2 examples per batch; KTO's KL term pairs each prompt with another "
                          "example's completion of its batch")
    stops = stop_ids(tok, template)
    pad = _pad_id(tok, stops)
    model.to(env.device)  # the reference pass and any sampling run where training will
    reference = model if ref_dir is None else reference_model(ref_dir, tok, model).to(env.device)  # fail early
    train_raw, val_raw, eval_tasks, made = kto_examples(data, tcfg.seed,
                                                        policy_sampler(model, tok, template, cfg, stops, env))
    from lmzoo.data.preference import encode_unpaired

    train_ex, val_ex = (_encode(tok, raw, template, data, what, encode_unpaired, "examples")
                        for raw, what in ((train_raw, "train"), (val_raw, "held-out")))
    for ex in (train_ex, val_ex):
        ex.pad_id = pad
    max_len = int(data.get("max_len", 256))
    train_rows = mismatched(train_ex, per_rank, tcfg.seed, max_len, data.get("max_prompt_len"), "train")
    val_rows = mismatched(val_ex, per_rank, tcfg.seed + 1, max_len, data.get("max_prompt_len"), "held-out")
    for rows in (train_rows, val_rows):  # log π_ref of every completion and KL row, once, before the policy moves
        rows.score_reference(reference)
    del reference
    if env.is_main:
        ignored = [f"loss.{k} {lsec[k]}" for k, off in PAIRWISE_ONLY.items() if lsec.get(k, off) != off]
        print(f"lmzoo dpo: {fam.name} from {model_dir}; loss kto (beta {beta}, desirable_weight "
              f"{weights['desirable_weight']}, undesirable_weight {weights['undesirable_weight']}); reference "
              f"{ref_dir or 'the starting model'}; template {_name(template)}; train: {train_ex.summary()}; held "
              f"out: {val_ex.summary()}{_made(made)}; KL term: each prompt with the previous example's completion "
              f"in {len(train_rows)} fixed batches of about {per_rank}"
              + (f"; not used by KTO: {', '.join(ignored)}" if ignored else ""), file=sys.stderr)
        warning = balance_warning(train_ex.desirable, **weights)
        if warning:
            print(f"lmzoo dpo: warning: {warning}", file=sys.stderr)
    torch.manual_seed(tcfg.seed)
    lora = lora or qlora or bool(lora_sec.get("enabled"))
    if lora:
        attach_lora(model, lora_sec, qlora or bool(lora_sec.get("qlora")))

    def losses(model, b, world_size: int):
        """(per-example losses, policy log-probs, z) of one fixed batch."""
        with torch.no_grad():  # TRL: z is a constant of the step; no gradient through the KL rows
            policy_kl = sequence_logps(model(b["kl_input_ids"], attention_mask=b["kl_attention_mask"]).logits,
                                       b["kl_labels"])
        z = reference_point(policy_kl, b["ref_kl_logps"], world_size)
        policy = sequence_logps(model(b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        return kto_loss(policy, b["ref_logps"], b["desirable"], z, beta=beta, **weights), policy, z

    def step_fn(model, b):
        per, policy, z = losses(model, b, env.world_size)
        return per.mean(), {"n_tokens": int(policy.shape[0]),
                            **step_metrics(policy, b["ref_logps"], b["desirable"], z, beta, env.world_size)}

    def held_out(model) -> dict:
        """Every rank scores every held-out batch itself (FSDP: the same forwards), no collective."""
        policy, ref, desirable, z_sum = [], [], [], 0.0
        for g in range(len(val_rows)):
            b = to_device(val_rows.batch([g]), env.device)
            _, p, z = losses(model, b, 1)
            policy.append(p.float())
            ref.append(b["ref_logps"])
            desirable.append(b["desirable"])
            z_sum += float(z) * len(p)
        policy = torch.cat(policy)
        return kto_metrics(policy, torch.cat(ref), torch.cat(desirable), z_sum / len(policy), beta=beta)

    hooks = [held_out]
    if eval_tasks and esec.get("accuracy", True):
        hooks.append(accuracy_hook(tok, eval_tasks, template, esec, stops, getattr(model.config, "max_positions",
                                                                                   None)))
    tcfg.extra = {**tcfg.extra, "stage": "dpo", "family": fam.name, "model": str(model_dir), "loss": "kto",
                  "beta": beta, **weights, "reference": str(ref_dir or model_dir), "lora": lora}
    batches = Batches(train_rows, 1, seed=tcfg.seed, shuffle=True, epochs=None, rank=env.rank,
                      world_size=env.world_size)  # one fixed batch per rank and step
    trainer = Trainer(model, batches, step_fn, tcfg, out_dir, env=env, eval_hooks=hooks)
    result = trainer.fit(resume=resume or resume_or_start, start_if_missing=resume_or_start)
    final, adapter = save_outputs(trainer, model_dir, tok, template, out_dir, lora, env)
    if env.is_main:
        from lmzoo.stages.dpo import plot_dpo

        plot_dpo(out_dir / "metrics.jsonl", out_dir / "dpo.png")
    return StageResult(result, final, adapter, result.initial_eval, result.eval, train_ex.summary())
