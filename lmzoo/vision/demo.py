"""Train a tiny ViT classifier or a tiny CLIP from scratch on the built-in shapes (lmzoo/vision/shapes.py),
on the CPU, in minutes. ``lmzoo train vit|clip`` runs these.

    vit   50-way colour/shape classification; reports accuracy on new images
    clip  contrastive training on the captions of 45 colour/shape pairs; reports zero-shot accuracy
          on images of the 5 held-out pairs, choosing among the prompts "a {colour} {shape}" of all 50

Each CLIP batch holds 45 pairs with no colour/shape pair twice (``distinct_pairs``): with repeats, two
images of one pair are each other's negatives in InfoNCE, and the demo learns markedly slower.

The seam to the shared training loop (``lmzoo.train.Trainer``): ``fit`` is given what the Trainer is
given -- the model, ``ShapeBatches`` (an endless iterator of dict batches with ``state_dict`` /
``load_state_dict``, the data position as JSON), and ``step_fn(model, batch) -> (loss, metrics)`` --
plus ``after_step``, where CLIP clamps its logit scale (the Trainer has no such hook; the clamp can
move to the start of the step function). Data, objectives, evaluation and pictures do not depend on
which loop runs them: moving onto the shared loop replaces ``fit`` and nothing else.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

import lmzoo
from lmzoo.models.clip.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from lmzoo.models.vit.config import ViTConfig
from lmzoo.vision import shapes
from lmzoo.vision.preprocess import CLIP_MEAN, CLIP_STD, normalize, rescale

Batch = dict[str, torch.Tensor]
StepFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict]]
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature at 100 (paper, section 2.5)


@dataclass
class DemoConfig:
    steps: int = 1500
    batch_size: int = 45  # = the CLIP demo's 45 training pairs, each once per batch
    lr: float = 2e-3
    warmup: int = 25
    weight_decay: float = 0.05
    seed: int = 0
    image_size: int = 32
    patch_size: int = 8
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    projection_dim: int = 32  # CLIP only
    distinct_pairs: bool = True  # CLIP only: no colour/shape pair twice in a batch (no false negatives)
    eval_images: int = 400
    log_every: int = 50


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float pixel_values, with CLIP's statistics."""
    return normalize(rescale(images), CLIP_MEAN, CLIP_STD)


def fit(model: nn.Module, batches: Iterator[Batch], step_fn: StepFn, *, steps: int, lr: float, warmup: int,
        weight_decay: float, after_step: Callable[[nn.Module], None] | None = None, log_every: int = 50,
        log: Callable[[str], None] = print) -> list[float]:
    """AdamW (β2 = 0.98, decay on matrices only), gradient norm clipped at 1, linear warmup then cosine
    decay to 10% of the peak; returns the loss of every step."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        loss, metrics = step_fn(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(model)
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            extra = "".join(f"  {k} {v:.3g}" for k, v in metrics.items())
            log(f"step {step + 1:5d}/{steps}  loss {losses[-1]:.4f}{extra}  ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return losses


# -- ViT: colour/shape classification --------------------------------------------------------------


def tiny_vit(cfg: DemoConfig) -> nn.Module:
    """A tiny ViT classifier over the 50 colour/shape classes (labels "red circle", "red square", ...)."""
    names = [f"{c} {s}" for c, s in shapes.all_combos()]
    vcfg = ViTConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
                     image_size=cfg.image_size, patch_size=cfg.patch_size, pooler=False,
                     num_labels=len(names), labels=names)
    return lmzoo.build(vcfg)


class ShapeBatches:
    """Endless seeded batches of ``shapes.sample``, turned into model inputs by ``make``; the position is
    the number of batches drawn, and restoring it replays the generator to the same place."""

    def __init__(self, make: Callable[[shapes.Sample], Batch], cfg: DemoConfig, **sample_kw):
        self.make, self.cfg, self.sample_kw = make, cfg, sample_kw
        self.load_state_dict({"drawn": 0})

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        self.drawn += 1
        return self.make(shapes.sample(self.cfg.batch_size, self.g, self.cfg.image_size, **self.sample_kw))

    def state_dict(self) -> dict:
        return {"seed": self.cfg.seed, "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.g, self.drawn = torch.Generator().manual_seed(self.cfg.seed), 0
        for _ in range(state["drawn"]):
            next(self)


def vit_batches(cfg: DemoConfig) -> ShapeBatches:
    return ShapeBatches(lambda s: {"pixel_values": pixels(s.images), "labels": s.labels}, cfg)


def vit_step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
    out = model(batch["pixel_values"], labels=batch["labels"])
    acc = (out.logits.argmax(-1) == batch["labels"]).float().mean().item()
    return out.loss, {"acc": acc}


@torch.no_grad()
def eval_vit(model: nn.Module, s: shapes.Sample) -> torch.Tensor:
    return model(pixels(s.images)).logits.argmax(-1)  # (B,)


# -- CLIP: contrastive training, zero-shot on held-out pairs ---------------------------------------


def tiny_clip(cfg: DemoConfig, vocab: shapes.WordVocab, max_len: int = 10) -> nn.Module:
    text = CLIPTextConfig(vocab_size=len(vocab), d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                          d_ff=cfg.d_ff, max_positions=max_len, eos_token_id=vocab.eos_id,
                          bos_token_id=vocab.bos_id, pad_token_id=vocab.pad_id)
    vision = CLIPVisionConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
                              image_size=cfg.image_size, patch_size=cfg.patch_size)
    return lmzoo.build(CLIPConfig(text=text, vision=vision, projection_dim=cfg.projection_dim))


def clip_batches(cfg: DemoConfig, vocab: shapes.WordVocab) -> ShapeBatches:
    def make(s: shapes.Sample) -> Batch:
        ids, mask = vocab.encode(s.captions)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(s.images)}

    return ShapeBatches(make, cfg, combos=shapes.train_combos(), distinct=cfg.distinct_pairs)


def clip_step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
    out = model(**batch, return_loss=True)
    return out.loss, {"temperature": 1.0 / model.logit_scale.exp().item()}


def clamp_logit_scale(model: nn.Module) -> None:
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


@torch.no_grad()
def zero_shot(model: nn.Module, vocab: shapes.WordVocab, s: shapes.Sample) -> torch.Tensor:
    """(B,) predicted class (index into ``shapes.all_combos()``): the prompt "a {colour} {shape}" nearest each image."""
    ids, mask = vocab.encode([shapes.caption(c, sh, None) for c, sh in shapes.all_combos()])
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(s.images))
    return out.logits_per_image.argmax(-1)  # (B,)


# -- runs ------------------------------------------------------------------------------------------


def _accuracy(pred: torch.Tensor, s: shapes.Sample) -> float:
    return (pred == s.labels).float().mean().item()


def _write(out: Path | None, model, losses, s: shapes.Sample, pred: torch.Tensor, metrics: dict,
           titles: tuple[str, str], plot: bool, extra_files: dict[str, str] | None = None) -> None:
    """model/ (lmzoo.save), metrics.json, extra files, and loss.png + predictions.png titled ``titles``."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    lmzoo.save(model, out / "model")
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if plot:
        from lmzoo.vision.plots import loss_curve, prediction_grid

        names = [f"{c} {sh}" for c, sh in shapes.all_combos()]
        n = min(24, len(pred))
        loss_curve(losses, out / "loss.png", titles[0])
        prediction_grid(s.images[:n], [names[i] for i in pred[:n].tolist()],
                        (pred[:n] == s.labels[:n]).tolist(), out / "predictions.png",
                        f"{titles[1]}: {metrics['headline']}")


