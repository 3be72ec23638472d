"""Convert a checkpoint into the transformers layout (safetensors), optionally changing dtype or sharding.

The source may be any layout lmzoo reads (for example the original ChatGLM2-6B release with its
fused query_key_value); the output loads with transformers.AutoModelForCausalLM.from_pretrained.
A preset name as --model writes a randomly initialised checkpoint of that shape. The source's
tokenizer files, chat template and generation_config.json are copied along, so `lmzoo generate
--prompt` works on the output as it did on the source.
"""

from __future__ import annotations

import lmzoo
from lmzoo.cli.common import add_model_argument, resolve_model
from lmzoo.interop.companions import companion_files

HELP = "convert a checkpoint to the transformers layout (dtype, sharding)"


def add_arguments(p) -> None:
    add_model_argument(p)
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: keep)")
    p.add_argument("--max-shard-size", default="5GB", help="shard past this size, e.g. 2GB or 500MB")
    p.add_argument("--seed", type=int, default=0, help="seed for a preset's random weights")


def run(args) -> int:
    model = resolve_model(args.model, args.dtype, args.seed, skip_memory_check=args.skip_memory_check)
    out = lmzoo.save(model, args.out, max_shard_size=args.max_shard_size)  # a loaded model brings its tokenizer
    n = sum(p.numel() for p in model.parameters())
    copied = companion_files(out)
    with_tok = f"; with {', '.join(p.name for p in copied)}" if copied else ""
    print(f"wrote {out} ({type(model.config).family}, {n:,} parameters{with_tok})")
    return 0
