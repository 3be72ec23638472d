"""Download a model (or a PEFT adapter) from the Hugging Face Hub into the local Hub cache and print
its folder there, the snapshot every later ``--model ORG/NAME`` and ``lmzoo.load("ORG/NAME")`` read
(with HF_HUB_OFFLINE=1 too).

  lmzoo download TinyLlama/TinyLlama-1.1B-Chat-v1.0
  lmzoo download deepseek-ai/DeepSeek-V2-Lite --revision main
  lmzoo download ORG/NAME --include "*.gguf"        # more files than lmzoo reads

Only the files lmzoo reads come down: config.json, *.safetensors and their index, the tokenizer and
generation files, adapter_config.json and adapter_model.safetensors; never pickled *.bin, never
remote code (*.py). The token comes from HF_TOKEN or `hf auth login`; progress bars go to stderr, the
path to stdout. See lmzoo/interop/hub.py.
"""

from __future__ import annotations

HELP = "download a model from the Hugging Face Hub (the files lmzoo reads) and print its local folder"


def add_arguments(p) -> None:
    p.add_argument("repo_id", metavar="ORG/NAME", help="a Hub id, e.g. TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    p.add_argument("--revision", help="a branch, tag or commit (default: main)")
    p.add_argument("--include", nargs="+", default=[], metavar="PATTERN",
                   help="more files to fetch, as glob patterns (e.g. '*.gguf')")


def run(args) -> int:
    from lmzoo.interop import hub

    print(hub.resolve(args.repo_id, revision=args.revision, kind="all", include=args.include))
    return 0
