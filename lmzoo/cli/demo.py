"""The main job on built-in defaults.

For now (until the training stage lands) this prints the architecture table computed from the
registry, then builds a small, randomly initialised LLaMA-shaped model and streams greedy tokens
from it through the KV cache, checking them against a full forward without the cache. The tokens
are meaningless: the weights are random.
"""

from __future__ import annotations

import time

import torch

import lmzoo
from lmzoo.cli import zoo
from lmzoo.models.registry import get_preset

HELP = "the main job on built-in defaults (architecture table + a tiny random model generating)"


def add_arguments(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    print("## The architecture table (computed from the registry on the meta device)\n")
    print(zoo.table(zoo.rows(), "bf16"))
    _, big = get_preset("llama2-7b")
    cfg = big.replace(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=None, d_ff=344, vocab_size=512)
    torch.manual_seed(args.seed)
    model = lmzoo.build(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 8))
    print(f"\n## A tiny random LLaMA ({model.num_parameters():,} parameters, GQA {cfg.n_heads}q/{cfg.n_kv_heads}kv): "
          f"greedy decode through the KV cache\nprompt ids: {prompt[0].tolist()}\nnew ids:    ", end="", flush=True)
    t0 = time.perf_counter()
    new = []
    for tok in lmzoo.stream(model, prompt, max_new_tokens=args.max_new_tokens):
        new.append(int(tok[0]))
        print(new[-1], end=" ", flush=True)
    dt = time.perf_counter() - t0
    full = torch.cat([prompt, torch.tensor([new])], 1)
    with torch.no_grad():
        again = model(full).logits[0, prompt.shape[1] - 1:-1].argmax(-1).tolist()
    print(f"\n{len(new)} tokens in {dt:.2f}s ({len(new) / dt:.0f} tok/s); cached decode "
          f"{'matches' if again == new else 'DIFFERS FROM'} the uncached forward's greedy choices")
    return 0 if again == new else 1
