"""`deepthink tune | predict | generate`: tuned contexts as artifacts (tune once, then use without demonstrations).

    deepthink tune --task sst2 --seed 0 --shots 1 --steps 15 --out ctx/sst2    # or --demos demos.txt
    deepthink predict --context ctx/sst2 --task sst2 --input reviews.jsonl      # or --choices "no,yes"
    deepthink generate --context ctx/sst2 --prompt "Review: a fine film\nSentiment:"

`predict` and `generate` load the model the context records (override with --model/--dtype) and refuse a
model, tokenizer or dtype that differs from the one it was tuned with. See docs/contexts.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import fields
from pathlib import Path

TUNE_HELP = """Forward-tune demonstrations and save the tuned context to --out.

Demonstrations come from a task (--task T --seed S --shots K: the paper's draw from the task's
training data, each filled template followed by a blank line) or from --demos FILE:
  * a .jsonl file: rows in --task's field layout (like its train.jsonl), formatted like a task draw;
  * any other file: UTF-8 text used verbatim as the demonstration string (nothing is added or stripped).
With --demos FILE.txt, --task is optional and only recorded, so that `predict` can default to it.

--out must not exist or be an empty folder; a folder holding an earlier context is replaced only
with --overwrite (atomically: the old one stays until the new one is complete). If the update
diverges (a non-finite cache), tuning stops at the last finite step, warns, records why in the
artifact, and still saves it (exit code 0).
"""

PREDICT_HELP = """Score queries with a saved context and print one JSON object per query.

