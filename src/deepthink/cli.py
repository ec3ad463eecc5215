"""The `deepthink` command: a thin argparse front over the library, one function per subcommand."""
from __future__ import annotations

import argparse
import sys

from .models import DEFAULT_MODEL, REGISTRY


def add_model_args(p: argparse.ArgumentParser, multiple: bool = False, from_context: bool = False) -> None:
    """--model/--device/--dtype; with from_context, model and dtype default to what a saved context records."""
    if from_context:
        p.add_argument("--model", default=None, help="model to load (default: the one the context records: its "
                       "registry name, else its folder or hub id); must be the model it was tuned with")
    else:
        p.add_argument("--model", default=[DEFAULT_MODEL] if multiple else DEFAULT_MODEL,
                       nargs="+" if multiple else None,
                       help=f"{'one or more models: ' if multiple else ''}registry name ({', '.join(REGISTRY)}), "
                            f"a local Hugging Face model folder, a hub id, or a .gguf file (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, or auto: spread a model "
                   "too big for one device over the GPUs, CPU memory and disk (accelerate; default: cpu)")
    p.add_argument("--quantize", default=None, choices=["8bit", "4bit"],
                   help="load the weights 8- or 4-bit through bitsandbytes (install it first; needs a CUDA GPU)")
    p.add_argument("--dtype", default=None if from_context else "float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: " + ("the dtype the context was tuned in)" if from_context else
                                                       "float32, the fastest on CPUs)"))


def load_lm(args):
    import torch

    from .models import load_model

    return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                      quantize=getattr(args, "quantize", None))


def cmd_tasks(args) -> int:
    from .tasks import describe_tasks

    print(describe_tasks())
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(model=args.model, device=args.device, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, cli_lm_eval, evaluate, infer_cli, report

    parser = argparse.ArgumentParser(
        prog="deepthink", description="Iterative forward tuning (Deep-Thinking) for in-context learning.")
    parser.add_argument("--version", action="version", version=f"deepthink {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tasks", help="list the built-in tasks and their prompt templates")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("demo", help="zero-shot vs ICL vs Deep-Thinking on the small sentiment task shipped inside")
    add_model_args(p)
    p.add_argument("--steps", type=int, default=10, help="forward-tuning steps to show (default: 10)")
    p.set_defaults(func=cmd_demo)

    evaluate.register(sub)
    report.register(sub)
    infer_cli.register(sub)
    cli_lm_eval.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted: finished units are saved; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError, PermissionError, OSError) as e:
        print(f"deepthink {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