def train_vit(cfg: DemoConfig, out: str | Path | None = None, plot: bool = True, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    model = tiny_vit(cfg)
    log(f"ViT: {model.num_parameters():,} parameters, {cfg.image_size}px images in {cfg.patch_size}px patches")
    losses = fit(model, vit_batches(cfg), vit_step, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                 weight_decay=cfg.weight_decay, log_every=cfg.log_every, log=log)
    test = shapes.sample(cfg.eval_images, torch.Generator().manual_seed(cfg.seed + 10_000), cfg.image_size)
    pred = eval_vit(model, test)
    acc = _accuracy(pred, test)
    metrics = {"task": "50-way colour/shape classification", "accuracy": acc, "final_loss": losses[-1],
               "headline": f"accuracy {acc:.1%} on {len(test.captions)} new images", "config": asdict(cfg)}
    log(metrics["headline"])
    _write(Path(out) if out else None, model, losses, test, pred, metrics,
           ("ViT on the shapes: cross-entropy, 50 classes", "ViT"), plot)
    return {**metrics, "model": model, "losses": losses}


def train_clip(cfg: DemoConfig, out: str | Path | None = None, plot: bool = True, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    vocab = shapes.WordVocab()
    model = tiny_clip(cfg, vocab)
    log(f"CLIP: {model.num_parameters():,} parameters; training on {len(shapes.train_combos())} colour/shape "
        f"pairs, holding out {', '.join(f'{c} {s}' for c, s in shapes.HELD_OUT)}")
    losses = fit(model, clip_batches(cfg, vocab), clip_step, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                 weight_decay=cfg.weight_decay, after_step=clamp_logit_scale, log_every=cfg.log_every, log=log)
    eval_g = torch.Generator().manual_seed(cfg.seed + 10_000)
    held = shapes.sample(cfg.eval_images, eval_g, cfg.image_size, combos=shapes.HELD_OUT)
    seen = shapes.sample(cfg.eval_images, eval_g, cfg.image_size, combos=shapes.train_combos())
    pred = zero_shot(model, vocab, held)
    acc, seen_acc = _accuracy(pred, held), _accuracy(zero_shot(model, vocab, seen), seen)
    metrics = {"task": "zero-shot colour/shape classification over 50 prompts",
               "held_out_pairs": [f"{c} {s}" for c, s in shapes.HELD_OUT],
               "zero_shot_accuracy_held_out": acc, "zero_shot_accuracy_seen": seen_acc, "final_loss": losses[-1],
               "headline": f"zero-shot {acc:.1%} on held-out pairs ({seen_acc:.1%} on seen)", "config": asdict(cfg)}
    log(metrics["headline"])
    _write(Path(out) if out else None, model, losses, held, pred, metrics,
           (f"CLIP on the shapes: InfoNCE over {cfg.batch_size} pairs a batch", "CLIP, images of held-out pairs"),
           plot, {"vocab.json": json.dumps(vocab.words, indent=0) + "\n"})
    return {**metrics, "model": model, "losses": losses, "vocab": vocab}


RUNS = {"vit": train_vit, "clip": train_clip}
