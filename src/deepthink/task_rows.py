"""Rows in a task's field layout -> (queries, choices, labels): what `deepthink predict --task` and the
server's /v1/predict both apply to their input rows."""
from __future__ import annotations

from .tasks import get_task


def task_queries(name: str, items: list):
    """(queries, per-item continuations, gold labels or None) from input rows in a task's layout."""
    task = get_task(name)
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
