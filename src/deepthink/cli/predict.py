"""`deepthink predict`: score queries with a saved context (JSONL out)."""
from __future__ import annotations

import argparse
import json
import sys

from ..io import write_atomic
from .common import add_context_args, load_context, task_from_args

PREDICT_HELP = """Score queries with a saved context and print one JSON object per query.

Input (--input FILE, or - for stdin): JSON Lines or plain text lines, one query per line; blank
lines are skipped. --input-format auto (the default) reads .jsonl/.json files as JSONL, other
files as plain lines, and stdin as JSONL when every non-blank line is a JSON object or string.
  --task T        JSONL rows in the task's field layout (like its eval.jsonl; the label field is
                  optional); the task's query template and choices are applied. Plain lines only
                  work for tasks with fixed choices and no hook: the line is the query field.
  --template 'Ticket: {text}\\nUrgency:' --choices low,medium,high
                  a task from flags, as `tune` takes it: JSONL rows holding the template's fields
                  ("label", a choice's name or index, is optional); plain lines fill its one field.
  --choices a,b,c (without --template) each line (or JSON string, or JSON object's "query") is the
                  raw query, used verbatim; the continuations are " a", " b", " c" (comma-separated,
                  each stripped, one space prepended). A JSON list ('[" yes", "!"]') gives them verbatim.
Without any of these, the task the context was tuned with (`tune --task`, or its --template and
--choices): its definition is stored in the context, so no task file is needed. A --task (or
--template/--choices) that formats rows differently from the stored one is refused.

Output (stdout, or --output FILE), per query: index (0-based among non-blank input lines), query,
choices, logprob (summed log-probability per choice), normalized (per token), prediction (argmax of
logprob), prediction_normalized, answer (the predicted choice's text; by normalized with
--normalize), and label when the input row has one (then the accuracy goes to stderr).
"""


def register(sub) -> None:
    p = sub.add_parser("predict", help="score queries with a saved context (JSONL out)",
                       description=PREDICT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_context_args(p)
    what = p.add_argument_group("how inputs become queries (default: the task the context was tuned with)")
    what.add_argument("--task", help="format inputs with this task's template and choices (a name or a task file)")
    what.add_argument("--template", help="a task from flags, as `tune --template` takes it (with --choices as its "
                                         "label names)")
    what.add_argument("--choices", help='with --template: the label names; alone: comma-separated choices '
                                        '("negative,positive") after raw queries, or a JSON list of continuations '
                                        'used verbatim')
    p.add_argument("--input", required=True, metavar="FILE", help="queries: a JSONL or text file, or - for stdin")
    p.add_argument("--input-format", choices=("auto", "jsonl", "lines"), default="auto",
                   help="how to read --input (default: auto, see above)")
    p.add_argument("--output", metavar="FILE", help="write the JSONL here instead of stdout")
    p.add_argument("--normalize", action="store_true", help="'answer' by per-token log-probability")
    p.add_argument("--method", choices=("fast", "naive"), default="fast", help="scoring path (default: fast)")
    p.add_argument("--batch-size", type=int, default=16, help="queries per forward pass (default: 16)")
    p.set_defaults(func=run)


def check_output(output: str | None, source: str) -> None:
    """Refuse, before any work, an --output that would replace the --input or cannot be a file."""
    from pathlib import Path

    from ..io import same_file

    if not output:
        return
    if output == "-":
        raise ValueError("--output -: leave --output out to write to standard output")
    path = Path(output)
    if source != "-" and (same_file(path, source) or path.resolve() == Path(source).resolve()):
        raise ValueError(f"--output {output} is the --input file: the predictions would replace the queries; "
                         "write them to another file")
    if path.is_dir():
        raise ValueError(f"--output {output} is a folder: give a file name")


def run(args) -> int:
    from ..context import TunedContext
    from ..infer import parse_choices, predict_task, raw_query, read_inputs, task_queries

    meta = TunedContext.read_config(args.context)     # a damaged or altered context is refused before anything
    given = task_from_args(args)                       # --task, a task from --template/--choices, or None
    if given is not None and args.template is None and args.choices is not None:
        raise ValueError("give either --task T or --choices a,b,c (raw queries), not both")
    task = None
    if given is not None or args.choices is None:      # else the task the context was tuned with (stored in it)
        task = predict_task(args.context, meta, given)
        if task is None:
            raise ValueError("give --task T or --template/--choices (queries formatted by a task), or --choices "
                             "a,b,c (raw queries)")
    check_output(args.output, args.input)
    items = read_inputs(args.input, args.input_format)
    if not items:
        raise ValueError(f"{args.input} holds no queries (blank lines are skipped)")
    if task is not None:
        queries, choices, labels = task_queries(task, items)
    else:
        cs = parse_choices(args.choices)
        queries, choices, labels = [raw_query(x, i) for i, x in enumerate(items)], [cs] * len(items), [None] * len(items)
    ctx = load_context(args)
    rows = ctx.predict(queries, choices, normalize=args.normalize, method=args.method, batch_size=args.batch_size,
                       progress=sys.stderr.isatty())
    lines = (json.dumps({"index": i, **row} | ({"label": label} if label is not None else {}), ensure_ascii=False)
             + "\n" for i, (row, label) in enumerate(zip(rows, labels)))
    if args.output:
        write_atomic(args.output, "".join(lines))      # whole or not at all (a full disk leaves no partial file)
    else:
        sys.stdout.writelines(lines)
    if all(label is not None for label in labels):
        key = "prediction_normalized" if args.normalize else "prediction"
        acc = sum(r[key] == label for r, label in zip(rows, labels)) / len(rows)
        print(f"accuracy {100 * acc:.2f} on {len(rows)} labelled queries", file=sys.stderr)
    return 0
