"""`deepthink tune`: forward-tune demonstrations and save the context."""
from __future__ import annotations

import argparse
import sys
import warnings

from ..tuning import TuningConfig
from ..tuning.gradient import GradientConfig
from .common import add_config_args, add_model_args, config_from_args, flag, load_lm

TUNERS = ("forward", "grad_kv")

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

--method grad_kv optimises the cache with Adam on a leave-one-out objective instead (docs/gradient.md):
the demonstrations must be items (a task draw or a .jsonl --demos file), --steps counts as in forward
tuning (1 = plain ICL, step t after t - 1 Adam updates), and the cache after step --steps is saved,
its objective and options recorded in context.json under "method". To choose the step count on dev
items, run `deepthink eval --methods grad_kv` instead.
"""


def register(sub) -> None:
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
    p.add_argument("--method", default="forward", choices=TUNERS,
                   help="forward: forward tuning (the paper's method); grad_kv: gradient KV tuning (default: forward)")
    add_config_args(p.add_argument_group("tuning (TuningConfig)"), TuningConfig)
    g = p.add_argument_group("gradient KV tuning (GradientConfig; with --method grad_kv; --steps and --update as "
                                                             "above)")
    add_config_args(g, GradientConfig, skip=("steps", "seed", "update"))
    g.add_argument("--grad-seed", dest="grad_seed", type=int, default=0,
                   help="seed of the batch order of gradient KV tuning (default: 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the context to (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a context already saved in --out")
    p.set_defaults(func=run)


def _configs(args):
    """(TuningConfig, GradientConfig or None); options of the tuner not chosen must keep their defaults."""
    import dataclasses

    config = config_from_args(TuningConfig, args)
    grad = dataclasses.replace(config_from_args(GradientConfig, args, skip=("seed",)), seed=args.grad_seed)
    if args.method == "grad_kv":
        changed = [flag(f.name) for f in dataclasses.fields(TuningConfig)
                   if f.name not in ("steps", "update") and getattr(config, f.name) != f.default]
        if changed:
            raise ValueError(f"{', '.join(changed)} set(s) forward tuning, not --method grad_kv: drop it")
        return config, grad
    changed = [flag(f.name) for f in dataclasses.fields(GradientConfig)
               if f.name not in ("steps", "seed", "update") and getattr(grad, f.name) != f.default]
    if args.grad_seed != 0:
        changed.append("--grad-seed")
    if changed:
        raise ValueError(f"{', '.join(changed)} set(s) gradient KV tuning: add --method grad_kv, or drop it")
    return config, None


def run(args) -> int:
    from ..context import check_output_dir
    from ..infer import demonstration_items
    from ..infer import demonstrations as draw
    from ..tuning.gradient import gradient_tune
    from ..tuning.tuner import tune

    config, grad = _configs(args)
    demonstrations, origin = draw(args.task, args.seed, args.shots, args.data_dir, args.demos)        # fails fast on a bad task, split or file
    items = demonstration_items(args.task, args.seed, args.shots, args.data_dir, args.demos) if grad else None
    out = check_output_dir(args.out, args.overwrite)      # ... and on an unusable --out, before the model loads
    lm = load_lm(args)
    saving = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="non-finite", category=RuntimeWarning)
            if grad is not None:
                ctx = gradient_tune(lm, demonstrations, items, grad, progress=sys.stderr.isatty())
            else:
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
