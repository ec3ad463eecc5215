"""`deepthink.tune`: one call for every tuning method, the one `deepthink tune` makes.

    ctx = deepthink.tune(lm, task)                        # gradient KV tuning (the default), T chosen on dev items
    ctx = deepthink.tune(lm, text, task=task)             # text split into demonstrations by the task's template
    ctx = deepthink.tune(lm, text, method="forward", steps=5)   # the paper's forward tuning, any text
    ctx = deepthink.tune(lm, task, method="ct_kv", epochs=50)   # CT-KV's recipe; or a peft baseline: "lora", ...

Two halves, so that the CLI can check everything before it loads a model: `resolve` finds the demonstrations
(their text, their items, dev items, where they came from, and what to warn about) and `run` tunes them.
"""
from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .io import readable_file
from .tasks import SEPARATOR, Example, Task, get_task
from .tuning.config import TuningConfig
from .tuning.gradient import GradientConfig

PEFT_METHODS = ("lora", "lora_icl", "ia3", "prefix", "prompt", "cpt")   # methods/peft_baselines.py, saved with
                                                                          # their adapter in peft's format
METHODS = ("grad_kv", "forward", "ct_kv", *PEFT_METHODS)
SELECTIONS = ("dev-acc", "dev-mcnemar", "dev-bootstrap", "loo", "last")
GUARDED = ("dev-mcnemar", "dev-bootstrap")   # T = 1 unless a T > 1 beats it on dev by a paired test at `level`
DEV_RULES = ("dev-acc", *GUARDED)            # the rules that read dev items
DEV_SIZE = 128        # dev items drawn by default: T chosen on 128 rather than 64 chased less dev noise on held-out
                      # items (benchmarks/results/SELECTION.md, the rule "dev-acc/128")
DEV_FIRM = 64         # a default draw that finds fewer rows than this warns that the choice is coarse


def reads_dev(method: str, selection: str) -> bool:
    """Whether `method` with `selection` chooses its step on dev items (ct_kv: its option; the peft baselines
    always do, the last step without any)."""
    if method == "grad_kv":
        return selection in DEV_RULES
    return method in PEFT_METHODS or (method == "ct_kv" and selection == "dev-acc")


@dataclass
class Inputs:
    """What is tuned: the demonstration string (or token ids, forward tuning only), the demonstrations as task
    items (None: verbatim text), dev items, where they came from (context.json's "origin"), and warnings."""

    text: str | list[int]
    items: list[Example] | None = None
    dev: list[Example] = field(default_factory=list)
    origin: dict | None = None
    warnings: list[str] = field(default_factory=list)
    task: Task | None = None       # stored in the context (a copied context needs no task file)


def _task(task) -> tuple[Task | None, Any]:
    """(Task, how origin names it): a name or file path as given, else the task's name (its whole definition is
    stored in the context beside the origin)."""
    if task is None:
        return None, None
    if isinstance(task, Task):
        return task, {"task": task.name}
    if isinstance(task, (str, Path)):
        return get_task(str(task)), {"task": str(task)}
    raise TypeError(f"task must be a Task, a task name or a task file, got {type(task).__name__}")


def _read_text(path: Path) -> str:
    readable_file(path, "demonstrations file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path} holds no demonstrations (it is empty or only whitespace): "
                         "write the demonstration text into it")
    return text


def _joined(items: Sequence[Example]) -> str:
    return "".join(e.block for e in items)          # each demonstration and the separator that ends it


