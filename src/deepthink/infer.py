"""Tuned contexts as artifacts, as library functions: where demonstrations come from, queries read from
files in a task's layout, and a saved context loaded with the model it records. `deepthink tune |
predict | generate` (cli/) are thin fronts over these."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .context import TunedContext, context_task
from .context_schema import DTYPES, show, task_differences
from .data import make_plan, read_demos_file
from .io import readable_file
from .models import REGISTRY, load_model
from .tasks import Task, get_task


def demonstrations(task: str | None = None, seed: int = 0, shots: int | None = None, data_dir=None,
                   demos: str | None = None) -> tuple[str, dict]:
    """The demonstration string and a record of where it came from: a seeded draw of `shots` per class from
    `task`'s training data, or the file `demos` (JSONL rows in the task's layout, or text used verbatim)."""
    task_name = task
    task = get_task(task_name) if task_name else None
    if demos is None:
        if task is None:
            raise ValueError("give the demonstrations: --task T (with --seed, --shots) or --demos FILE")
        shots = 1 if shots is None else shots
        plan = make_plan(task, seed, shots, dev_size=0, data_dir=data_dir)
        return plan.demonstrations, {"task": task_name, "seed": seed, "shots": shots}
    if shots is not None:
        raise ValueError("--shots sets the size of a draw from --task; it cannot be combined with --demos FILE")
    path = readable_file(demos, "demonstrations file")
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
    return text, {"task": task_name, "demos_file": str(path)}


def demonstration_items(task: str | None = None, seed: int = 0, shots: int | None = None, data_dir=None,
                        demos: str | None = None) -> list:
    """The demonstrations of `demonstrations(...)` as task items (tasks.Example), in prompt order: what a
    method that reads each demonstration's query and answer needs (e.g. gradient KV tuning). A verbatim
    text file has no items: an error."""
    if demos is None:
        if task is None:
            raise ValueError("give the demonstrations: --task T (with --seed, --shots) or --demos FILE.jsonl")
        return list(make_plan(get_task(task), seed, 1 if shots is None else shots, dev_size=0,
                              data_dir=data_dir).demos)
    path = Path(demos)
    if path.suffix != ".jsonl" or task is None:
        raise ValueError(f"{path}: this method needs each demonstration's query and answer, which a verbatim text "
                         "file does not give: use a task draw (--task T --seed S --shots K) or a .jsonl file of "
                         "rows in --task's layout")
    return list(read_demos_file(path, get_task(task)))


def load_context(path, model: str | None = None, dtype: str | None = None, device="cpu", quantize=None):
    """The saved context at `path`, loaded for `model` (default: the model it records) in `dtype` (default:
    the dtype it was tuned in). Refuses another model, tokenizer or dtype, as TunedContext.load does, and a damaged,
    altered or hostile context.json before any model is loaded."""
    import torch

    meta = TunedContext.read_config(path)
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


def predict_task(path, meta: dict, given: str | None = None) -> Task | None:
    """The task whose layout `predict` reads rows in, for the checked context.json `meta` of the context at `path`:
    `given` (--task), else the task definition the context stores, else (a context saved before definitions were
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
    task = get_task(given)
    diff = task_differences(stored, task) if stored is not None else []
    if diff:
        first = diff[0]
        raise ValueError(f"--task {given}: formats rows differently from the task {stored.name!r} that {path} was "
                         f"tuned on (stored in its context.json): {', '.join(diff)} differ ({first}: "
                         f"{show(getattr(task, first))} instead of {show(getattr(stored, first))}); drop --task to "
                         "use the stored task, or give raw queries with --choices")
    return task


def task_queries(name: str | Task, items: list):
    """(queries, per-item continuations, gold labels or None) from input rows in a task's layout (a Task, or the
    name or file of one)."""
    task = name if isinstance(name, Task) else get_task(name)
    placeholder = {"int": 0, "letter": "A", "one_based": 1}   # lets task.example run on unlabelled rows
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


