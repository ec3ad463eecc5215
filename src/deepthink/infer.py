"""Tuned contexts as artifacts, as library functions: queries read from files in a task's layout, and a saved
context loaded with the model it records. `deepthink predict | generate` (cli/) are thin fronts over these;
where demonstrations come from and how they are tuned is `deepthink.api` (`deepthink.tune`)."""
from __future__ import annotations

import json
import sys

from .context import TunedContext, context_task
from .context_schema import DTYPES, show, task_differences
from .io import readable_file, text_problem
from .models import REGISTRY, load_model
from .tasks import Task, get_task


def load_context(path, model: str | None = None, dtype: str | None = None, device="cpu", quantize=None):
    """The saved context at `path`, loaded for `model` (default: the model it records) in `dtype` (default:
    the dtype it was tuned in). Refuses another model, tokenizer or dtype, as TunedContext.load does, and a damaged,
    altered or hostile context.json before any model is loaded."""
    import torch

    meta = TunedContext.read_config(path)
    from .adapter import require_peft

    require_peft(meta)                 # the install hint before the model loads: its adapter goes into the model
    m = meta["model"]
    if model is None:
        if m["name"] in REGISTRY:
            model = m["name"]
        elif m["source"] != "in-memory":
            model = m["source"]
        else:
            raise ValueError(f"{path} was tuned with an in-memory model ({m['name']!r}); pass the model (--model)")
    if dtype is None:
        dtype = meta["dtype"]
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one contexts are loaded in; allowed: {', '.join(DTYPES)}")
    lm = load_model(model, device=device, dtype=getattr(torch, dtype), quantize=quantize)
    return TunedContext.load(path, lm)


def read_inputs(source: str, fmt: str = "auto") -> list:
    """Non-blank input lines: parsed JSON values (JSONL) or plain strings (lines)."""
    if source == "-":
        text = sys.stdin.read()
    else:
        path = readable_file(source, "input file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if fmt == "auto":
            fmt = "jsonl" if path.suffix in (".jsonl", ".json") else "lines"
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for n, line in lines:                     # stdin's undecodable bytes arrive as lone surrogates
        _check_text(line, f"{source}, line {n}")
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
        _check_text(value, f"{source}, line {n}")
        parsed.append(value)
    return parsed


def _check_text(value, where: str) -> None:
    """Refuse text a tokenizer cannot take (a lone surrogate, e.g. the JSON escape \\ud800), naming where it is."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise ValueError(f"{where}: the text {problem}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(v, f"{where}, field {k!r}")
    elif isinstance(value, list):
        for v in value:
            _check_text(v, where)


def raw_query(item, i: int) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item.get("query"), str):
        return item["query"]
    raise ValueError(f"input {i}: with --choices a JSON object needs a string field \"query\" (got fields "
                     f"{sorted(item)}); use --task T for rows in a task's layout")


def json_strings(text: str, flag: str = "--choices") -> list[str]:
    """`text`, a JSON list of at least one string, as that list; else an error naming `flag`."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{flag} {text!r} starts with '[' but is not a JSON list ({e})") from None
    if not (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
        raise ValueError(f"{flag} {text!r}: a JSON list must hold at least one string")
    return value


def parse_choices(text: str) -> list[str]:
    """'a,b,c' -> [' a', ' b', ' c']; a JSON list of strings is used verbatim."""
    if text.lstrip().startswith("["):
        choices = json_strings(text)
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


def predict_task(path, meta: dict, given: str | Task | None = None) -> Task | None:
    """The task whose layout `predict` reads rows in, for the checked context.json `meta` of the context at `path`:
    `given` (--task, or a Task from --template/--choices), else the task definition the context stores, else (a context saved before definitions were
    stored) the task its origin names, else None. A `given` task that formats rows differently from the stored
    definition is refused: the context was tuned on the stored one."""
    stored = context_task(meta, path)
    if given is None:
        if stored is not None:
            return stored
        name = (meta.get("origin") or {}).get("task")
        if name is None:
            return None
        try:
            return get_task(name)
        except ValueError as e:
            if not name.endswith((".yaml", ".yml", ".json")):
                raise
            raise ValueError(f"{e} ({path} was saved before contexts stored their task, and names the task file "
                             f"{name!r} relative to the folder `tune` ran in: run predict there, or pass --task FILE)"
                             ) from None
    task = given if isinstance(given, Task) else get_task(given)
    diff = task_differences(stored, task) if stored is not None else []
    if diff:
        first = diff[0]
        what = f"--task {given}" if isinstance(given, str) else "--template/--choices"
        raise ValueError(f"{what}: formats rows differently from the task {stored.name!r} that {path} was "
                         f"tuned on (stored in its context.json): {', '.join(diff)} differ ({first}: "
                         f"{show(getattr(task, first))} instead of {show(getattr(stored, first))}); drop --task to "
                         "use the stored task, or give raw queries with --choices")
    return task


def task_queries(name: str | Task, items: list):
    """(queries, per-item continuations, gold labels or None) from input rows in a task's layout (a Task, or the
    name or file of one)."""
    task = name if isinstance(name, Task) else get_task(name)
    placeholder = {"int": 0, "letter": "A", "one_based": 1, "names": 0}   # lets task.example run on unlabelled rows
    queries, choices, labels = [], [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if task.choices is None or task.hook is not None:
                raise ValueError(f"task {task.name!r} needs JSONL rows in its field layout (its query is built "
                                 f"from several fields or its choices differ per item); input {i} is plain text")
            item = _nested(task.query_field, item)
        if not isinstance(item, dict):
            raise ValueError(f"input {i}: expected a JSON object in task {task.name!r}'s layout, got {item!r}")
        label = None
        if _has(item, task.label_field):
            label = task.example(item, i, "input").label      # checks the label against the choices
        else:
            item = _with(item, task.label_field, placeholder[task.label_format])
        ex = task.example(item, i, "input")
        queries.append(ex.query)
        choices.append(list(ex.continuations))
        labels.append(label)
    return queries, choices, labels


def _nested(path: str, value) -> dict:
    for key in reversed(path.split(".")):
        value = {key: value}
    return value


def _has(row: dict, path: str) -> bool:
    for key in path.split("."):
        if not isinstance(row, dict) or key not in row:
            return False
        row = row[key]
    return True


def _with(row: dict, path: str, value) -> dict:
    """A copy of `row` with the (possibly nested) field `path` set."""
    keys = path.split(".")
    row = dict(row)
    node = row
    for key in keys[:-1]:
        node[key] = dict(node.get(key) or {})
        node = node[key]
    node[keys[-1]] = value
    return row


