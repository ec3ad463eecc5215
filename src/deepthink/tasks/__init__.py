"""Task registry: each task is a small declaration (one YAML file) turned into a `Task`.

A task maps a source row to an `Example`: the query prompt Q and one continuation per
choice, so that choice i's full text is F_i = Q + continuations[i]. Q and F come from
`query_template` / `choice_template`; the template variables are the row's top-level fields,
`{query}` (the row's `query_field`, optionally stripped), `{choice}`, and whatever the task's hook
returns. docs/tasks.md documents every field of a task file. `task_from_template` builds a task
from a template and label names (what `deepthink tune --template ... --choices ...` does).
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import MISSING, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from deepthink.tasks.hooks import HOOKS

BUILTIN_TASKS = (
    "sst2", "sst5", "mr", "agnews", "trec", "copa", "hellaswag", "obqa", "qasc", "winogrande",
    "sentiment-demo",
)
SAMPLING_MODES = ("stratified", "random")
DEMO_POOLS = ("train", "eval")
LABEL_FORMATS: dict[str, Callable[[Any], int]] = {
    "int": int,                                  # 0-based id (an int or a digit string)
    "letter": lambda x: ord(x) - ord("A"),      # "A".. -> 0..
    "one_based": lambda x: int(x) - 1,           # 1 / "1".. -> 0..
    "names": int,                                # a choice's name; an int (or digit string) that names none: 0-based
}
SEPARATOR = "\n\n"           # what follows each demonstration in the demonstration string
TEMPLATE_TASK = "a task from a template and label names"   # the description task_from_template gives


@dataclass(frozen=True)
class Example:
    """One multiple-choice item: choice i's full text is `query + continuations[i]`."""

    query: str
    continuations: tuple[str, ...]
    label: int
    index: int  # 0-based row in the source split file
    split: str  # name of the file it came from ("train", "eval", a demos file's stem)
    separator: str = "\n\n"  # what follows the demonstration in a prompt (a blank line here; another
                                # benchmark's template may end each demonstration otherwise, e.g. StaICC's "\n")

    @property
    def demo_text(self) -> str:
        """The full template F filled with the gold choice (one demonstration line)."""
        return self.query + self.continuations[self.label]

    @property
    def block(self) -> str:
        """The demonstration as a prompt holds it: `demo_text` followed by its separator."""
        return self.demo_text + self.separator


