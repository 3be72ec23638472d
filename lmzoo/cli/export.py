"""Export a checkpoint to another runtime's file format: ``lmzoo export gguf`` writes one GGUF file
that llama.cpp, Ollama and transformers' GGUF loader read (LLaMA, GPT-2, Bloom, ChatGLM2/3/GLM-4,
DeepSeek-V2, T5; docs/gguf.md).

The directory's tokenizer goes into the file when there is one (byte-level BPE, sp-bpe, SentencePiece);
without it the file holds the weights only. f32/f16/bf16 keep the weights; q8_0, q4_0, q4_1, q5_0 and
q5_1 quantize every matrix in blocks of 32 (norms stay F32; a row that does not split into blocks
is written F16). The file appears only when complete.
"""

from __future__ import annotations

from pathlib import Path

from lmzoo.cli.common import add_model_argument, family_of, resolve_model
from lmzoo.errors import LmzooError

HELP = "export a checkpoint to GGUF (llama.cpp, Ollama)"


def add_arguments(p) -> None:
    from lmzoo.interop.gguf import TYPES

    sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = sub.add_parser("gguf", help="one .gguf file (llama, gpt2, bloom, chatglm2, deepseek_v2, t5)", description=__doc__)
    add_model_argument(g)
    g.add_argument("--out", required=True, help="the .gguf file to write")
    g.add_argument("--type", default="f32", help=f"{' | '.join(TYPES)} (default f32)")
    g.add_argument("--seed", type=int, default=0, help="seed for a preset's random weights")


def run(args) -> int:
    import lmzoo
    from lmzoo.interop.gguf import TYPES, check_architecture, export_gguf
    from lmzoo.tokenizers import find_tokenizer

    if args.type not in TYPES:
        raise LmzooError(f"unsupported --type {args.type!r}; supported: {', '.join(TYPES)}")
    fam = family_of(args.model)  # refuse another family before any weight is read
    check_architecture(fam.name)
    model = resolve_model(args.model, "float32", args.seed, skip_memory_check=args.skip_memory_check)
    tok = lmzoo.load_tokenizer(args.model) if Path(args.model).is_dir() and find_tokenizer(args.model) else None
    kept: dict[str, bool] = {}
    written = export_gguf(model, tok, args.out, type=args.type, kept=kept)
    fell_back = sum(t == "F16" for t in written.values()) if args.type.startswith("q") else 0
    note = f"; {fell_back} tensors F16: rows not a multiple of 32" if fell_back else ""
    if kept:
        note += (f"; {sum(kept.values())} of {len(kept)} quantized tensors written with their own codes and "
                 "scales (no second rounding), the rest re-quantized from the weights they compute")
    print(f"wrote {args.out} ({args.type}, {len(written)} tensors, {'with' if tok else 'without'} tokenizer{note})")
    return 0