def resolve(demonstrations=None, *, task=None, method: str = "grad_kv", seed: int = 0, shots: int | None = None,
            dev: Sequence[Example] | None = None, dev_size: int = DEV_SIZE, selection: str = "dev-acc",
            data_dir=None) -> Inputs:
    """The demonstrations to tune, without loading a model (so that a bad input fails fast).

    demonstrations: None or a Task (drawn from the task's training data: `shots` per label, `seed`), a str (the
    demonstration text), a Path (a file: .jsonl rows in the task's layout, any other file's text), a list of task
    items (tasks.Example), or token ids (forward tuning only). Gradient KV tuning needs each demonstration's query
    and answer: text is split on the blank line that ends each demonstration and read with the task's template.
    Dev items (grad_kv, selection dev-acc, dev-mcnemar or dev-bootstrap; ct_kv with selection dev-acc; the peft
    baselines): `dev` as given, else up to `dev_size` training rows of the task that are not demonstrations, drawn
    as `deepthink eval` draws them. Without any, dev-acc falls back to leave-one-out and the guarded rules keep
    T = 1 (plain ICL); ct_kv and the peft baselines keep their last step; all warn.
    Every method but forward needs the demonstrations as items (each one's query and answer).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if isinstance(demonstrations, Task):
        if task is not None:
            raise ValueError("give the task once: as the demonstrations or as task=, not both")
        task, demonstrations = demonstrations, None
    task, origin = _task(task)
    grad = method != "forward"       # every method but forward reads each demonstration's query and answer
    if isinstance(shots, bool) or shots is not None and (not isinstance(shots, int) or shots < 1):
        raise ValueError(f"shots must be an integer >= 1, got {shots!r}")
    if isinstance(dev_size, bool) or not isinstance(dev_size, int) or dev_size < 0:
        raise ValueError(f"dev_size must be an integer >= 0, got {dev_size!r}")
    if shots is not None and demonstrations is not None:
        raise ValueError("shots sets the size of a draw from the task's training data (--shots); it cannot be "
                         "combined with given demonstrations (--demos FILE)")
    want_dev = reads_dev(method, selection) and dev_size > 0 and dev is None
    out = Inputs(text="", task=task)

    if demonstrations is None:
        if task is None:
            raise ValueError("give the demonstrations: a task (--task T, or --template/--choices with --train "
                             "ROWS.jsonl) to draw them from its training data, or the demonstrations themselves "
                             "(--demos FILE)")
        from .data import make_plan

        k = 1 if shots is None else shots
        plan = make_plan(task, seed, k, dev_size=dev_size if want_dev else 0, data_dir=data_dir, score=False)
        out.text, out.items, out.origin = plan.demonstrations, list(plan.demos), {**origin, "seed": seed, "shots": k}
        if want_dev:
            out.dev = list(plan.dev)
            why = "training rows left after the demonstrations"
    else:
        if isinstance(demonstrations, Path):
            path = demonstrations
            out.origin = {**(origin or {"task": None}), "demos_file": str(path)}
            if path.suffix == ".jsonl":
                if task is None:
                    raise ValueError(f"{path} is JSONL: give --task T (or --template/--choices) so that its rows "
                                     "can be formatted with the task's template (or pass a plain text file)")
                from .data import read_demos_file

                items = read_demos_file(path, task)
                if not items:
                    raise ValueError(f"{path} holds no demonstrations")
                out.items, out.text = items, _joined(items)
            else:
                out.text = _read_text(path)
            source = str(path)
        else:
            out.origin = origin
            source = "the demonstrations"
            if isinstance(demonstrations, str):
                if not demonstrations.strip():
                    raise ValueError("demonstrations are empty: pass the demonstration text (or a task to draw "
                                     "them from; for a zero-shot baseline use deepthink.zero_shot(lm))")
                out.text = demonstrations
            elif isinstance(demonstrations, (list, tuple)) and demonstrations and all(
                    isinstance(e, Example) for e in demonstrations):
                out.items, out.text = list(demonstrations), _joined(demonstrations)
            elif isinstance(demonstrations, (list, tuple)) and demonstrations and all(
                    isinstance(t, int) and not isinstance(t, bool) for t in demonstrations):
                if grad:
                    raise ValueError(f"{method} needs each demonstration's query and answer, which token ids do not "
                                     "give: pass the text with a task, or method='forward'")
                out.text = list(demonstrations)
            else:
                raise ValueError("demonstrations are empty or of an unknown kind: pass text, a Path, task items "
                                 "(tasks.Example), token ids, or a Task to draw them from")
        if grad and out.items is None:
            if task is None:
                raise ValueError(f"{source}: {method}{' (the default method)' if method == 'grad_kv' else ''} "
                                 "needs each demonstration's query and answer: give the task whose template they "
                                 "follow (--task T, or --template and --choices), so that the text can be split into "
                                 "demonstrations; or tune them with --method forward (the paper's forward tuning "
                                 "takes any text)")
            out.items = task.parse_demonstrations(out.text, source)
            out.text = _joined(out.items)
        if want_dev and task is not None:
            out.dev, why = _dev_rows(task, seed, dev_size, data_dir, out.items)
        elif want_dev:
            why = "no task gives training rows"
    if dev is not None:
        out.dev = list(dev)
    if method == "grad_kv" and selection in GUARDED and not out.dev:
        why = ("dev= is empty" if dev is not None else "--dev-size 0" if dev_size == 0
               else f"{why}, {len(out.items or ())} demonstrations")
        out.warnings.append(
            f"no dev items ({why}): --selection {selection} keeps T = 1 (plain ICL) without them, so tuning "
            f"changes nothing. Add labelled rows to the training data (--dev-size N draws N of them), or choose T "
            "another way: --selection loo, or --selection last --steps T")
    elif dev is None and want_dev:
        n = len(out.items or ())
        if not out.dev and method != "grad_kv":
            steps = "epochs" if method == "ct_kv" else "steps"
            out.warnings.append(
                f"no dev items ({why}, {n} demonstrations): {method} keeps its last {steps[:-1]} instead of choosing "
                f"one on dev items. Add labelled rows to the training data, or set the {steps} yourself: -o "
                f"{method}.{steps}=N (--dev-size 0 also silences this)")
        elif not out.dev:
            out.warnings.append(
                f"no dev items ({why}, {n} demonstrations): T is chosen by leave-one-out over the demonstrations, "
                "an optimistic reading (those are the terms Adam fits). Add labelled rows to the training data, or "
                "choose the rule yourself: --selection loo, or --selection last --steps T (--dev-size 0 also "
                "silences this)")
        elif len(out.dev) < dev_size and dev_size != DEV_SIZE:
            raise ValueError(f"--dev-size {dev_size}: only {len(out.dev)} rows are left for dev items ({why}); give "
                             f"at most {len(out.dev)} (each dev item is scored at every step; the default is "
                             f"{DEV_SIZE})")
        elif dev_size == DEV_SIZE and len(out.dev) < DEV_FIRM:   # the default takes what there is, quietly from 64 on
            out.warnings.append(
                f"only {len(out.dev)} dev items ({why}) where --dev-size asks for {dev_size}: "
                f"{'T' if method == 'grad_kv' else 'the step'} is chosen on "
                f"{len(out.dev)} items, a coarse choice; more labelled rows make it firmer"
                + (" (or --selection loo / --selection last --steps T choose without dev items)"
                   if method == "grad_kv" else ""))
    return out


def _dev_rows(task: Task, seed: int, dev_size: int, data_dir, items) -> tuple[list[Example], str]:
    """Dev items for given demonstrations: the task's training rows drawn as `make_plan` draws them, less those
    with a demonstration's text; ([], why) when the task has no training data."""
    from .data import make_plan

    try:
        plan = make_plan(task, seed, 0, dev_size=dev_size, data_dir=data_dir, score=False)
    except FileNotFoundError as e:
        return [], f"no training data: {e}"
    seen = {e.demo_text for e in items or ()}
    return [e for e in plan.dev if e.demo_text not in seen], "training rows that are not demonstrations"