def _opt(help: str, default: Any = MISSING, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: default.copy(), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class Task:
    """A declarative multiple-choice task. Build it from YAML with `load_task_file`."""

    name: str = _opt("registry name, e.g. 'sst2'")
    query_field: str = _opt("row field holding the query text ('a.b' reaches into nested dicts)")
    query_template: str = _opt("Q, the query prompt; must contain {query}")
    choice_template: str = _opt("F, the full text with a choice; must start with query_template "
                                "and contain {choice}")
    description: str = _opt("one-line description", "")
    hf_dataset: str | None = _opt("HuggingFace dataset id, used when no local data exists", None)
    hf_config: str | None = _opt("HuggingFace dataset config (subset)", None)
    hf_splits: dict = _opt("local split name -> HF split name", {"train": "train", "eval": "validation"},
                           hash=False)
    data_files: dict | None = _opt("local split name -> JSONL file used instead of the data folder; "
                                   "relative paths are relative to the task file", None, hash=False)
    strip_query: bool = _opt("apply str.strip() to the query field", False)
    label_field: str = _opt("row field holding the gold label", "label")
    label_format: str = _opt(f"how to read the label: one of {sorted(LABEL_FORMATS)}", "int")
    choices: tuple[str, ...] | None = _opt("fixed label words in label-id order (None: per item)", None)
    choices_field: str | tuple[str, ...] | None = _opt(
        "per-item choices: one field holding a list, or a list of fields holding one choice each", None)
    hook: str | None = _opt(f"row hook adding/overriding template variables: one of {sorted(HOOKS)}", None)
    sampling: str = _opt("'stratified': k demos per label, label groups in first-appearance order, "
                         "then one shuffle (falls back to 'random' without fixed choices); "
                         "'random': k demos in total", "stratified")
    scored_subset: int | None = _opt("score only this many eval rows, drawn first from the seed's "
                                     "stream (drawn order = scoring order)", None)
    demo_pool: str = _opt("where demos and dev items come from: 'train', or 'eval' (rows that are "
                          "not scored) when there is no train split", "train")
    quirks: tuple[str, ...] = _opt("reference quirks this declaration reproduces", ())
    deviations: tuple[str, ...] = _opt("known differences from the reference; copied into plan notes", ())

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"task {self.name!r}: field '{name}' {msg}")

        def is_strs(x: Any) -> bool:
            return isinstance(x, tuple) and all(isinstance(s, str) for s in x)

        for name in ("name", "query_field", "query_template", "choice_template", "description",
                     "label_field", "label_format", "sampling", "demo_pool"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, f"must be a string, got {getattr(self, name)!r}")
        for name in ("hf_dataset", "hf_config", "hook"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise bad(name, f"must be a string or null, got {getattr(self, name)!r}")
        if not self.name or "/" in self.name:
            raise bad("name", "must be a non-empty name without '/'")
        if "{query}" not in self.query_template:
            raise bad("query_template", "must contain {query}")
        if "{choice}" not in self.choice_template or not self.choice_template.startswith(self.query_template):
            raise bad("choice_template", "must start with query_template and contain {choice} "
                      "(so that F = Q + continuation)")
        if not isinstance(self.strip_query, bool):
            raise bad("strip_query", f"must be true or false, got {self.strip_query!r}")
        for name, valid in (("sampling", SAMPLING_MODES), ("demo_pool", DEMO_POOLS),
                            ("label_format", tuple(LABEL_FORMATS)), ("hook", tuple(HOOKS))):
            value = getattr(self, name)
            if value is not None and value not in valid:
                raise bad(name, f"must be one of {sorted(valid)}, got {value!r}")
        if (self.choices is None) == (self.choices_field is None):
            raise bad("choices", "and 'choices_field': give exactly one (fixed words / per-item choices)")
        if self.choices is not None and not (is_strs(self.choices) and self.choices):
            raise bad("choices", f"must be a non-empty list of strings, got {self.choices!r}")
        if self.choices_field is not None and not (isinstance(self.choices_field, str)
                                                   or is_strs(self.choices_field)):
            raise bad("choices_field", f"must be a field name or a list of them, got {self.choices_field!r}")
        for name in ("quirks", "deviations"):
            if not is_strs(getattr(self, name)):
                raise bad(name, f"must be a list of strings, got {getattr(self, name)!r}")
        if self.scored_subset is not None and (type(self.scored_subset) is not int or self.scored_subset < 1):
            raise bad("scored_subset", f"must be a positive integer or null, got {self.scored_subset!r}")
        for name in ("hf_splits", "data_files"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, dict)
                                          and all(isinstance(v, str) for v in value.values())):
                raise bad(name, f"must map split names to strings, got {value!r}")

    @property
    def stratified(self) -> bool:
        """Whether demos are drawn per label (needs fixed label words)."""
        return self.sampling == "stratified" and self.choices is not None

    def label(self, row: dict, choices: Sequence[str] | None = None) -> int:
        """The gold choice index of a source row. A string label that names one of the choices (`choices`, default
        the task's fixed ones; compared after stripping spaces) is that choice in every format; with
        label_format 'names' names come first, otherwise the format's own reading does."""
        value = _get(row, self.label_field)
        names = [c.strip() for c in (self.choices if choices is None else choices) or ()]
        named = value.strip() in names if isinstance(value, str) else False
        if named and self.label_format == "names":
            return names.index(value.strip())
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError
            return LABEL_FORMATS[self.label_format](value)
        except (TypeError, ValueError):
            if named:
                return names.index(value.strip())
            valid = (f"one of the names {', '.join(names)}" if names else "a choice's name") + \
                f" or {_FORMAT_HELP[self.label_format]}"
            raise ValueError(f"label {value!r} matches no choice: expected {valid}") from None

    def example(self, row: dict, index: int, split: str) -> Example:
        """Turn one source row into an `Example` (Q, continuations, gold label)."""
        where = f"task {self.name!r}, {split} row {index}"
        try:
            query = _get(row, self.query_field)
            values = {k: v for k, v in row.items() if isinstance(k, str) and k not in ("query", "choice")} \
                if isinstance(row, dict) else {}
            values["query"] = query.strip() if self.strip_query else query
            if self.hook is not None:
                values |= HOOKS[self.hook](row)
            if self.choices is not None:
                choices = list(self.choices)
            elif isinstance(self.choices_field, str):
                choices = list(_get(row, self.choices_field))
            else:
                choices = [_get(row, f) for f in self.choices_field]
            label = self.label(row, choices)
            try:
                q = self.query_template.format(**values)
                full = [self.choice_template.format(**values, choice=c) for c in choices]
            except KeyError as e:
                raise ValueError(f"the template needs the field {e.args[0]!r}, which the row lacks (its fields: "
                                 f"{', '.join(sorted(map(str, row)))})") from None
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e if isinstance(e, ValueError) else repr(e)}") from e
        if not 0 <= label < len(choices):
            raise ValueError(f"{where}: label {label} out of range for {len(choices)} choices "
                             f"({', '.join(map(str, choices))})")
        if not all(f.startswith(q) for f in full):
            raise ValueError(f"{where}: filled choice_template does not start with filled query_template")
        return Example(q, tuple(f[len(q):] for f in full), label, index, split)

    def parse_demonstrations(self, text: str, source: str = "the demonstrations") -> list[Example]:
        """Split a demonstration string on the separator (a blank line) and read each block's query and answer
        from the choice template: a block must be the template filled with one of the task's choices. Blocks
        that do not match are refused by number (1-based). Needs fixed choices."""
        if self.choices is None:
            raise ValueError(f"task {self.name!r} has per-item choices, which a demonstration text does not give: "
                             "write the demonstrations as .jsonl rows in the task's layout")
        blocks = text.replace("\r\n", "\n").split(SEPARATOR)          # a file saved with Windows line ends too
        while blocks and not blocks[-1].strip():
            blocks.pop()
        if blocks and blocks[-1].endswith("\n"):
            blocks[-1] = blocks[-1].rstrip("\n")            # a final single newline
        pattern = self._pattern()
        out = []
        for n, block in enumerate(blocks, 1):
            m = pattern.fullmatch(block)
            if m is None:
                shown = block if len(block) <= 80 else block[:77] + "..."
                raise ValueError(f"{source}: demonstration {n} of {len(blocks)} does not match the template "
                                 f"{self.choice_template!r} with a choice among {', '.join(self.choices)}: {shown!r} "
                                 f"(demonstrations are separated by a blank line)")
            values = {k[2:]: v for k, v in m.groupdict().items() if k.startswith("f_") and v is not None}
            label = self.choices.index(m.group("choice"))
            q = self.query_template.format(**values)
            full = [self.choice_template.format(**values, choice=c) for c in self.choices]
            out.append(Example(q, tuple(f[len(q):] for f in full), label, n - 1, "demonstrations"))
        if not out:
            raise ValueError(f"{source} holds no demonstrations")
        return out

    def _pattern(self) -> re.Pattern:
        """A regex that matches choice_template filled with any fixed choice; fields are named groups f_<name>."""
        parts, seen = [], set()
        for literal, name, spec, conv in string.Formatter().parse(self.choice_template):
            parts.append(re.escape(literal))
            if name is None:
                continue
            if name == "choice":
                parts.append("(?P<choice>" + "|".join(map(re.escape, sorted(self.choices, key=len, reverse=True)))
                             + ")")
            elif name in seen:
                parts.append(f"(?P=f_{name})")
            else:
                seen.add(name)
                parts.append(f"(?P<f_{name}>.*?)")
        return re.compile("".join(parts), re.DOTALL)


