"""`deepthink eval`: every selected method on tasks x seeds; resumable; writes results and plots."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_model_args, add_task_flags, parse_method_option, task_from_args

DESCRIPTION = """Compare methods (`deepthink methods` lists them) on tasks x seeds, honestly.

Per (model, task, seed): demonstrations are drawn from the task's training data; dev items from the
rest of it, disjoint from the demonstrations (a method may use them, e.g. to choose T); eval items are
scored once per method and never used to choose anything. `--curve` adds the per-step eval curve of
step-by-step methods, labelled "oracle (chosen on eval)"; no reported number uses it.

Method options, later ones winning:
  --method-config FILE   YAML/JSON {method: {option: value}}
  --steps/--momentum     dt_dev's; --fixed-steps/--fixed-momentum dt_fixed's;
  --step-size/--positions/--update   every selected method that has the option
  -o METHOD.OPTION=VALUE e.g. -o dt_dev.steps=10 -o dt_fixed.rule=momentum
Several variants of one method run side by side as NAME@VARIANT, e.g.
  --methods icl dt_dev dt_dev@gate -o dt_dev@gate.momentum=0
Each finished unit is written atomically to OUT/units/; re-running the same command resumes.
"""

# the first runner's flags, kept: (flag, method or None for every method that has the option, option)
LEGACY = [("steps", "dt_dev", "steps"), ("momentum", "dt_dev", "momentum"), ("fixed_steps", "dt_fixed", "steps"),
          ("fixed_momentum", "dt_fixed", "momentum"), ("step_size", None, "step_size"),
          ("positions", None, "positions"), ("update", None, "update")]


def register(sub) -> None:
    from ..methods import DEFAULT_METHODS
    from ..tuning import POSITIONS, UPDATES

    p = sub.add_parser("eval", help="compare methods on tasks x seeds; resumable; writes results and plots",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, multiple=True)
    p.add_argument("--task", nargs="+", help="task names (see `deepthink tasks`) or task YAML files")
    add_task_flags(p.add_argument_group("a task from flags (instead of --task; docs/tasks.md)"), eval_file=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds: demonstrations, dev and subsets")
    p.add_argument("--shots", type=int, default=1, help="demonstrations per class (stratified tasks) or in "
                   "total (others)")
    p.add_argument("--fit-shots", action="store_true", help="where a method refuses a unit's demonstrations as too "
                   "long for the model, use the largest smaller shot count every method accepts (recorded in the "
                   "unit) instead of stopping")
    m = p.add_argument_group("methods")
    m.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                   help=f"methods to compare (default: {' '.join(DEFAULT_METHODS)}; `deepthink methods` lists all); "
                        "NAME@VARIANT adds another variant of NAME with its own options")
    m.add_argument("-o", "--option", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                   help="set one option of one method (repeatable)")
    m.add_argument("--method-config", metavar="FILE", help="YAML/JSON file {method: {option: value}}")
    m.add_argument("--plugin", action="append", default=[], metavar="FILE.py",
                   help="a Python file registering methods or update rules (repeatable)")
    m.add_argument("--steps", type=int, default=None, help="largest T tried on dev by dt_dev (default: 15)")
    m.add_argument("--step-size", type=float, default=None, help="eta of every tuning method (default: 0.01)")
    m.add_argument("--momentum", type=float, default=None, help="beta of dt_dev (default: 0.9)")
    m.add_argument("--fixed-steps", type=int, default=None, help="T of dt_fixed (default: 5; no dev set)")
    m.add_argument("--fixed-momentum", type=float, default=None, help="beta of dt_fixed (default: 0, the gate form)")
    m.add_argument("--positions", default=None, choices=POSITIONS, help="where the re-encoded copy sits "
                   "(default: shifted)")
    m.add_argument("--update", default=None, choices=UPDATES, help="which of keys/values are updated (default: kv)")
    p.add_argument("--dev-size", type=int, default=128, help="dev items drawn from training data, disjoint "
                   "from the demonstrations (0: no dev set; dt_dev then uses --steps, grad_kv chooses T by "
                   "leave-one-out over the demonstrations)")
    p.add_argument("--max-eval", type=int, default=None, help="score a seeded random subset of N eval items "
                   "(default: every eval item)")
    p.add_argument("--curve", action="store_true", help="also score eval at every step (an oracle curve, "
                   "for analysis only; no reported number uses it)")
    p.add_argument("--batch-size", type=int, default=16, help="queries per forward pass")
    p.add_argument("--data-dir", default=None, help="folder with <task>/{train,eval}.jsonl (default: "
                   "$DEEPTHINK_DATA_DIR, ../shared/data, else the Hugging Face hub)")
    p.add_argument("--out", required=True, help="output folder; re-running the same command resumes there")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: physical cores, shared "
                   "among the processes of a launched run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def method_options(args) -> dict:
    """{method: {option: value}} for the selected methods, from --method-config, legacy flags and -o."""
    from ..methods import get_method, load_plugin_file

    for path in args.plugin:
        load_plugin_file(path)
    names = list(dict.fromkeys(args.methods))
    classes = {n: get_method(n) for n in names}        # unknown names fail here, listing the valid ones
    options: dict[str, dict] = {n: {} for n in names}
    if args.method_config:
        for name, opts in read_method_config(args.method_config).items():
            if name not in options:
                raise ValueError(f"--method-config {args.method_config} sets options of {name!r}, which is not "
                                 f"among --methods ({' '.join(names)}): add it there or remove it from the file")
            options[name].update(opts)
    for dest, only, option in LEGACY:
        value = getattr(args, dest)
        if value is None:
            continue
        for name in ([only] if only else names):
            if name in classes and option in {f for f in classes[name].Config.__dataclass_fields__}:
                options[name][option] = value
    for text in args.option:
        name, option, value = parse_method_option(text, classes)
        options[name][option] = value
    return options


def read_method_config(path) -> dict:
    import yaml

    from ..io import readable_file

    path = readable_file(path, "--method-config")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"--method-config {path} cannot be parsed ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"--method-config {path} must map method names to option tables, e.g. "
                         "{dt_dev: {steps: 10}}")
    return data


def eval_tasks(args) -> list:
    """--task's names, or the one task of --template/--choices/--train/--eval."""
    task = task_from_args(args)
    if task is None:
        raise ValueError("give --task T [T ...], or a task from flags: --template ... --choices ... --train ROWS.jsonl "
                         "--eval ROWS.jsonl")
    if not isinstance(task, list):
        if args.train is None or args.eval is None:
            raise ValueError("a task from flags needs --train ROWS.jsonl (demonstrations and dev items) and --eval "
                             "ROWS.jsonl (the scored rows)")
        return [task]
    return task


def run(args) -> int:
    from ..evaluation import EvalConfig
    from ..evaluation import run as run_eval
    from ..evaluation.distributed import Processes
    from ..models import set_threads

    with Processes(args.device) as procs:       # one process, or one of those a launcher started
        set_threads(procs.threads(args.threads))
        cfg = EvalConfig(shots=args.shots, dev_size=args.dev_size, max_eval=args.max_eval, curve=args.curve,
                         batch_size=args.batch_size, methods=method_options(args), fit_shots=args.fit_shots)
        run_eval(args.model, eval_tasks(args), args.seeds, cfg, args.out, data_dir=args.data_dir, device=args.device,
                 dtype=args.dtype, progress=not args.quiet, quantize=args.quantize, procs=procs)
    return 0
