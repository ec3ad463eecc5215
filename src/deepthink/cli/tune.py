"""`deepthink tune`: tune demonstrations (gradient KV tuning by default, or forward tuning) and save the context."""
from __future__ import annotations

import argparse
import sys
import warnings

from ..tuning import TuningConfig
from ..methods.gradient import GradKVConfig
from .common import add_config_args, add_model_args, config_from_args, flag, load_lm

TUNERS = ("grad_kv", "forward")
SELECTIONS = ("dev-acc", "loo", "last")
GRAD_ONLY = ("steps", "seed", "update", "selection")   # grad flags shared with forward tuning or added here
DEV_SIZE = 64                                           # the dev size the recommendation was measured with

TUNE_HELP = """Tune demonstrations once and save the context to --out (tune once, use anywhere).

Demonstrations come from a task (--task T --seed S --shots K: the paper's draw from the task's
training data, each filled template followed by a blank line) or from --demos FILE:
  * a .jsonl file: rows in --task's field layout (like its train.jsonl), formatted like a task draw;
  * any other file: UTF-8 text used verbatim as the demonstration string (nothing is added or stripped).
With --demos FILE.txt, --task is optional and only recorded, so that `predict` can default to it.

--method grad_kv (the default: the recommended method of benchmarks/results/ABLATIONS.md) optimises the
cache with Adam on a leave-one-out objective (docs/gradient.md), lr 0.01, and keeps the step T in
1..--steps (1 = plain ICL) with the best accuracy on --dev-size dev items drawn from the task's training
data, disjoint from the demonstrations (--selection dev-acc; ties to the smaller T). Without dev items it
chooses by leave-one-out over the demonstrations (--selection loo, an optimistic reading); --selection
last keeps the cache after --steps. It needs each demonstration's query and answer: a task draw or a
.jsonl --demos file. Context.json records the options, the rule and the T chosen under "method".

--method forward is the paper's forward tuning (Deep-Thinking) for --steps steps; it takes verbatim text
demonstrations too. In our measurements it did not beat plain ICL (README, ABLATIONS.md).

--out must not exist or be an empty folder; a folder holding an earlier context is replaced only
with --overwrite (atomically: the old one stays until the new one is complete). If the update
diverges (a non-finite cache), tuning stops at the last finite step, warns, records why in the
artifact, and still saves it (exit code 0).
"""


