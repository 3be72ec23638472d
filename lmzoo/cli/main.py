"""The ``lmzoo`` command: one entry point, one module per subcommand."""

from __future__ import annotations

import argparse
import sys

from lmzoo.errors import LmzooError

COMMANDS = ["demo", "zoo", "generate", "convert", "kvcache", "masks", "tokenizer", "quantize", "speedrun",
            "compare-archs", "pretrain", "train"]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="lmzoo", description="Common LLM architectures from shared blocks: "
                                     "inspect, convert and run them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"lmzoo.cli.{name.replace('-', '_')}")  # compare-archs -> compare_archs
        p = sub.add_parser(name, help=mod.HELP, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except LmzooError as e:
        print(f"lmzoo {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
