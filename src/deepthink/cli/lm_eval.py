"""`deepthink lm-eval ...`: lm-evaluation-harness's `run` with the deepthink model registered and selected.

Everything after `lm-eval` goes to the harness unchanged (--tasks, --include_path, --num_fewshot, --limit,
--output_path, --log_samples, --model_args model=...,steps=5,...), with `--model deepthink` added. With an
explicit context (context=DIR or demos=FILE in --model_args) the task runs with --num_fewshot 0.
"""
from __future__ import annotations

import argparse
import sys

HELP = """deepthink lm-eval: lm-evaluation-harness with deepthink as the model (`--model deepthink` is implied).

  deepthink lm-eval --model_args model=smollm2-135m,steps=5 --tasks my_task --include_path examples/lm_eval \\
      --num_fewshot 4 --limit 20 --output_path runs/lm-eval

--model_args (comma-separated key=value):
  model=NAME|DIR|FILE.gguf   the deepthink model (default smollm2-135m); dtype=float32
                             (device and batch size: the harness's --device, default here cpu, and --batch_size,
                             default here 16)
  context=DIR                a saved tuned context (deepthink tune --out DIR, any method); --num_fewshot 0
  demos=FILE                 demonstrations to tune here (with the options below); --num_fewshot 0
  method=forward|grad_kv     how demos=FILE is tuned (default forward; with context=DIR: a check of what made it)
  steps=, step_size=, momentum=, positions=, update=   forward tuning options (TuningConfig)
  task=T, steps=, lr=, selection=, dev_size=, ...      method=grad_kv with demos=FILE: the deepthink task whose
                             template the file follows (T's training rows give dev items), GradKVConfig options
  fewshot_delimiter=         what ends each demonstration in the task's prompts (default: blank line)
Without context/demos the task's own few-shot examples are tuned: the task needs a fixed few-shot set
(fewshot_config: {sampler: first_n}) and --num_fewshot N >= 1. Needs `pip install 'deepthink[lm-eval]'`.

The harness's own options follow.
"""


def register(sub) -> None:
    p = sub.add_parser("lm-eval", add_help=False, prefix_chars="+",
                       help="run lm-evaluation-harness tasks with deepthink as the model (needs deepthink[lm-eval])",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("harness_args", nargs=argparse.REMAINDER, help="arguments for lm-evaluation-harness's `run`")
    p.set_defaults(func=run)


def model_args(argv: list[str]) -> dict[str, str]:
    """The key=value pairs given to --model_args/-a (either form the harness takes: 'a=1,b=2' or 'a=1 b=2')."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        values: list[str] = []
        if a in ("--model_args", "-a"):
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                values.append(argv[i])
                i += 1
        else:
            if a.startswith("--model_args="):
                values.append(a.split("=", 1)[1])
            i += 1
        for v in values:
            for kv in v.split(","):
                if "=" in kv:
                    k, val = kv.split("=", 1)
                    out[k.strip()] = val.strip()
    return out


def _option(argv: list[str], *names: str) -> str | None:
    for i, a in enumerate(argv):
        for n in names:
            if a == n and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


def harness_argv(argv: list[str]) -> list[str]:
    """The argument list for the harness's `run`: --model deepthink, --device cpu and --batch_size 16 added
    unless given; --num_fewshot 0 in the explicit mode.
    Raises ValueError on a combination that cannot mean what the user wants."""
    argv = list(argv)
    if argv[:1] == ["run"]:
        argv = argv[1:]
    model = _option(argv, "--model", "-m")
    if model is not None and model != "deepthink":
        raise ValueError(f"--model {model}: `deepthink lm-eval` runs the deepthink model; use `lm_eval --model "
                         f"{model}` for others (e.g. the harness's hf baseline)")
    if model is None:
        argv = ["--model", "deepthink", *argv]
    margs = model_args(argv)
    for key, value, why in (("device", "cpu", "the harness defaults to CUDA; deepthink to the CPU"),
                            ("batch_size", "16", "the harness defaults to 1")):
        if key in margs and _option(argv, f"--{key}") is not None:
            raise ValueError(f"{key} is given twice (--{key} and in --model_args): keep one")
        if key not in margs and _option(argv, f"--{key}") is None:
            argv += [f"--{key}", value]         # {why}
    explicit = [k for k in ("context", "demos") if k in margs]
    if explicit:
        shots = _option(argv, "--num_fewshot", "-f")
        if shots is None:
            argv += ["--num_fewshot", "0"]
        elif shots.strip() != "0":
            raise ValueError(f"--num_fewshot {shots} with {explicit[0]}=...: the explicit context already holds the "
                             "demonstrations; run with --num_fewshot 0, or drop context/demos to tune the task's "
                             "own few-shot examples")
    return argv


def run(args) -> int:
    argv = list(args.harness_args)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        argv = ["--help"]
    else:
        argv = harness_argv(argv)
    from ..integrations import lm_eval as _adapter  # noqa: F401  (registers the "deepthink" model)
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    saved = sys.argv
    sys.argv = ["lm-eval", "run", *argv]
    try:
        cli = HarnessCLI()
        cli.execute(cli.parse_args())
    except SystemExit as e:        # argparse inside the harness: --help, or a bad option (already reported)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        sys.argv = saved
    return 0