_FORMAT_HELP = {"int": "a 0-based index", "letter": "a letter A, B, ...", "one_based": "a 1-based index",
                "names": "a 0-based index"}


def _get(row: dict, path: str) -> Any:
    top = row
    for key in path.split("."):
        if not isinstance(row, dict) or key not in row:
            has = f" (its fields: {', '.join(sorted(map(str, top)))})" if isinstance(top, dict) else ""
            raise ValueError(f"missing field {path!r}{has}")
        row = row[key]
    return row


def _from_mapping(data: Any, source: str, base: Path) -> Task:
    """Build a Task from a parsed YAML/JSON mapping; errors name `source` and the field."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a task file must hold a mapping of fields, got {type(data).__name__}")
    valid = {f.name: f for f in fields(Task)}
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; valid fields: {sorted(valid)}")
    for f in valid.values():
        if f.name not in data and f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{source}: missing required field '{f.name}' ({f.metadata['help']})")
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    if isinstance(data.get("data_files"), dict):
        data["data_files"] = {k: str(base / v) if isinstance(v, str) else v
                              for k, v in data["data_files"].items()}
    try:
        return Task(**data)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def load_task_file(path: str | Path) -> Task:
    """Load a user task declaration (.yaml, .yml or .json)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read task file: {e}") from None
    return _from_mapping(data, str(path), path.resolve().parent)


