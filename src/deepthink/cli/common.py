"""What several subcommands share: model flags, and flags built from a config dataclass."""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, fields

from ..context_schema import DTYPES
from ..models import DEFAULT_MODEL, REGISTRY


MODEL_ENV = "DEEPTHINK_MODEL"     # the model commands use when --model is not given


def add_model_args(p: argparse.ArgumentParser, multiple: bool = False, from_context: bool = False) -> None:
    """--model/--device/--dtype; with from_context, model and dtype default to what a saved context records."""
    if from_context:
        p.add_argument("--model", default=None, help="model to load (default: the one the context records: its "
                       "registry name, else its folder or hub id); must be the model it was tuned with")
    else:
        default = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
        p.add_argument("--model", default=[default] if multiple else default,
                       nargs="+" if multiple else None,
                       help=f"{'one or more models: ' if multiple else ''}registry name ({', '.join(REGISTRY)}), "
                            f"a local Hugging Face model folder, a hub id, or a .gguf file (default: ${MODEL_ENV} "
                            f"when set, else {DEFAULT_MODEL}; now {default})")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, or auto: spread a model "
                   "too big for one device over the GPUs, CPU memory and disk (accelerate; default: cpu)")
    p.add_argument("--quantize", default=None, choices=["8bit", "4bit"],
                   help="load the weights 8- or 4-bit through bitsandbytes (install it first; needs a CUDA GPU)")
    p.add_argument("--dtype", default=None if from_context else "float32", choices=list(DTYPES),
                   help="weights dtype (default: " + ("the dtype the context was tuned in)" if from_context else
                                                       "float32, the fastest on CPUs)"))


def load_lm(args):
    import torch

    from ..models import load_model

    return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                      quantize=getattr(args, "quantize", None))


KINDS = {"int": int, "float": float, "str": str}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_args(group, cls, skip=()) -> None:
    """One flag per field of the dataclass `cls` (type, default, choices and help from the field)."""
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else None
        if str(f.type) == "bool":
            group.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{f.metadata.get('help', '')} (default: {default})")
            continue
        group.add_argument(flag(f.name), dest=f.name, type=KINDS.get(str(f.type), str), default=default,
                           choices=f.metadata.get("choices"), help=f"{f.metadata.get('help', '')} (default: {default})")


def config_from_args(cls, args, skip=()):
    """`cls` built from the flags of add_config_args; a validation error names the flag, not the field."""
    try:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in skip})
    except ValueError as e:
        msg = str(e)
        for f in fields(cls):
            msg = msg.replace(f"{cls.__name__}.{f.name}", flag(f.name))
            for base in cls.__mro__[1:]:
                msg = msg.replace(f"{base.__name__}.{f.name}", flag(f.name))
        raise ValueError(msg) from None


def parse_value(cls, name: str, text: str):
    """A command-line string as the value of field `name` of dataclass `cls` (YAML scalars: 10, 0.5, true)."""
    import yaml

    kinds = {f.name: str(f.type) for f in fields(cls)}
    if name not in kinds:
        return text          # the caller reports the unknown option with the valid ones
    if kinds[name] == "str":
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if kinds[name] == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def parse_method_option(text: str, classes: dict) -> tuple[str, str, object]:
    """One `-o METHOD.OPTION=VALUE` -> (method, option, value read for the method's config); `classes` maps the
    selected method keys (NAME or NAME@VARIANT) to their classes. A malformed text or a method not selected raises
    a ValueError saying what to write; an unknown option is left to make_method, which lists the valid ones."""
    key, sep, value = text.partition("=")
    name, dot, option = key.strip().rpartition(".")
    if not (sep and dot and name and option):
        raise ValueError(f"-o {text!r}: write METHOD.OPTION=VALUE, e.g. -o dt_dev.steps=10")
    if name not in classes:
        raise ValueError(f"-o {text!r}: method {name!r} is not among --methods ({' '.join(classes)})")
    return name, option, parse_value(classes[name].Config, option, value.strip())


def add_context_args(p: argparse.ArgumentParser) -> None:
    """--context DIR and the model flags, defaulting to what the context records."""
    p.add_argument("--context", required=True, metavar="DIR", help="a folder written by `deepthink tune --out`")
    add_model_args(p, from_context=True)


def load_context(args):
    """The context at --context, loaded for --model (default: the model it records); a context that cannot be
    verified (saved before context.json carried a digest) is loaded with one warning line on stderr."""
    import sys
    import warnings

    from ..context_schema import UnverifiedContextWarning
    from ..infer import load_context as load

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnverifiedContextWarning)
        ctx = load(args.context, model=args.model, dtype=args.dtype, device=args.device,
                   quantize=getattr(args, "quantize", None))
    for w in caught:
        if issubclass(w.category, UnverifiedContextWarning):
            print(f"deepthink {args.command}: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ctx


TEMPLATE_HELP = ("a task from flags: the prompt with the rows' fields in braces, e.g. 'Ticket: {text}\\nUrgency:' "
                 "(\\n is a newline); each answer is ' ' + a --choices name (with --choices; docs/tasks.md)")


def add_task_flags(group, choices: bool = True, eval_file: bool = False) -> None:
    """--template/--choices/--train (and --eval): a task without a YAML file; rows hold the template's fields and
    `label`, a choice's name or its 0-based index. Read with `task_from_args`."""
    group.add_argument("--template", help=TEMPLATE_HELP)
    if choices:
        group.add_argument("--choices", help="with --template: the label names, comma-separated (low,medium,high)")
    group.add_argument("--train", metavar="ROWS.jsonl", help="with --template: labelled training rows (demonstrations "
                       "are drawn from them, dev items are the rows left)")
    if eval_file:
        group.add_argument("--eval", metavar="ROWS.jsonl", help="with --template: labelled rows to score")


def task_from_args(args):
    """The task the flags name: --task as given (a name or a task file), a Task built from --template/--choices
    (--train/--eval), or None. Mixed or incomplete flags are an error that says what to give."""
    from ..tasks import task_from_template

    template, train, evals = (getattr(args, k, None) for k in ("template", "train", "eval"))
    task = getattr(args, "task", None)
    if template is None:
        for flag_, value in (("--train", train), ("--eval", evals)):
            if value is not None:
                raise ValueError(f"{flag_} goes with --template and --choices (a task from flags); a task file names "
                                 "its data in data_files (docs/tasks.md)")
        return task
    if task:
        raise ValueError("give either --task T or --template/--choices (a task from flags), not both")
    if not getattr(args, "choices", None):
        raise ValueError("--template needs --choices: the label names, e.g. --choices low,medium,high")
    template = template.replace("\\n", "\n").replace("\\t", "\t")
    return task_from_template(template, split_names(args.choices), train=train, eval=evals)


def split_names(text: str) -> list[str]:
    """'low, medium,high' -> ['low', 'medium', 'high']; a JSON list of strings is taken as the names."""
    from ..infer import json_strings

    if text.lstrip().startswith("["):
        return json_strings(text)
    return text.split(",")