Input (--input FILE, or - for stdin): JSON Lines or plain text lines, one query per line; blank
lines are skipped. --input-format auto (the default) reads .jsonl/.json files as JSONL, other
files as plain lines, and stdin as JSONL when every non-blank line is a JSON object or string.
  --task T        JSONL rows in the task's field layout (like its eval.jsonl; the label field is
                  optional); the task's query template and choices are applied. Plain lines only
                  work for tasks with fixed choices and no hook: the line is the query field.
  --choices a,b,c each line (or JSON string, or JSON object's "query") is the raw query, used
                  verbatim; the continuations are " a", " b", " c" (comma-separated, each stripped,
                  one space prepended). A JSON list ('[" yes", "!"]') gives continuations verbatim.
Without either, the task recorded by `tune --task` is used.

Output (stdout, or --output FILE), per query: index (0-based among non-blank input lines), query,
choices, logprob (summed log-probability per choice), normalized (per token), prediction (argmax of
logprob), prediction_normalized, answer (the predicted choice's text; by normalized with
--normalize), and label when the input row has one (then the accuracy goes to stderr).
"""

GENERATE_HELP = """Continue a prompt after the tuned context (greedy by default; sampling with --temperature).

The prompt is tokenised without special tokens and placed right after the tuned prefix, exactly
as a scored query is; the continuation alone is printed. A step-1 context gives the same tokens as
generating from the demonstrations followed by the prompt.
"""


def register(sub) -> None:
    from .cli import add_model_args
    from .tuning import POSITIONS, UPDATES, TuningConfig

    p = sub.add_parser("tune", help="forward-tune demonstrations and save the context (tune once, use anywhere)",
                       description=TUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    src = p.add_argument_group("demonstrations")
    src.add_argument("--task", help="built-in task name (see `deepthink tasks`) or a task .yaml/.json file")
    src.add_argument("--seed", type=int, default=0, help="seed of the demonstration draw (default: 0)")
    src.add_argument("--shots", type=int, default=None,
                     help="k: demonstrations per label for fixed-label tasks, in total otherwise (default: 1)")
    src.add_argument("--data-dir", help="folder holding <task>/train.jsonl and eval.jsonl "
                                        "(default: $DEEPTHINK_DATA_DIR or ../shared/data)")
    src.add_argument("--demos", metavar="FILE", help="demonstrations file instead of a draw: .jsonl rows in --task's "
                                                     "layout, or any other file's text used verbatim")
    tuning = p.add_argument_group("tuning (TuningConfig)")
    kinds = {"int": int, "float": float, "str": str}
    choices = {"positions": POSITIONS, "update": UPDATES}
    for f in fields(TuningConfig):
        tuning.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kinds[str(f.type)],
                            default=f.default, choices=choices.get(f.name),
                            help=f"{f.metadata['help']} (default: {f.default})")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the context to (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a context already saved in --out")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("predict", help="score queries with a saved context (JSONL out)",
                       description=PREDICT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_context_args(p, add_model_args)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--task", help="format inputs with this task's template and choices")
    what.add_argument("--choices", help='comma-separated choices ("negative,positive"), or a JSON list of '
                                        'continuations used verbatim')
    p.add_argument("--input", required=True, metavar="FILE", help="queries: a JSONL or text file, or - for stdin")
    p.add_argument("--input-format", choices=("auto", "jsonl", "lines"), default="auto",
                   help="how to read --input (default: auto, see above)")
    p.add_argument("--output", metavar="FILE", help="write the JSONL here instead of stdout")
    p.add_argument("--normalize", action="store_true", help="'answer' by per-token log-probability")
    p.add_argument("--method", choices=("fast", "naive"), default="fast", help="scoring path (default: fast)")
    p.add_argument("--batch-size", type=int, default=16, help="queries per forward pass (default: 16)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("generate", help="generate text after a saved context",
                       description=GENERATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_context_args(p, add_model_args)
    p.add_argument("--prompt", required=True, help="text to continue (- reads it from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default: 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: unseeded)")
    p.add_argument("--no-stop-at-eos", dest="stop_at_eos", action="store_false",
                   help="keep generating after the end-of-sequence token")
    p.set_defaults(func=cmd_generate)


def _add_context_args(p: argparse.ArgumentParser, add_model_args) -> None:
    p.add_argument("--context", required=True, metavar="DIR", help="a folder written by `deepthink tune --out`")
    add_model_args(p, from_context=True)


# ---------------------------------------------------------------- tune

def cmd_tune(args) -> int:
    from . import tune
    from .cli import load_lm
    from .context import check_output_dir

    config = _tuning_config(args)
    demonstrations, origin = _demonstrations(args)        # fails fast on a bad task, split or file
    out = check_output_dir(args.out, args.overwrite)      # ... and on an unusable --out, before the model loads
    lm = load_lm(args)
    saving = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="non-finite cache", category=RuntimeWarning)
            ctx = tune(lm, demonstrations, config, progress=sys.stderr.isatty())
        ctx.origin = origin
        if ctx.stopped:
            print(f"deepthink tune: warning: {ctx.stopped} (recorded in the artifact)", file=sys.stderr)
        saving = True
        ctx.save(out, overwrite=args.overwrite)
    except KeyboardInterrupt:
        state = ("interrupted while saving: it holds either the complete new context or what it held before, "
                 "never a partial one" if saving else "interrupted before saving: nothing was written")
        print(f"deepthink tune: {out}: {state}", file=sys.stderr)
        return 130
    print(f"saved {out}: {ctx.length} tokens of demonstrations, {ctx.steps_done} steps, {len(ctx.keys)} layers, "
          f"{ctx.nbytes / 1e6:.2f} MB, model {lm.name}")
    return 0


def _tuning_config(args):
    from .tuning import TuningConfig

    try:
        return TuningConfig(**{f.name: getattr(args, f.name) for f in fields(TuningConfig)})
    except ValueError as e:   # name the flag, not the dataclass field
        msg = str(e)
        for f in fields(TuningConfig):
            msg = msg.replace(f"TuningConfig.{f.name}", "--" + f.name.replace("_", "-"))
        raise ValueError(msg) from None


def _demonstrations(args) -> tuple[str, dict]:
    """The demonstration string and a record of where it came from."""
    from .data import make_plan, read_demos_file
    from .tasks import get_task

    task = get_task(args.task) if args.task else None
    if args.demos is None:
        if task is None:
            raise ValueError("give the demonstrations: --task T (with --seed, --shots) or --demos FILE")
        shots = 1 if args.shots is None else args.shots
        plan = make_plan(task, args.seed, shots, dev_size=0, data_dir=args.data_dir)
        return plan.demonstrations, {"task": args.task, "seed": args.seed, "shots": shots}
    if args.shots is not None:
        raise ValueError("--shots sets the size of a draw from --task; it cannot be combined with --demos FILE")
    path = Path(args.demos)
    if not path.is_file():
        raise FileNotFoundError(f"demonstrations file {path} does not exist")
    if path.suffix == ".jsonl":
        if task is None:
            raise ValueError(f"{path} is JSONL: give --task T so that its rows can be formatted with T's template "
                             "(or pass a plain text file, used verbatim)")
        text = "".join(e.demo_text + "\n\n" for e in read_demos_file(path, task))
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path} holds no demonstrations (it is empty or only whitespace): "
                         "write the demonstration text into it")
    return text, {"task": args.task, "demos_file": str(path)}


# ---------------------------------------------------------------- predict / generate

def _load_context(args):
    """The context at --context, loaded for --model (default: the model it records)."""
    from .cli import load_lm
    from .context import TunedContext
    from .models import REGISTRY

    meta = TunedContext.read_config(args.context)
    m = meta["model"]
    if args.model is None:
        if m["name"] in REGISTRY:
            args.model = m["name"]
        elif m["source"] != "in-memory":
            args.model = m["source"]
        else:
            raise ValueError(f"{args.context} was tuned with an in-memory model ({m['name']!r}); pass --model")
    if args.dtype is None:
        args.dtype = meta["dtype"]
    return TunedContext.load(args.context, load_lm(args))


def cmd_predict(args) -> int:
    from .context import TunedContext
    from .task_rows import task_queries

    if args.choices is None and args.task is None:   # default to the task the context was tuned on
        args.task = (TunedContext.read_config(args.context).get("origin") or {}).get("task")
        if args.task is None:
            raise ValueError("give --task T (queries formatted by a task) or --choices a,b,c (raw queries)")
    items = read_inputs(args.input, args.input_format)
    if not items:
        raise ValueError(f"{args.input} holds no queries (blank lines are skipped)")
    if args.task is not None:
        queries, choices, labels = task_queries(args.task, items)
    else:
        cs = parse_choices(args.choices)
        queries, choices, labels = [raw_query(x, i) for i, x in enumerate(items)], [cs] * len(items), [None] * len(items)
    ctx = _load_context(args)
    rows = ctx.predict(queries, choices, normalize=args.normalize, method=args.method, batch_size=args.batch_size,
                       progress=sys.stderr.isatty())
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for i, (row, label) in enumerate(zip(rows, labels)):
            row = {"index": i, **row} | ({"label": label} if label is not None else {})
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if all(label is not None for label in labels):
        key = "prediction_normalized" if args.normalize else "prediction"
        acc = sum(r[key] == label for r, label in zip(rows, labels)) / len(rows)
        print(f"accuracy {100 * acc:.2f} on {len(rows)} labelled queries", file=sys.stderr)
    return 0


def read_inputs(source: str, fmt: str = "auto") -> list:
    """Non-blank input lines: parsed JSON values (JSONL) or plain strings (lines)."""
    if source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if fmt == "auto":
            fmt = "jsonl" if path.suffix in (".jsonl", ".json") else "lines"
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if fmt == "lines":
        return [line for _, line in lines]
    parsed = []
    for n, line in lines:
        try:
            value = json.loads(line)
        except ValueError as e:
            if fmt == "auto":                 # stdin that is not JSONL: plain lines
                return [line for _, line in lines]
            raise ValueError(f"{source}, line {n}: not valid JSON ({e}); use --input-format lines for plain text") from None
        if not isinstance(value, (dict, str)):
            if fmt == "auto":
                return [line for _, line in lines]
            raise ValueError(f"{source}, line {n}: expected a JSON object or string, got {type(value).__name__}")
        parsed.append(value)
    return parsed


def raw_query(item, i: int) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item.get("query"), str):
        return item["query"]
    raise ValueError(f"input {i}: with --choices a JSON object needs a string field \"query\" (got fields "
                     f"{sorted(item)}); use --task T for rows in a task's layout")


def parse_choices(text: str) -> list[str]:
    """'a,b,c' -> [' a', ' b', ' c']; a JSON list of strings is used verbatim."""
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--choices {text!r} starts with '[' but is not a JSON list ({e})") from None
        if not (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
            raise ValueError(f"--choices {text!r}: a JSON list must hold at least one string")
        choices = value
    else:
        parts = [c.strip() for c in text.split(",")]
        empty = [i for i, c in enumerate(parts) if not c]
        if empty:
            raise ValueError(f"--choices {text!r}: choice {empty[0]} is empty; give non-empty comma-separated "
                             "choices, e.g. --choices negative,positive")
        choices = [" " + c for c in parts]
    if len(choices) < 1:
        raise ValueError("--choices needs at least one choice")
    return choices


def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    ctx = _load_context(args)
    print(ctx.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, stop_at_eos=args.stop_at_eos))
    return 0
