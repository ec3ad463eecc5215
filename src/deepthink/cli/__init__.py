"""The `deepthink` command: one module per subcommand, each a thin argparse front over the library
(`register(sub)` adds its parser, `run(args)` runs it). The only package that imports argparse."""
from __future__ import annotations

import argparse
import sys

from . import demo, evaluate, generate, lm_eval, methods, predict, report, serve, tasks, tune

SUBCOMMANDS = [tasks, methods, demo, evaluate, report, tune, predict, generate, serve, lm_eval]


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog="deepthink", description="Iterative forward tuning (Deep-Thinking) for in-context learning.")
    parser.add_argument("--version", action="version", version=f"deepthink {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted: finished units are saved; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError, PermissionError, OSError,
            ImportError, TypeError) as e:
        print(f"deepthink {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