# ---- running ---------------------------------------------------------------------------------------------------

class StderrProgress:
    """progress=True: one line per step on stderr (step, loss, dev accuracy, elapsed, ETA)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def start(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def __call__(self, info: dict) -> None:
        parts = [f"step {info['step']:>{len(str(info['steps']))}}/{info['steps']}"]
        if info.get("loss") is not None:
            parts.append(f"loss {info['loss']:.4f}")
        if info.get("dev_accuracy") is not None:
            parts.append(f"dev acc {info['dev_accuracy']:.1f}%")
        parts.append(f"elapsed {info['elapsed']:.1f} s")
        if info["step"] < info["steps"]:
            parts.append(f"ETA {info['eta']:.0f} s")
        print("  ".join(parts), file=self.stream, flush=True)


def _progress(progress) -> Callable | None:
    if progress is True:
        return StderrProgress()
    if progress in (False, None):
        return None
    if not callable(progress):
        raise TypeError(f"progress must be True, False or a callable taking a dict per step, got {progress!r}")
    return progress


def config_class(method: str) -> type:
    """The config dataclass of a method `tune` runs: GradKVConfig, TuningConfig (forward), or the registered
    method's own (ct_kv: CTKVConfig; the peft baselines: their options, methods/peft_baselines.py)."""
    from .methods import get_method
    from .methods.gradient import GradKVConfig

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    return {"grad_kv": GradKVConfig, "forward": TuningConfig}.get(method) or get_method(method).Config


