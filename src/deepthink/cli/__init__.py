"""The `deepthink` command: one module per subcommand, each a thin argparse front over the library
(`register(sub)` adds its parser, `run(args)` runs it). The only package that imports argparse."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

# imported by build_parser, inside main's Ctrl-C guard: several load torch and transformers (a second or more)
SUBCOMMANDS = ["tasks", "methods", "demo", "evaluate", "report", "tune", "predict", "generate", "serve", "lm_eval"]


class ShowDefaults:
    """Help formatter mixin: every option's help line ends with its default, unless its text already states one:
    "(default: VALUE)", "(default: off)" for a flag, "(default: none)" for an unset option, "(required)" for a
    required one. Set on every subcommand's parser by build_parser, so no help string has to repeat its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower()
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, argparse.BooleanOptionalAction):      # --x / --no-x
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.nargs == 0:                       # a flag: store_true / store_false / store_const, off unless given
            return f"{text} (default: off)"
        value = action.default
        if value is None or value == []:
            shown = "none"
        elif isinstance(value, (list, tuple)):
            shown = " ".join(map(str, value))
        else:
            shown = str(value)
        return f"{text} (default: {shown.replace('%', '%%')})"


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give `parser` (keeping its own formatter, e.g. raw descriptions) the ShowDefaults mixin."""
    if not issubclass(parser.formatter_class, ShowDefaults):
        parser.formatter_class = type(f"ShowDefaults{parser.formatter_class.__name__}",
                                      (ShowDefaults, parser.formatter_class), {})


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog="deepthink", description="Iterative forward tuning (Deep-Thinking) for in-context learning.")
    parser.add_argument("--version", action="version", version=f"deepthink {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    for p in [parser, *sub.choices.values()]:
        show_defaults(p)
    return parser


def _interrupted_while_starting(signum, frame) -> None:
    """Ctrl-C while torch and transformers load: nothing has started, so leave at once. (A KeyboardInterrupt raised
    there can land in one of importlib's callbacks, which prints a traceback, ignores it and imports on.)"""
    sys.stderr.write("deepthink: interrupted while starting; nothing was run\n")
    sys.stderr.flush()
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    guard = threading.current_thread() is threading.main_thread()     # signal handlers live in the main thread
    previous = signal.signal(signal.SIGINT, _interrupted_while_starting) if guard else None
    try:
        parser = build_parser()
    finally:
        if guard and previous is not None:
            signal.signal(signal.SIGINT, previous)
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
