"""`deepthink tune`: tune demonstrations (gradient KV tuning by default; forward tuning, ct_kv or a peft baseline)
and save the context."""
from __future__ import annotations

import argparse
import sys
import warnings

from ..tuning import TuningConfig
from ..methods.gradient import GradKVConfig
from ..api import DEV_SIZE, GUARDED, METHODS as TUNERS, PEFT_METHODS, SELECTIONS, reads_dev, selection_summary
from .common import add_config_args, add_model_args, add_task_flags, config_from_args, flag, load_lm, task_from_args

GRAD_ONLY = ("steps", "seed", "update", "selection", "level")   # flags shared with forward tuning or added here

TUNE_HELP = """Tune demonstrations once and save the context to --out (tune once, use anywhere).

Demonstrations come from a task's training data, drawn with --seed S --shots K (K per label; each filled
template followed by a blank line), or from --demos FILE. The task is --task T (a built-in name or a task
.yaml file, docs/tasks.md) or one from flags, which needs no file:
  --train rows.jsonl --template 'Ticket: {text}\\nUrgency:' --choices low,medium,high
  (each row holds the template's fields and "label": a choice's name or its 0-based index; the answer
  after the template is " " + the choice's name). No eval file is read.
--demos FILE: a .jsonl file of rows in the task's layout; any other file is UTF-8 text: split into
demonstrations on the blank line that ends each, each read with the task's template (grad_kv), or used
verbatim (--method forward, where the task is optional and only recorded).

--method grad_kv (the default: the recommended method of benchmarks/results/ABLATIONS.md) optimises the
cache with Adam on a leave-one-out objective (docs/gradient.md), lr 0.01, and keeps the step T in
1..--steps (1 = plain ICL) with the best accuracy on up to --dev-size dev items: the training rows left
after the demonstrations (--selection dev-acc; ties to the smaller T). Without any it chooses by
leave-one-out over the demonstrations (optimistic) and warns; --selection loo chooses that way on purpose,
--selection last keeps the cache after --steps. --selection dev-mcnemar / dev-bootstrap are guarded: T = 1
(plain ICL) unless some T > 1 beats it on the same dev items by a paired test at --level (default 0.1);
without dev items they keep T = 1 and warn. Context.json records the options, the rule and the T chosen
under "method". Each step prints its loss, dev accuracy, elapsed time and ETA on stderr (--quiet: not).

--method forward is the paper's forward tuning (Deep-Thinking) for --steps steps; it takes verbatim text
demonstrations. In our measurements it did not beat plain ICL (README, ABLATIONS.md).

--method ct_kv | lora | lora_icl | ia3 | prefix | prompt | cpt: the method as `deepthink eval` runs it (the same
code), for deploying the one your own `deepthink eval` found best; `deepthink methods` lists their options, set
with -o OPTION=VALUE (repeatable; -o METHOD.OPTION=VALUE as eval writes it works too), e.g.
  deepthink tune --task sst2 --method ct_kv -o epochs=50 --out ctx/sst2-ctkv
  deepthink tune --task sst2 --method lora -o steps=10 -o lr=0.001 --out ctx/sst2-lora
ct_kv is CT-KV's recipe (AdamW 1e-3, cosine, E = 200 epochs): the cache after epoch E, or with -o
selection=dev-acc the recorded epoch best on --dev-size dev items; an ordinary cache context. The peft
baselines (pip install 'deepthink[peft]') keep the step in 0..steps best on --dev-size dev items (ties to
fewer; the last step without dev items, with a warning) and save their adapter in peft's own format in
--out/adapter (adapter_config.json, adapter_model.safetensors: PeftModel.from_pretrained reads it) beside the
context. lora, lora_icl and ia3 answer with the adapter in the model (zero-shot; lora_icl with the
demonstrations in the prompt): predict, generate and serve put it in when they load the context. prefix,
prompt and cpt answer with peft's prompt as an ordinary prefix cache, which needs no peft to use.

The same as Python: deepthink.tune(lm, task_or_demonstrations, method=..., ...) (README, Library).

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
    src.add_argument("--demos", metavar="FILE", help="demonstrations file instead of a draw: .jsonl rows in the "
                                                     "task's layout, or text (split by the task's template for "
                                                     "grad_kv, verbatim for --method forward)")
    add_task_flags(p.add_argument_group("a task from flags (instead of --task)"))
    p.add_argument("--method", default="grad_kv", choices=TUNERS,
                   help="grad_kv: gradient KV tuning, T chosen on dev (the recommended default); forward: the "
                        "paper's forward tuning; ct_kv: CT-KV's recipe; lora, lora_icl, ia3, prefix, prompt, cpt: the "
                        "peft baselines, saved with their adapter (default: grad_kv)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="OPTION=VALUE",
                   help="one option of --method ct_kv or a peft baseline (repeatable; `deepthink methods` lists "
                        "them), e.g. -o epochs=50; -o METHOD.OPTION=VALUE works too")
    add_config_args(p.add_argument_group("tuning (TuningConfig; --steps and --update serve both methods)"),
                    TuningConfig)
    g = p.add_argument_group("gradient KV tuning (GradKVConfig; with --method grad_kv)")
    add_config_args(g, GradKVConfig, skip=GRAD_ONLY)
    g.add_argument("--selection", default="dev-acc", choices=SELECTIONS,
                   help="how T in 1..--steps is chosen: dev-acc (accuracy on --dev-size dev items; loo without "
                        "any), dev-mcnemar / dev-bootstrap (T = 1 unless a T beats it on the dev items by a paired "
                        "test at --level; T = 1 without any), loo (leave-one-out over the demonstrations, no dev "
                        "items) or last (the cache after --steps) (default: dev-acc)")
    g.add_argument("--level", type=float, default=None,
                   help="threshold of the guarded rules, 0 < level < 1: with dev-mcnemar a T > 1 must beat T = 1 on "
                        "the dev items with a one-sided sign-test p-value <= level; with dev-bootstrap the level "
                        "quantile of its bootstrapped dev accuracy gain must be above 0. Smaller is stricter "
                        f"(default: {GradKVConfig.level}; only with --selection {' or '.join(GUARDED)})")
    g.add_argument("--dev-size", dest="dev_size", type=int, default=DEV_SIZE,
                   help=f"dev items for --selection dev-acc, dev-mcnemar and dev-bootstrap (and for the peft "
                        f"baselines, and ct_kv with -o selection=dev-acc), drawn from the task's training rows that "
                        f"are not demonstrations (default: {DEV_SIZE})")
    g.add_argument("--grad-seed", dest="grad_seed", type=int, default=0,
                   help="seed of the batch order of gradient KV tuning (default: 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the context to (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a context already saved in --out")
    p.add_argument("--quiet", action="store_true", help="no per-step progress lines on stderr")
    p.set_defaults(func=run)


def _flags_changed(args) -> list[tuple[str, str]]:
    """(flag, option name) of each grad_kv / forward flag set to other than its default."""
    import dataclasses

    out = [(flag(f.name), f.name) for cls in (TuningConfig, GradKVConfig) for f in dataclasses.fields(cls)
           if f.name not in ("seed", "selection", "level") and getattr(args, f.name, f.default) != f.default]
    out += [(name, option) for name, option, set_ in (
        ("--selection", "selection", args.selection != "dev-acc"), ("--grad-seed", "seed", args.grad_seed != 0),
        ("--level", "level", args.level is not None)) if set_]
    return list(dict.fromkeys(out))


def _method_config(args):
    """The config of --method ct_kv or a peft baseline, from -o; grad_kv's and forward's flags are refused."""
    import dataclasses

    from .. import api
    from ..methods import get_method
    from .common import parse_method_option

    method, cls = args.method, api.config_class(args.method)
    known = {f.name for f in dataclasses.fields(cls)}
    changed = _flags_changed(args)
    if changed:
        hints = [f"-o {option}=..." for _, option in changed if option in known]
        raise ValueError(f"{', '.join(f for f, _ in changed)}: option(s) of grad_kv / forward tuning, not of --method "
                         f"{method}: drop them" + (f"; {method}'s own are set with -o, e.g. {hints[0]}" if hints else
                                                   f"; {method}'s options ({', '.join(sorted(known))}) are set with "
                                                   "-o OPTION=VALUE"))
    options = {}
    for text in args.option:
        key = text.partition("=")[0]
        name, option, value = parse_method_option(text if "." in key else f"{method}.{text}",
                                                  {method: get_method(method)})
        options[option] = value
    try:
        config = api.make_config(method, **options)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e).replace(f"{cls.__name__}.", "-o ").replace("method ", "--method ", 1)) from None
    selection = config.selection if method == "ct_kv" else "dev-acc"
    if args.dev_size not in (DEV_SIZE, 0) and not reads_dev(method, selection):
        raise ValueError(f"--dev-size: ct_kv with selection {selection} reads no dev items (the cache after the last "
                         "epoch): drop --dev-size, or add -o selection=dev-acc")
    if args.dev_size < 0:
        raise ValueError(f"--dev-size must be an integer >= 0, got {args.dev_size}")
    return config, selection


def _configs(args):
    """(TuningConfig, GradKVConfig or None); options of the tuner not chosen must keep their defaults."""
    import dataclasses

    if args.option:
        raise ValueError(f"-o sets options of --method ct_kv and the peft baselines; --method {args.method}'s "
                         "options are flags (`deepthink tune --help`)")
    config = config_from_args(TuningConfig, args)
    if args.method == "grad_kv":
        changed = [flag(f.name) for f in dataclasses.fields(TuningConfig)
                   if f.name not in ("steps", "update") and getattr(config, f.name) != f.default]
        if changed:
            raise ValueError(f"{', '.join(changed)} set(s) forward tuning, which is not the default method: add "
                             "--method forward, or drop it")
        if args.dev_size < 0:
            raise ValueError(f"--dev-size must be an integer >= 0, got {args.dev_size}")
        level = GradKVConfig.level
        if args.level is not None:
            if args.selection not in GUARDED:
                raise ValueError(f"--level is the threshold of --selection {' or '.join(GUARDED)}; --selection "
                                 f"{args.selection} has none: drop --level, or choose a guarded rule")
            if not 0 < args.level < 1:
                raise ValueError(f"--level must be between 0 and 1 (exclusive), e.g. 0.1, got {args.level:g}")
            level = args.level
        grad = config_from_args(GradKVConfig, args, skip=("seed", "selection", "level"))
        # --selection last has no GradKVConfig counterpart: the method record says it (see run)
        return config, dataclasses.replace(grad, seed=args.grad_seed, level=level,
                                           selection="dev-acc" if args.selection == "last" else args.selection)
    changed = [flag(f.name) for f in dataclasses.fields(GradKVConfig)
               if f.name not in GRAD_ONLY and getattr(args, f.name) != f.default]
    changed += [name for name, set_ in (("--selection", args.selection != "dev-acc"),
                                        ("--dev-size", args.dev_size != DEV_SIZE), ("--grad-seed", args.grad_seed != 0),
                                        ("--level", args.level is not None))
                if set_]
    if changed:
        raise ValueError(f"{', '.join(changed)} set(s) gradient KV tuning, not --method forward: drop it")
    return config, None


def run(args) -> int:
    from pathlib import Path

    from .. import api
    from ..context import check_output_dir, model_record
    from ..context_schema import check_model

    if args.method in ("grad_kv", "forward"):
        config, grad = _configs(args)
        method = "grad_kv" if grad else "forward"
        selection = args.selection if grad else "last"
    else:
        method, grad = args.method, None
        config, selection = _method_config(args)
        if method in PEFT_METHODS:
            from ..adapter import peft_module

            peft_module()                                 # the install hint before anything is read or loaded
    task = task_from_args(args)
    inputs = api.resolve(Path(args.demos) if args.demos else None, task=task, method=method, seed=args.seed,
                         shots=args.shots, dev_size=args.dev_size, selection=selection,
                         data_dir=args.data_dir)         # fails fast on a bad task, split, file or demonstration
    out = check_output_dir(args.out, args.overwrite)      # ... and on an unusable --out, before the model loads
    for w in inputs.warnings:
        print(f"deepthink tune: warning: {w}", file=sys.stderr)
    if not args.quiet:
        print(f"deepthink tune: loading {args.model}", file=sys.stderr, flush=True)
    lm = load_lm(args)
    check_model(model_record(lm), out / "context.json")   # before tuning: the save at the end will accept the model
    saving = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="non-finite", category=RuntimeWarning)
            ctx = api.run(lm, inputs, method, grad or config, selection, progress=not args.quiet)
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
    if method not in ("grad_kv", "forward"):
        how = f" ({_method_summary(ctx.method, len(inputs.dev))})"
    if grad is not None:
        sel, dev = ctx.method["selection"], inputs.dev
        if sel["rule"] in GUARDED:
            how = f" (grad KV, lr {grad.lr:g}, {sel['rule']}: {selection_summary(sel)})"
        else:
            how = {"none": f" (grad KV: {sel.get('note')})",
                   "dev-acc": f" (grad KV, lr {grad.lr:g}: T chosen on {len(dev)} dev items)",
                   "loo": f" (grad KV, lr {grad.lr:g}: T chosen by leave-one-out over the demonstrations"
                          f"{', no dev items' if args.selection == 'dev-acc' else ''})",
                   "last": f" (grad KV, lr {grad.lr:g}: the cache after --steps {grad.steps})"}[sel["rule"]]
    if ctx.adapter is not None:
        what = f"a peft adapter ({out / 'adapter'}) and a {ctx.length}-token prefix"
    else:
        what = f"{ctx.length} tokens of demonstrations" + (
            f", {ctx.steps_done} steps" if method in ("grad_kv", "forward") else "")
    print(f"saved {out}: {what}{how}, {len(ctx.keys)} layers, {ctx.nbytes / 1e6:.2f} MB, model {lm.name}")
    return 0


def _method_summary(record: dict, dev: int) -> str:
    """How ct_kv or a peft baseline chose its step, for the line `tune` prints."""
    sel, name = record["selection"], record["name"]
    if name == "ct_kv":
        if sel.get("note"):
            return f"ct_kv: {sel['note']}"
        return (f"ct_kv, epoch {sel['chosen_epoch']} of {record['options']['epochs']}"
                + (f" chosen on {dev} dev items" if sel["rule"] == "dev-acc" else ": the cache after the last"))
    return (f"{name}, step {sel['chosen_steps']} of {record['options']['steps']}"
            + (f" chosen on {dev} dev items" if sel["rule"] == "dev-acc" else ": the last, no dev items"))