def make_config(method: str, config=None, **options):
    """The config of `method`: `config` as given (checked), or built from `options` (its fields)."""
    cls = config_class(method)
    if config is not None and options:
        raise ValueError(f"give either config= or options ({', '.join(sorted(options))}), not both")
    if config is None:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"method {method!r} has no option(s) {unknown}; its options: {sorted(known)}")
        return cls(**options)
    if method == "grad_kv" and type(config) is GradientConfig:
        return cls(**config.to_dict())                     # the bare tuner's config: its values, T chosen
    if not isinstance(config, cls):
        hint = "; method='forward' takes a TuningConfig" if method == "grad_kv" else ""
        raise TypeError(f"method {method!r} takes a {cls.__name__}, got {type(config).__name__}{hint}")
    return config


def run(lm, inputs: Inputs, method: str = "grad_kv", config=None, selection: str = "dev-acc",
        progress=False):
    """Tune `inputs` (from `resolve`) with `method` and `config`; -> the TunedContext, its origin and (grad_kv)
    its record under "method" (options, rule, chosen T) set, as `deepthink tune` saves it."""
    config = make_config(method, config)
    report = _progress(progress)
    start = time.perf_counter()

    def step(n: int, steps: int, loss=None, dev=None) -> None:
        if report is not None:
            elapsed = time.perf_counter() - start
            report({"step": n, "steps": steps, "loss": loss, "dev_accuracy": dev, "elapsed": elapsed,
                    "eta": elapsed / n * (steps - n)})

    say = getattr(report, "start", None)
    if method == "forward":
        from .tuning.tuner import ForwardTuner

        tuner = ForwardTuner(lm, inputs.text, config)
        if say:
            say(f"forward tuning {tuner.length} tokens of demonstrations, {config.steps} steps")
        ctx = None
        for ctx in tuner:
            step(tuner.step_count, config.steps)
    elif method == "grad_kv":
        ctx = _grad_kv(lm, inputs, config, selection, step, say)
    else:
        ctx = _method(lm, inputs, method, config, step, say)
    ctx.origin = inputs.origin
    ctx.task = inputs.task
    return ctx


def _grad_kv(lm, inputs: Inputs, cfg, selection: str, step, say):
    from .context import TunedContext
    from .methods import Setup
    from .methods.gradient import GradKV, gradient_config
    from .tuning.gradient import GradientTuner

    items, dev = inputs.items, inputs.dev
    options = gradient_config(cfg)
    if say:
        rule = {"last": f"the cache after step {cfg.steps}",
                "loo": f"T in 1..{cfg.steps} chosen by leave-one-out over the demonstrations",
                "dev-acc": (f"T in 1..{cfg.steps} chosen on {len(dev)} dev items" if dev else
                            f"T in 1..{cfg.steps} chosen by leave-one-out (no dev items)"),
                **{g: (f"T = 1 unless a T in 2..{cfg.steps} beats it on {len(dev)} dev items ({g}, level "
                       f"{cfg.level:g})" if dev else "T = 1 (no dev items)") for g in GUARDED}}[selection]
        say(f"gradient KV tuning {len(items)} demonstrations, lr {cfg.lr:g}: {rule}")
    if selection == "last":
        tuner = GradientTuner(lm, inputs.text, items, options)
        ctx = None
        for ctx in tuner:
            step(tuner.step_count, cfg.steps, loss=ctx.history[-1]["loss"] if len(ctx.history) == tuner.step_count
                 else None)
        ctx.method = {**ctx.method, "selection": {"rule": "last", "chosen_steps": ctx.steps_done}}
        return ctx
    cfg = dataclasses.replace(cfg, selection=selection)
    setup = Setup(lm, inputs.text, dev, demos=items,
                  on_step=lambda info: step(info["step"], cfg.steps, info["loss"], info["dev_accuracy"]))
    if selection in GUARDED and not dev and len(items) > 1:
        # a guarded rule without dev items keeps T = 1 whatever the steps would give: none are run (plain ICL)
        icl = setup.icl()
        record = {"name": GradKV.name, "options": options.to_dict(),
                  "selection": {"rule": selection, "chosen_steps": 1, "level": cfg.level, "dev_items": 0,
                                "accuracy_curve": [], "train_loss": [],
                                "note": f"{selection} without dev items: T = 1 (plain ICL); no step was run"}}
        return TunedContext(lm, icl.keys, icl.values, icl.prefix_ids, config=None, demonstrations=inputs.text,
                            steps_done=1, history=[], stopped=None, method=record)
    prepared = GradKV(cfg).prepare(setup)
    info, best = prepared.info, prepared.scorer
    used = info["selection_used"]
    curve = ([round(c["acc"], 4) for c in info["loo_curve"]] if used == "loo"
             else [round(c["sum"], 4) for c in info["dev_curve"]])
    rule = selection if selection in GUARDED and used == "none" and len(items) > 1 else used   # no dev: T = 1
    guard = ({"level": cfg.level, **_evidence(selection, info.get("selection_detail"))} if rule in GUARDED
             else {})
    record = {"name": GradKV.name, "options": options.to_dict(),
              "selection": {"rule": rule, "chosen_steps": info["chosen_steps"], **guard,
                            "dev_items": len(dev), "accuracy_curve": curve, "train_loss": info["train_loss"],
                            **({"note": info["note"]} if info.get("note") else {})}}
    return TunedContext(lm, best.keys, best.values, best.prefix_ids, config=None, demonstrations=inputs.text,
                        steps_done=info["chosen_steps"], history=best.history if best.method else [],
                        stopped=best.stopped, method=record)


