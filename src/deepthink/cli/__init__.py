"""The `deepthink` command: one module per subcommand, each a thin argparse front over the library
(`register(sub)` adds its parser, `run(args)` runs it). The only package that imports argparse."""
from __future__ import annotations

import argparse
import importlib
import sys

# imported by build_parser, inside main's Ctrl-C guard: several load torch and transformers (a second or more)
SUBCOMMANDS = ["tasks", "methods", "demo", "evaluate", "report", "tune", "predict", "generate", "serve", "lm_eval"]


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog="deepthink", description="Iterative forward tuning (Deep-Thinking) for in-context learning.")
    parser.add_argument("--version", action="version", version=f"deepthink {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except KeyboardInterrupt:                  # Ctrl-C while torch and transformers load: nothing has started
        print("deepthink: interrupted while starting; nothing was run", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        resume = ": finished units are saved; run the same command again to resume" if args.command == "eval" else ""
        print(f"deepthink {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError, PermissionError, OSError,
            ImportError, TypeError) as e:
        print(f"deepthink {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
