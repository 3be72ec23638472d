"""The ``lmzoo`` command: one entry point, one module per subcommand."""

from __future__ import annotations

import argparse
import os
import sys

from lmzoo.errors import LmzooError

COMMANDS = ["speedrun", "zoo", "generate", "chat", "serve", "convert", "export", "kvcache", "masks", "tokenizer", "quantize",
            "compare-archs", "pretrain", "sft", "reward", "dpo", "ppo", "grpo", "eval", "train", "download"]

# What a shell reports for a process killed by SIGPIPE (128 + 13): `lmzoo zoo --json | head` exits
# as `cat` would, without a traceback.
EXIT_BROKEN_PIPE = 141
EXIT_INTERRUPTED = 130


def version() -> str:
    """The installed distribution's version; the package's own when lmzoo runs from a source tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lmzoo")
    except PackageNotFoundError:
        import lmzoo

        return lmzoo.__version__


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="lmzoo", description="Common LLM architectures from shared blocks: "
                                     "inspect, convert and run them.")
    parser.add_argument("--version", action="version", version=f"lmzoo {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"lmzoo.cli.{name.replace('-', '_')}")  # compare-archs -> compare_archs
        p = sub.add_parser(name, help=mod.HELP, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def _silence_stdout() -> None:
    """After a reader closed the pipe: point stdout at /dev/null so the interpreter's final flush
    does not raise (and print) a second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (a test's capture)
        pass


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:  # --help and --version exit through here too; a closed pipe often shows only at this flush
            sys.stdout.flush()
    except BrokenPipeError:  # `lmzoo zoo --json | head`: the reader has all it wanted
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's 128 + SIGINT (pretrain checkpoints first)
        print("lmzoo: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    finished = False
    try:
        from lmzoo.cli.common import resolve_names

        resolve_names(args)  # a Hub id given as --model (or --adapter, --ref, ...) becomes its local snapshot
        code = args.run(args) or 0
        finished = True
        return code
    except LmzooError as e:
        print(f"lmzoo {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:  # a torchrun rank leaves its process group before exit; nothing to leave if torch never loaded
        if "torch.distributed" in sys.modules:
            from lmzoo.train.distributed import teardown

            teardown(finished)


if __name__ == "__main__":
    sys.exit(main())