def _method(lm, inputs: Inputs, name: str, cfg, step, say):
    """ct_kv or a peft baseline, trained and its step chosen by the method's own code (what `deepthink eval` runs),
    as a TunedContext with its record under "method" (options, rule, chosen step, dev curve) and, for a peft
    baseline, its adapter."""
    from .adapter import holds_adapter
    from .methods import Setup, get_method

    method = get_method(name)(cfg, key=name)
    total = cfg.epochs if name == "ct_kv" else cfg.steps
    setup = Setup(lm, inputs.text, inputs.dev, demos=inputs.items,
                  on_step=lambda info: step(info["step"], total, info["loss"], info["dev_accuracy"]))
    if name in PEFT_METHODS:
        if holds_adapter(lm.model):
            raise ValueError(f"the model {lm.name!r} already holds a peft adapter (put in by an earlier "
                             f"deepthink.tune or context load): load the model again to train {name} on it")
        lm.fingerprint          # the base model's identity, taken before any adapter is in it (saved, checked on load)
    method.check(setup)
    if say:
        n = len(inputs.dev)
        if name == "ct_kv":
            how = f"{cfg.epochs} epochs, " + (f"the epoch chosen on {n} dev items" if n else "the cache after the last")
        else:
            how = f"steps 0..{cfg.steps}, " + (f"the step chosen on {n} dev items" if n else "the last one kept")
        say(f"{method.title}: {len(inputs.items)} demonstrations, lr {cfg.lr:g}, {how}")
    prepared = method.prepare(setup)
    info = prepared.info
    if name == "ct_kv":
        return _ctkv_context(lm, inputs, method, prepared)
    chosen = info["chosen_step"]
    state = method.run(setup).states[info["dev_steps"].index(chosen)]      # the same run prepare read
    selection = {"rule": "dev-acc" if info["selection_used"] == "dev-acc" else "last", "chosen_steps": chosen,
                 "dev_items": len(inputs.dev), "dev_steps": info["dev_steps"],
                 "accuracy_curve": [round(c["sum"], 4) for c in info["dev_curve"]], "train_loss": info["train_loss"],
                 "trainable_parameters": info["trainable_parameters"], "adapter_bytes": info["adapter_bytes"]}
    record = {"name": name, "options": method.options(), "selection": selection}
    return _peft_context(lm, inputs, method, state, prepared.scorer, record)


def _ctkv_context(lm, inputs: Inputs, method, prepared):
    from .context import TunedContext

    info, best = prepared.info, prepared.scorer
    tuned = bool(best.method)       # a context of the gradient tuner (else plain ICL: epoch 0, or one demonstration)
    steps = best.steps_done if tuned else 1          # grad_kv's count: step 1 is plain ICL, epoch e is step e + 1
    record = info["dev_record"]
    selection = {"rule": info["selection_used"], "chosen_steps": steps, "chosen_epoch": info["chosen_epoch"],
                 "dev_items": len(inputs.dev), "dev_epochs": [r["epoch"] for r in record],
                 "accuracy_curve": [round(r["sum"], 4) for r in record], "train_loss": info["train_loss"],
                 **({"note": info["note"]} if info.get("note") else {})}
    return TunedContext(lm, best.keys, best.values, best.prefix_ids, config=None, demonstrations=inputs.text,
                        steps_done=steps, history=best.history if tuned else [], stopped=best.stopped,
                        method={"name": method.name, "options": method.options(), "selection": selection})