def task_from_template(template: str, choices: Sequence[str], train: str | Path | None = None,
                       eval: str | Path | None = None, name: str | None = None) -> Task:
    """The task `deepthink tune --template T --choices a,b,c` builds: rows hold the template's fields plus
    `label` (a choice's name, or its 0-based index); query Q = the filled template; choice i's answer is
    " " + choices[i] (as in the built-in tasks). `train` / `eval`: JSONL files of such rows (optional)."""
    fields_ = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None] \
        if isinstance(template, str) else []
    if not isinstance(template, str) or not fields_:
        raise ValueError(f"--template {template!r} names no field: write the prompt with the row's fields in braces, "
                         "e.g. --template 'Ticket: {text}\\nUrgency:'")
    if any(spec or conv for _, f, spec, conv in string.Formatter().parse(template) if f is not None):
        raise ValueError(f"--template {template!r}: write plain fields such as {{text}}, without a format "
                         "spec or conversion")
    bad = [f for f in fields_ if not f.isidentifier() or f == "choice"]
    if bad:
        raise ValueError(f"--template {template!r}: {bad[0]!r} is not a usable field name (use plain names such as "
                         "{text}; {choice} is reserved for the answer)")
    choices = [c.strip() for c in choices]
    if not choices or not all(choices):
        raise ValueError("--choices needs non-empty label names, e.g. --choices low,medium,high")
    if len(set(choices)) != len(choices):
        raise ValueError(f"--choices has duplicate names: {', '.join(choices)}")
    first = fields_[0]
    query_template = "".join(_escape(lit) + ("" if f is None else "{" + ("query" if f == first else f) + "}")
                             for lit, f, _, _ in string.Formatter().parse(template))
    files = {k: str(Path(v)) for k, v in (("train", train), ("eval", eval)) if v is not None}
    if name is None:
        name = re.sub(r"[^\w.-]+", "-", Path(train).stem) if train is not None else "custom"
    return Task(name=name or "custom", query_field=first, query_template=query_template,
                choice_template=query_template + " {choice}", description=TEMPLATE_TASK,
                data_files=files or None, choices=tuple(choices), label_format="names", sampling="stratified")


def template_of(task: Task) -> str | None:
    """The --template a task of `task_from_template` was built from (None for any other task)."""
    if task.description != TEMPLATE_TASK:
        return None
    return "".join(_escape(lit) + ("" if f is None else "{" + (task.query_field if f == "query" else f) + "}")
                   for lit, f, _, _ in string.Formatter().parse(task.query_template))


def _escape(literal: str) -> str:
    return literal.replace("{", "{{").replace("}", "}}")


def list_tasks() -> list[str]:
    """Names of the built-in tasks: the ten paper tasks, then 'sentiment-demo'."""
    return list(BUILTIN_TASKS)


def get_task(name: str) -> Task:
    """A built-in task by name, or a user task file if `name` ends in .yaml/.yml/.json."""
    if name.endswith((".yaml", ".yml", ".json")):
        return load_task_file(name)
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(BUILTIN_TASKS)} "
                         "(or a path to a .yaml/.json task file)")
    folder = resources.files(__name__)  # the YAML files; built-in data_files are relative to deepthink/
    text = (folder / f"{name}.yaml").read_text(encoding="utf-8")
    return _from_mapping(yaml.safe_load(text), f"built-in task {name}", Path(str(folder)).parent)


def describe_tasks() -> str:
    """A readable listing of every built-in task with its templates."""
    blocks = []
    for name in BUILTIN_TASKS:
        t = get_task(name)
        source = t.hf_dataset + (f"/{t.hf_config}" if t.hf_config else "") if t.hf_dataset else "package data"
        choices = " | ".join(t.choices) if t.choices else f"per item ({t.choices_field})"
        k = "k per label" if t.stratified else "k in total"
        scored = f"{t.scored_subset} seeded eval rows" if t.scored_subset else "all eval rows"
        blocks.append("\n".join([
            f"{name}: {t.description}",
            f"  Q        {t.query_template!r}",
            f"  F        {t.choice_template!r}",
            f"  choices  {choices}",
            f"  data     {source}; demos from {t.demo_pool} ({t.sampling}, {k}); scores {scored}",
        ]))
    return "\n\n".join(blocks)