def register(sub) -> None:
    p = sub.add_parser("tune", help="tune demonstrations and save the context (tune once, use anywhere)",
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
    p.add_argument("--method", default="grad_kv", choices=TUNERS,
                   help="grad_kv: gradient KV tuning, T chosen on dev (the recommended default); forward: the "
                        "paper's forward tuning (default: grad_kv)")
    add_config_args(p.add_argument_group("tuning (TuningConfig; --steps and --update serve both methods)"),
                    TuningConfig)
    g = p.add_argument_group("gradient KV tuning (GradKVConfig; with --method grad_kv)")
    add_config_args(g, GradKVConfig, skip=GRAD_ONLY)
    g.add_argument("--selection", default="dev-acc", choices=SELECTIONS,
                   help="how T in 1..--steps is chosen: dev-acc (accuracy on --dev-size dev items; loo without "
                        "any), loo (leave-one-out over the demonstrations, no dev items) or last (the cache after "
                        "--steps) (default: dev-acc)")
    g.add_argument("--dev-size", dest="dev_size", type=int, default=DEV_SIZE,
                   help=f"dev items for --selection dev-acc, drawn from --task's training data, disjoint from the "
                        f"demonstrations (default: {DEV_SIZE})")
    g.add_argument("--grad-seed", dest="grad_seed", type=int, default=0,
                   help="seed of the batch order of gradient KV tuning (default: 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the context to (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a context already saved in --out")
    p.set_defaults(func=run)


def _configs(args):
    """(TuningConfig, GradKVConfig or None); options of the tuner not chosen must keep their defaults."""
    import dataclasses

    config = config_from_args(TuningConfig, args)
    if args.method == "grad_kv":
        changed = [flag(f.name) for f in dataclasses.fields(TuningConfig)
                   if f.name not in ("steps", "update") and getattr(config, f.name) != f.default]
        if changed:
            raise ValueError(f"{', '.join(changed)} set(s) forward tuning, which is not the default method: add "
                             "--method forward, or drop it")
        if args.dev_size < 0:
            raise ValueError(f"--dev-size must be an integer >= 0, got {args.dev_size}")
        grad = config_from_args(GradKVConfig, args, skip=("seed", "selection"))
        # --selection last has no GradKVConfig counterpart: the method record says it (see run)
        return config, dataclasses.replace(grad, seed=args.grad_seed,
                                           selection="dev-acc" if args.selection == "last" else args.selection)
    changed = [flag(f.name) for f in dataclasses.fields(GradKVConfig)
               if f.name not in GRAD_ONLY and getattr(args, f.name) != f.default]
    changed += [name for name, set_ in (("--selection", args.selection != "dev-acc"),
                                        ("--dev-size", args.dev_size != DEV_SIZE), ("--grad-seed", args.grad_seed != 0))
                if set_]
    if changed:
        raise ValueError(f"{', '.join(changed)} set(s) gradient KV tuning, not --method forward: drop it")
    return config, None


def _items(args) -> list:
    """The demonstrations as task items, which gradient KV tuning needs; a verbatim text file has none."""
    from ..infer import demonstration_items

    try:
        return demonstration_items(args.task, args.seed, args.shots, args.data_dir, args.demos)
    except ValueError as e:
        raise ValueError(f"{e}; or tune them with --method forward (the paper's forward tuning takes any text)") \
            from None


def _dev_items(args, items) -> list:
    """Dev items for --selection dev-acc: drawn like `deepthink eval`'s from the task's training data, disjoint
    from the demonstrations (for a .jsonl --demos file, items with the same text as a demonstration are dropped)."""
    from ..data import make_plan

    if args.selection != "dev-acc" or args.dev_size == 0:
        return []
    plan = make_plan(args.task, args.seed, 1 if args.shots is None else args.shots, dev_size=args.dev_size,
                     data_dir=args.data_dir, demos_file=args.demos)
    seen = {e.demo_text for e in items}
    return [e for e in plan.dev if e.demo_text not in seen]


def _grad_tune(lm, demonstrations: str, items: list, dev: list, grad: GradKVConfig, last: bool):
    """The gradient-tuned context to save: the cache after --steps (last), or at the T the selection chose;
    context.json's "method" records the options, the rule and the T."""
    from ..context import TunedContext
    from ..methods import Setup
    from ..methods.gradient import GradKV, gradient_config
    from ..tuning.gradient import gradient_tune

    options = gradient_config(grad)
    if last:
        ctx = gradient_tune(lm, demonstrations, items, options, progress=sys.stderr.isatty())
        ctx.method = {**ctx.method, "selection": {"rule": "last", "chosen_steps": ctx.steps_done}}
        return ctx
    setup = Setup(lm, demonstrations, dev, demos=items)
    prepared = GradKV(grad).prepare(setup)
    info, best = prepared.info, prepared.scorer
    curve = ([round(c["sum"], 4) for c in info["dev_curve"]] if info["selection_used"] == "dev-acc"
             else [round(c["acc"], 4) for c in info["loo_curve"]])
    record = {"name": GradKV.name, "options": options.to_dict(),
              "selection": {"rule": info["selection_used"], "chosen_steps": info["chosen_steps"],
                            "dev_items": len(dev), "accuracy_curve": curve, "train_loss": info["train_loss"],
                            **({"note": info["note"]} if info.get("note") else {})}}
    return TunedContext(lm, best.keys, best.values, best.prefix_ids, config=None, demonstrations=demonstrations,
                        steps_done=info["chosen_steps"], history=best.history if best.method else [],
                        stopped=best.stopped, method=record)


def run(args) -> int:
    from ..context import check_output_dir
    from ..infer import demonstrations as draw
    from ..tasks import get_task
    from ..tuning.tuner import tune

    config, grad = _configs(args)
    demonstrations, origin = draw(args.task, args.seed, args.shots, args.data_dir, args.demos)        # fails fast on a bad task, split or file
    items = _items(args) if grad else None
    dev = _dev_items(args, items) if grad else []
    out = check_output_dir(args.out, args.overwrite)      # ... and on an unusable --out, before the model loads
    lm = load_lm(args)
    saving = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="non-finite", category=RuntimeWarning)
            if grad is not None:
                ctx = _grad_tune(lm, demonstrations, items, dev, grad, last=args.selection == "last")
            else:
                ctx = tune(lm, demonstrations, config, progress=sys.stderr.isatty())
        ctx.origin = origin
        ctx.task = get_task(args.task) if args.task else None    # stored: a copied context needs no task file
        if ctx.stopped:
            print(f"deepthink tune: warning: {ctx.stopped} (recorded in the artifact)", file=sys.stderr)
        saving = True
        ctx.save(out, overwrite=args.overwrite)
    except KeyboardInterrupt:
        state = ("interrupted while saving: it holds either the complete new context or what it held before, "
                 "never a partial one" if saving else "interrupted before saving: nothing was written")
        print(f"deepthink tune: {out}: {state}", file=sys.stderr)
        return 130
    how = ""
    if grad is not None:
        sel = ctx.method["selection"]
        how = {"none": f" (grad KV: {sel.get('note')})",
               "dev-acc": f" (grad KV, lr {grad.lr:g}: T chosen on {len(dev)} dev items)",
               "loo": f" (grad KV, lr {grad.lr:g}: T chosen by leave-one-out over the demonstrations"
                      f"{', no dev items' if args.selection == 'dev-acc' else ''})",
               "last": f" (grad KV, lr {grad.lr:g}: the cache after --steps {grad.steps})"}[sel["rule"]]
    print(f"saved {out}: {ctx.length} tokens of demonstrations, {ctx.steps_done} steps{how}, {len(ctx.keys)} "
          f"layers, {ctx.nbytes / 1e6:.2f} MB, model {lm.name}")
    return 0