def _peft_context(lm, inputs: Inputs, method, state: dict, scorer, record: dict):
    """lora, lora_icl, ia3: the chosen adapter is put into lm.model (and stays: the context answers with the adapted
    model, as a loaded one does), the prompt (special tokens; the demonstrations for lora_icl) encoded by it, as
    their scorer encodes it. prefix, prompt, cpt: their scorer is already a prefix cache; the adapter is saved
    beside it for peft users."""
    import peft
    import torch

    from . import kv
    from .adapter import Adapter, saved_by
    from .context import TunedContext
    from .methods import Setup
    from .methods.peft_baselines import AdaptedScorer, _wrap

    bare = Setup(lm, inputs.text, (), demos=inputs.items)     # what the adapter's peft config is built from
    if isinstance(scorer, AdaptedScorer):
        model = _wrap(method, bare, state=state)
        for p in lm.model.parameters():
            p.requires_grad_(False)
        text = scorer.demonstrations
        ids = lm.tokenizer(text).input_ids                      # as AdaptedScorer encodes its prompt
        with torch.no_grad():
            keys, values = kv.encode(lm.model, torch.tensor([ids], device=lm.device)) if ids else ([], [])
        return TunedContext(lm, list(keys), list(values), ids, demonstrations=text,
                            steps_done=record["selection"]["chosen_steps"], method=record,
                            adapter=saved_by(model, in_model=True))

    def write(folder) -> None:
        model = _wrap(method, bare, state=state)
        try:
            model.save_pretrained(str(folder), save_embedding_layers=False)
        finally:
            method._remove(model)

    return TunedContext(lm, scorer.keys, scorer.values, scorer.prefix_ids, demonstrations=scorer.demonstrations,
                        steps_done=record["selection"]["chosen_steps"], method=record,
                        adapter=Adapter(False, write, peft.__version__))


def _evidence(rule: str, detail: dict | None) -> dict:
    """A guarded rule's tests against T = 1, as lists over T = 1..steps (T = 1 itself: 0, 0, null): dev items won
    and lost, and the p-value of the sign test (dev-mcnemar) or the bootstrap lower bound of the dev accuracy gain
    in points (dev-bootstrap; null where T won no more items than it lost); `passed`: the T that beat T = 1."""
    if not detail:
        return {}
    stat = "p_value" if rule == "dev-mcnemar" else "gain_lower_bound"
    tests = detail["tests"]
    return {"passed": list(detail["passed"]), "wins": [0] + [t["wins"] for t in tests],
            "losses": [0] + [t["losses"] for t in tests],
            stat: [None] + [None if t["stat"] is None else round(t["stat"], 6) for t in tests]}


def selection_summary(sel: dict) -> str:
    """One line on how a guarded rule chose T, from the method record's "selection" (what `deepthink tune` prints):
    "T = 1 kept: no T beat it on the 64 dev items at level 0.1 (best T = 9: +2 items, p = 0.25)"."""
    rule, level, n, chosen = sel["rule"], sel["level"], sel["dev_items"], sel["chosen_steps"]
    if not n or "wins" not in sel:
        return f"T = 1 kept: {rule} needs dev items and had none (plain ICL)"
    net = [w - l for w, l in zip(sel["wins"], sel["losses"])]

    def why(t: int) -> str:
        stat = (f"p = {sel['p_value'][t - 1]:.3g}" if "p_value" in sel else
                "no lower bound" if sel["gain_lower_bound"][t - 1] is None else
                f"lower bound {sel['gain_lower_bound'][t - 1]:+.3g} points")
        return f"{net[t - 1]:+d} items, {stat}"

    if chosen > 1:
        return f"T = {chosen} chosen: it beat T = 1 on the {n} dev items at level {level:g} ({why(chosen)})"
    best = max(range(2, len(net) + 1), key=lambda t: (net[t - 1], -t), default=None)
    if best is None or net[best - 1] <= 0:
        return f"T = 1 kept: no T got more of the {n} dev items right"
    return f"T = 1 kept: no T beat it on the {n} dev items at level {level:g} (best T = {best}: {why(best)})"


