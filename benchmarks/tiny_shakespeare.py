"""A small byte-level LLaMA trained on tinyshakespeare with a fixed seed: the model the quantization
benchmark and tests measure on (lmzoo has no training stage yet, so this is a deliberately plain loop).

The vocabulary is the 256 byte values (token id = byte), saved as a ``tokenizers`` byte-level BPE
without merges, so ``lmzoo quantize --calib FILE.txt`` can tokenize text from the model directory.
The corpus is split by position: the first 90% is training text (calibration comes from it too),
the last 10% is held out for perplexity.

    python benchmarks/tiny_shakespeare.py --out /tmp/shakespeare --steps 600     # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

import lmzoo
from lmzoo.models.llama.config import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("LMZOO_SHARED_DATA") or ROOT.parent / "shared" / "data") / "corpora" / "en" / "tinyshakespeare.txt"
HELD_OUT = 0.1


def corpus_path() -> Path | None:
    return CORPUS if CORPUS.exists() else None


def missing_corpus() -> str:
    """The one line a benchmark prints when the corpus is not where it looked (a clone without ../shared/data)."""
    return (f"corpus not found: {CORPUS}; set LMZOO_SHARED_DATA=/path/to/data, the folder that holds "
            "corpora/en/tinyshakespeare.txt")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what byte-level BPE vocabularies spell)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer():
    """A ``tokenizers.Tokenizer`` whose ids are the UTF-8 bytes of the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def load_ids(path: Path = CORPUS) -> tuple[torch.Tensor, torch.Tensor]:
    """(training ids, held-out ids) of the corpus, split by position."""
    data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8).long()
    cut = int(len(data) * (1 - HELD_OUT))
    return data[:cut], data[cut:]


def config(d_model=128, n_layers=4, n_heads=4, d_ff=384, seq_len=128) -> LlamaConfig:
    return LlamaConfig(vocab_size=256, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                       d_ff=d_ff, max_positions=max(seq_len, 256), tie_embeddings=False)


def train(out_dir: str | Path, *, d_model=128, n_layers=4, n_heads=4, d_ff=384, seq_len=128, batch=16, steps=300,
          lr=3e-3, seed=0, log_every=0) -> dict:
    """Train with AdamW (linear warmup, cosine decay), save model + tokenizer.json; returns a summary."""
    train_ids, held = load_ids()
    torch.manual_seed(seed)
    model = lmzoo.build(config(d_model, n_layers, n_heads, d_ff, seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.9 * scale)
        starts = torch.randint(0, len(train_ids) - seq_len - 1, (batch,), generator=gen)
        ids = torch.stack([train_ids[s:s + seq_len] for s in starts.tolist()])  # (batch, seq_len)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f}s", flush=True)
    model.eval()
    out = lmzoo.save(model, out_dir)
    byte_tokenizer().save(str(Path(out) / "tokenizer.json"))
    info = {"params": model.num_parameters(), "steps": steps, "final_loss": float(loss.detach()), "seconds": time.perf_counter() - t0,
            "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "d_ff": d_ff, "seq_len": seq_len, "batch": batch, "seed": seed}
    (Path(out) / "train_info.json").write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    for name, default in (("d_model", 128), ("n_layers", 4), ("n_heads", 4), ("d_ff", 384), ("seq_len", 128),
                          ("batch", 16), ("steps", 300), ("seed", 0), ("threads", 0)):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if corpus_path() is None:
        raise SystemExit(missing_corpus())
    print(train(a.out, d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads, d_ff=a.d_ff, seq_len=a.seq_len,
                batch=a.batch, steps=a.steps, lr=a.lr, seed=a.seed, log_every=50))


if __name__ == "__main__":
    main()