def tune(lm, demonstrations=None, config=None, *, method: str | None = None, task=None, seed: int = 0,
         shots: int | None = None, dev: Sequence[Example] | None = None, dev_size: int = DEV_SIZE,
         selection: str | None = None, data_dir=None, progress=False, **options):
    """Tune demonstrations and return the TunedContext: what `deepthink tune` saves, with the same defaults.

    method: "grad_kv" (the default: gradient KV tuning, Adam at lr 0.01, T in 1..15 chosen on dev items; its
    config is a methods.gradient.GradKVConfig) or "forward" (the paper's forward tuning, a TuningConfig). A
    TuningConfig passed as `config` without `method` means forward tuning. "ct_kv" (CT-KV's recipe, a
    methods.ctkv.CTKVConfig; selection "last", its default, or "dev-acc") and the peft baselines "lora",
    "lora_icl", "ia3", "prefix", "prompt", "cpt" (their options, methods/peft_baselines.py; the step chosen on dev
    items, the last without any) run the code `deepthink eval` runs. A peft baseline's context carries its adapter
    (saved in peft's format); for lora, lora_icl and ia3 the adapter is put into lm.model, in place, and stays
    there: the context answers with the adapted model, and lm then serves that context alone (docs/methods.md).
    Changed after deepthink 0.1.0: `tune(lm, text)` used to be forward tuning (steps 15, momentum 0.9); it is now gradient KV
    tuning, which needs the demonstrations' queries and answers (a task). `tune(lm, text, TuningConfig(...))`
    still forward-tunes, as before; `tune(lm, text, method="forward")` forward-tunes with TuningConfig's defaults.

    demonstrations, task, seed, shots, dev, dev_size, data_dir: see `resolve` (a Task alone draws `shots` per
    label from its training data; dev items are the training rows left after the demonstrations).
    selection: grad_kv's rule for T: "dev-acc" (default; leave-one-out when there are no dev items, with a
    warning), "dev-mcnemar" or "dev-bootstrap" (T = 1, plain ICL, unless a T > 1 beats it on the dev items by a
    paired test at `level`, an option: the sign test's p-value, or the bootstrap lower bound's quantile; default
    0.1; T = 1 without dev items, with a warning), "loo", or "last" (the cache after config.steps).
    options: fields of the method's config (e.g. steps=8, lr=0.001) instead of `config`. progress: True prints a line per step to stderr; a callable
    gets {step, steps, loss, dev_accuracy, elapsed, eta} per step.
    """
    if method is None:
        method = "forward" if isinstance(config, TuningConfig) else "grad_kv"
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    config = make_config(method, config, **options)
    if method in PEFT_METHODS:
        if selection is not None:
            raise ValueError(f"{method} chooses its step on dev items (the last step without any), as in "
                             "`deepthink eval`: drop selection")
        selection = "dev-acc"
    elif method == "ct_kv":
        if selection is not None:
            config = dataclasses.replace(config, selection=selection)    # CTKVConfig checks it: last or dev-acc
        selection = config.selection
    elif method == "forward":
        if selection is not None:
            raise ValueError("selection chooses T for gradient KV tuning; forward tuning runs config.steps steps")
        selection = "last"
    else:
        selection = config.selection if selection is None else selection
        if selection not in SELECTIONS:
            raise ValueError(f"unknown selection {selection!r}; valid: {', '.join(SELECTIONS)}")
        default = {f.name: f.default for f in dataclasses.fields(config)}.get("level")
        if ("level" in options or getattr(config, "level", None) != default) and selection not in GUARDED:
            raise ValueError(f"level is the threshold of the guarded rules ({', '.join(GUARDED)}); selection "
                             f"{selection!r} has none: drop level, or choose one of them")
    inputs = resolve(demonstrations, task=task, method=method, seed=seed, shots=shots, dev=dev, dev_size=dev_size,
                     selection=selection, data_dir=data_dir)
    for w in inputs.warnings:
        warnings.warn(w, UserWarning, stacklevel=2)
    return run(lm, inputs, method, config, selection, progress)
