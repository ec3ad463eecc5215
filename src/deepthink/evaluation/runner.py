"""The evaluation protocol: every method of a run on each (model, task, seed) unit, honestly.

Per unit: demonstrations drawn from the task's training data (seeded), dev items drawn from the rest of
the training data, disjoint from the demonstrations (a method may use them for its own choices), and a
seeded subset of the eval split, which only this runner scores. The methods (`deepthink methods`) are
prepared on one shared Workspace, so a tuning run or a score is computed once however many methods use
it. `--curve` also scores eval at every step of methods that tune step by step; that curve is an oracle
(chosen on eval), is labelled so everywhere, and feeds no number.

Each finished unit is written atomically to OUT/units/; re-running the same command skips finished
units, so an interrupt loses at most the unit in flight. A re-run that asks for methods a finished unit lacks
computes only those, on the unit's own demonstrations, dev and eval items (checked against a fresh draw), and
merges them into it; what the unit holds is left as it is.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..io import safe_name, write_atomic
from ..kv import DemonstrationsTooLong
from ..methods import MethodFailed, NotApplicable, Setup, accuracies
from ..scoring import Scores
from .config import ORACLE, EvalConfig, result_options, upgrade_config
from .cost import HOW as MEMORY_HOW
from .cost import PeakMemory, cache_bytes, kv_bytes_per_token
from .distributed import Processes
from .provenance import environment, git_hash


def run_unit(lm, task, seed: int, cfg: EvalConfig, data_dir=None, progress: bool = True,
             procs=None, like: dict | None = None) -> tuple[dict, list[dict]]:
    """Evaluate one (model, task, seed) with every method of `cfg`; -> (unit result, per-item prediction rows).

    With `procs` (several launched processes working on this one unit), each process scores every
    procs.size-th eval item and the scores are gathered, so every process returns the whole unit.
    With `like` (a finished unit that methods are added to), the draw must give exactly its demonstrations, dev
    and eval items, at the shot count it used; anything else is refused before any method computes."""
    t_start = time.perf_counter()
    methods = cfg.make_methods()
    plan, setup, not_applicable = _fitting_plan(lm, task, seed, cfg, methods, data_dir, like)
    gold = [e.label for e in plan.eval]
    shard = plan.eval if procs is None or procs.size == 1 else plan.eval[procs.rank::procs.size]
    scores, curves, infos, times = {}, {}, {}, {}
    memory, scoring, sizes, no_memory = {}, {}, {}, None     # the methods' cost beside their accuracy (cost.py)
    # the bar moves with every tuning step and scoring pass (Workspace.on_progress) and every finished method;
    # its postfix says which method is at which step
    bar = _bar(progress, unit="step", desc=f"{lm.name} {plan.task.name} seed {seed}")
    current = [""]

    def tick(what: str) -> None:
        bar.set_postfix_str(f"{current[0]}: {what}", refresh=False)
        bar.update(1)

    setup.workspace.on_progress = tick
    for i, method in enumerate(methods):
        if method.key in not_applicable:
            infos[method.key] = {"not_applicable": not_applicable[method.key]}
            continue
        current[0] = f"{method.key} ({i + 1}/{len(methods)})"
        t = time.perf_counter()
        peak = PeakMemory(lm.device)
        try:
            with peak:
                prepared = method.prepare(setup)
                # its own scoring pass: not one shared with an earlier method, nor one combined from others' scores
                fresh = (not setup.workspace.has_scores(prepared.scorer, shard)
                         and getattr(prepared.scorer, "parts", None) is None)
                t_score = time.perf_counter()
                scores[method.key] = setup.workspace.score(prepared.scorer, shard, cfg.batch_size)
                t_score = time.perf_counter() - t_score
        except MethodFailed as e:     # e.g. peft raising on this architecture: recorded as "fails: <reason>"
            infos[method.key] = {"fails": str(e)}
            times[method.key] = round(time.perf_counter() - t, 3)
            bar.update(1)
            continue
        if (used := peak.result()) is not None:
            memory[method.key] = used
        no_memory = no_memory or peak.unavailable
        if fresh:                     # items/s of this method's own scoring pass (a shared pass would read ~0 s)
            scoring[method.key] = {"items": len(shard), "seconds": round(t_score, 3)}
        if (size := cache_bytes(prepared.scorer)) is not None:
            sizes[method.key] = size
        if cfg.curve and prepared.curve:
            curves[method.key] = [setup.workspace.score(c, shard, cfg.batch_size) for c in prepared.curve]
        infos[method.key] = dict(prepared.info)
        times[method.key] = round(time.perf_counter() - t, 3)
        tick("done")
    setup.workspace.on_progress = None
    bar.close()
    if shard is not plan.eval:
        scores, curves = _gather(procs, scores, curves)
    for key, points in curves.items():
        infos[key]["eval_curve"] = {"label": ORACLE, "points": [accuracies(s, gold) for s in points]}

    tok = lm.tokenizer
    unit = {
        "model": lm.name, "task": plan.task.name, "seed": seed,
        "accuracy": {m: accuracies(s, gold) for m, s in scores.items()},
        "methods": infos,
        "n_eval": len(plan.eval), "n_dev": len(plan.dev),
        "demonstrations": {"text": plan.demonstrations,
                           "items": [{"split": e.split, "index": e.index} for e in plan.demos],
                           "tokens": len(tok(plan.demonstrations).input_ids), "shots": plan.shots},
        "eval_indices": [e.index for e in plan.eval],
        "dev_indices": [e.index for e in plan.dev],
        "tokens": {"eval_query": sum(len(tok(e.query, add_special_tokens=False).input_ids) for e in plan.eval)},
        "notes": plan.notes,
        "wall_s": {**times, "total": round(time.perf_counter() - t_start, 3)},
        # cost per method (evaluation/cost.py): peak memory, its own eval scoring pass, the bytes of its cache
        "memory_mb": memory, "memory_how": no_memory or MEMORY_HOW, "scoring": scoring, "cache_bytes": sizes,
        "kv_bytes_per_token": kv_bytes_per_token(lm),
    }
    preds = []
    by_sum = {m: s.predictions() for m, s in scores.items()}
    by_norm = {m: s.predictions(normalize=True) for m, s in scores.items()}
    normalized = {m: s.normalized for m, s in scores.items()}
    for i, e in enumerate(plan.eval):
        row = {"model": lm.name, "task": plan.task.name, "seed": seed, "split": e.split, "index": e.index,
               "gold": e.label}
        for m, s in scores.items():
            row[m] = {"logprob": s.logprob[i], "normalized": normalized[m][i], "pred": by_sum[m][i],
                      "pred_norm": by_norm[m][i]}
        preds.append(row)
    return unit, preds


FITTED = "shots fitted to the model:"     # how a unit's note on fewer shots than asked begins


def _fitting_plan(lm, task, seed: int, cfg: EvalConfig, methods: list, data_dir=None, like: dict | None = None):
    """(plan, Setup, {method key: why it does not apply to this task}), once every other method has accepted them
    (every refusal comes before any method computes anything). With cfg.fit_shots, demonstrations too long for
    the model are drawn again with one fewer shot until every method accepts them; the plan's notes say what was
    refused. A method that is not applicable to the task (NotApplicable, e.g. calibration on per-item choices) is
    left out of the unit with its reason; if no method applies, the run stops saying why. With `like` (a finished
    unit), only its shot count is drawn, and the draw must be its own."""
    from ..data import make_plan

    refused = []
    # a unit from before `shots` was recorded (and before fit_shots) used the shot count of its config
    first = cfg.shots if like is None else like["demonstrations"].get("shots", upgrade_config(like["config"])["shots"])
    for shots in range(first, 0 if like is None else first - 1, -1):
        plan = make_plan(task, seed, shots=shots, dev_size=cfg.dev_size, max_eval=cfg.max_eval, data_dir=data_dir)
        if like is not None:
            same_items(plan, like)
        setup = Setup(lm, plan.demonstrations, plan.dev, cfg.batch_size, task=plan.task, demos=plan.demos)
        not_applicable = {}
        try:
            for method in methods:
                try:
                    method.check(setup)
                except NotApplicable as e:
                    not_applicable[method.key] = str(e)
        except DemonstrationsTooLong as e:
            if like is not None:
                raise DemonstrationsTooLong(f"{lm.name} {plan.task.name} seed {seed}: {method.key} refuses the "
                                            f"finished unit's {shots}-shot demonstrations ({e}); it cannot be added "
                                            "to that unit: run it with a new --out") from None
            if not cfg.fit_shots:
                raise DemonstrationsTooLong(f"{lm.name} {plan.task.name} seed {seed}, {shots} shots: {e} (or let "
                                            "each unit use the largest shot count that fits: "
                                            "EvalConfig(fit_shots=True), or --fit-shots on the command line)") from None
            refused.append(f"shots={shots} refused by {method.key} ({e})")
            continue
        if len(not_applicable) == len(methods):
            raise ValueError(f"no selected method applies to {plan.task.name}: "
                             + "; ".join(f"{k}: {why}" for k, why in not_applicable.items()))
        if refused:
            plan.notes.append(f"{FITTED} {'; '.join(refused)}; shots={shots} used")
        return plan, setup, not_applicable
    raise DemonstrationsTooLong(f"{lm.name} {plan.task.name} seed {seed}: even 1 shot is too long for the model: "
                                f"{refused[-1]}")


def same_items(plan, unit: dict) -> None:
    """Refuse, before anything is computed, a draw whose demonstrations, dev or eval items are not the unit's."""
    have = unit["demonstrations"]
    differs = [what for what, now, then in (
        ("demonstrations", ([{"split": e.split, "index": e.index} for e in plan.demos], plan.demonstrations),
         (have["items"], have["text"])),
        ("dev items", [e.index for e in plan.dev], unit["dev_indices"]),
        ("eval items", [e.index for e in plan.eval], unit["eval_indices"])) if now != then]
    if differs:
        raise ValueError(f"{unit['model']} {unit['task']} seed {unit['seed']}: today's draw gives other "
                         f"{', '.join(differs)} than the finished unit holds (the task's data or the sampler changed): "
                         "methods cannot be added to it; run them with a new --out")


def lacking(out: Path, model: str, task: str, seed: int, cfg: EvalConfig) -> list[str] | None:
    """The method keys of `cfg` that the unit in `out` lacks: None when there is no unit (or a damaged one: it is
    run whole), [] when it holds every one. Its other settings must be the same as cfg's, and so must the options
    of every method both hold (else a ValueError), but for memory knobs that do not change results (result_options);
    methods the unit holds beyond cfg's stay in it."""
    path = unit_path(out, model, task, seed)
    unit = read_unit(path)
    if unit is None:
        return None
    saved, now = upgrade_config(unit.get("config", {})), cfg.to_dict()
    if saved["fit_shots"] != now["fit_shots"] and unit.get("demonstrations", {}).get("shots", saved["shots"]) \
            == saved["shots"]:
        saved["fit_shots"] = now["fit_shots"]    # made with every shot asked for: the same unit either way
    diff = {k: (saved.get(k), v) for k, v in now.items() if k != "methods" and saved.get(k) != v}
    diff.update({k: (saved["methods"][k], v) for k, v in now["methods"].items()   # memory knobs aside (micro_batch)
                 if k in saved["methods"] and result_options(k, saved["methods"][k]) != result_options(k, v)})
    if diff:
        raise ValueError(f"{path} was made with other settings {diff} (saved, now): use a new --out "
                         "or the same flags to resume")
    return [k for k in now["methods"] if k not in saved["methods"]]


def read_unit(path: Path) -> dict | None:
    """The unit at `path`; None when there is none or it is damaged (then it is run again)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def merge_unit(path: Path, unit: dict, preds: list[dict], lm, dtype: str, quantize: str | None) -> dict:
    """Add the methods of `unit` (computed on the same items as the finished unit at `path`) to that unit and its
    .predictions.jsonl, both written atomically (the unit last); the unit's existing entries, and every byte of
    each prediction line up to its closing brace, stay as they were. -> the merged unit."""
    old = json.loads(path.read_text())
    pred_path = path.with_suffix(".predictions.jsonl")
    lines = pred_path.read_text().splitlines() if pred_path.exists() else []
    rows = [json.loads(line) for line in lines]
    if [r["index"] for r in rows] != [p["index"] for p in preds]:
        raise ValueError(f"{pred_path} does not hold the unit's eval items one per line: methods cannot be added "
                         "to this unit; run them with a new --out")
    added = list(unit["methods"])                # every method run, a failed one too ({"fails": ...}, no accuracy)
    merged = dict(old)
    merged["accuracy"] = {**old["accuracy"], **unit["accuracy"]}
    merged["methods"] = {**old["methods"], **unit["methods"]}
    new_total = unit["wall_s"]["total"]
    merged["wall_s"] = {**{k: v for k, v in old["wall_s"].items() if k != "total"},
                        **{k: v for k, v in unit["wall_s"].items() if k != "total"},
                        "total": round(old["wall_s"]["total"] + new_total, 3)}
    for k in ("memory_mb", "scoring", "cache_bytes"):      # the added methods' cost (older units have none)
        if unit.get(k):
            merged[k] = {**old.get(k, {}), **unit[k]}
    if "memory_mb" in unit and "memory_how" not in old:
        merged["memory_how"] = unit["memory_how"]
    merged.setdefault("kv_bytes_per_token", unit.get("kv_bytes_per_token"))
    merged["config"] = {**old["config"], "methods": {**old["config"]["methods"],    # as saved, the new ones added
                                                     **{k: unit["config"]["methods"][k] for k in added}}}
    merged["added"] = old.get("added", []) + [{
        "methods": added, "wall_s": new_total, "model_fingerprint": lm.fingerprint, "dtype": dtype,
        "quantize": quantize, "device": unit.get("device"), "environment": environment()}]
    for row, p in zip(rows, preds):
        row.update({k: p[k] for k in added if k in p})
    write_atomic(pred_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_atomic(path, json.dumps(merged, indent=1, ensure_ascii=False))    # last: marks the methods done
    return merged


def same_model(unit: dict, lm, dtype: str, quantize: str | None) -> None:
    """Refuse to add methods to a unit made with other weights, dtype or quantization."""
    if "methods" not in unit:
        raise ValueError(f"{unit['model']} {unit['task']} seed {unit['seed']}: the unit predates methods (an early "
                         "runner's layout): methods cannot be added to it; run them with a new --out")
    then = (unit.get("model_fingerprint"), unit.get("dtype"), unit.get("quantize"))
    if then != (lm.fingerprint, dtype, quantize):
        raise ValueError(f"{unit['model']} {unit['task']} seed {unit['seed']}: the finished unit was made with "
                         f"(fingerprint, dtype, quantize) = {then}, this run has {(lm.fingerprint, dtype, quantize)}: "
                         "methods cannot be added to it; use the same model and flags, or a new --out")


def _gather(procs, scores: dict, curves: dict) -> tuple[dict, dict]:
    """Every process's shard of scores (items rank, rank + size, ...) put back in the items' order."""
    mine = ({k: (s.logprob, s.n_tokens) for k, s in scores.items()},
            {k: [(s.logprob, s.n_tokens) for s in ss] for k, ss in curves.items()})
    parts = procs.gather(mine)

    def merge(pieces):
        n = sum(len(lp) for lp, _ in pieces)
        return Scores([pieces[i % len(pieces)][0][i // len(pieces)] for i in range(n)],
                      [pieces[i % len(pieces)][1][i // len(pieces)] for i in range(n)])

    merged_scores = {k: merge([p[0][k] for p in parts]) for k in scores}
    merged_curves = {k: [merge([p[1][k][t] for p in parts]) for t in range(len(ss))] for k, ss in curves.items()}
    return merged_scores, merged_curves


def summary_line(unit: dict, cfg: EvalConfig) -> str:
    """One log line per unit: each method's accuracy (summed log-prob), with the T it chose where it chose ("–" for
    a method not applicable to the task)."""
    parts = []
    for method in cfg.make_methods():
        info = unit["methods"].get(method.key, {})
        if "fails" in info:
            parts.append(f"{method.title} fails")
            continue
        chosen = (f" (T={info['chosen_steps']})" if "chosen_steps" in info
                  else f" (step {info['chosen_step']})" if "chosen_step" in info else "")   # T, or peft's updates
        acc = unit["accuracy"].get(method.key)
        parts.append(f"{method.title}{chosen} " + (f"{acc['sum']:.1f}" if acc else "–"))
    return f"{unit['model']} {unit['task']} seed {unit['seed']}: " + "  ".join(parts) + \
        f"  [{unit['wall_s']['total']:.0f}s]"


def _bar(progress: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, leave=False, **kw)


def unit_path(out: Path, model: str, task: str, seed: int) -> Path:
    return Path(out) / "units" / f"{safe_name(model)}__{safe_name(task)}__seed{seed}.json"


def run(models: list[str], tasks: list[str], seeds: list[int], cfg: EvalConfig, out, data_dir=None,
        device="cpu", dtype="float32", progress: bool = True, log=print, lm_cache: dict | None = None,
        write: bool = True, quantize: str | None = None, procs: Processes | None = None) -> dict | None:
    """Run every (model, task, seed) unit not already in `out`, then write results.json and plots (unless
    write=False). lm_cache: a dict to keep loaded models in across calls.

    Started by a launcher (`accelerate launch -m deepthink eval`), the units are divided among the
    processes (or, with fewer units than processes, each unit's eval items); see distributed.py."""
    from ..tasks import get_task

    procs = procs or Processes(device)
    device = procs.device(device)
    out = Path(out)
    task_objs = [get_task(t) if isinstance(t, str) else t for t in tasks]  # fail early on unknown names, before anything is created
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{procs.rank}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to --out {out}: {e.strerror or e}; choose a writable directory") from e
    try:
        return _run(models, task_objs, seeds, cfg, out, data_dir, device, dtype, progress, log, lm_cache, write,
                    quantize, procs)
    except BaseException:
        _remove_if_empty(created)     # a run that stopped before its first unit leaves no empty --out behind
        raise


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders this run created (deepest first) while they hold no file at all."""
    for d in folders:
        try:
            if any(p.is_file() for p in d.rglob("*")):
                return
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                sub.rmdir()
            d.rmdir()
        except OSError:
            return


def _run(models, task_objs, seeds, cfg, out, data_dir, device, dtype, progress, log, lm_cache, write, quantize,
         procs) -> dict | None:
    git_hash()    # the code as this run found it
    lm_cache = {} if lm_cache is None else lm_cache
    for model in models:
        # the main process decides what is left, so that every process works from the same list
        todo = procs.broadcast([(i, s) for i, t in enumerate(task_objs) for s in seeds
                                if lacking(out, model, t.name, s, cfg) != []])
        if not todo:
            if procs.is_main:
                log(f"{model}: all {len(task_objs) * len(seeds)} units already done in {out}")
            continue
        with procs.main_first():              # the first load may fill the model cache: once
            lm = cached_model(lm_cache, model, device, dtype, quantize)
        by_items = len(todo) < procs.size      # fewer units than processes: divide each unit's items
        mine = todo if by_items else todo[procs.rank::procs.size]
        for i, seed in mine:
            task = task_objs[i]
            path = unit_path(out, model, task.name, seed)
            have, unit_cfg = read_unit(path), cfg   # a finished unit lacking some methods: only those are computed
            if have is not None:
                same_model(have, lm, dtype, quantize)
                missing = lacking(out, model, task.name, seed, cfg)
                unit_cfg = EvalConfig(**{**cfg.to_dict(), "methods": {k: cfg.methods[k] for k in missing}})
            unit, preds = run_unit(lm, task, seed, unit_cfg, data_dir=data_dir, progress=progress and procs.is_main,
                                   procs=procs if by_items else None, like=have)
            if by_items and not procs.is_main:
                continue                       # the main process writes a unit whose items were divided
            unit.update({"model_source": lm.source, "model_fingerprint": lm.fingerprint, "dtype": dtype,
                         "quantize": quantize, "device": str(device), "config": unit_cfg.to_dict(),
                         "environment": environment()})
            if have is not None:
                merged = merge_unit(path, unit, preds, lm, dtype, quantize)
                # [Ns] is the whole unit's time, the earlier methods' included; the added ones' own time follows
                log(summary_line(merged, cfg) + f"  (added {', '.join(missing)} in {unit['wall_s']['total']:.0f}s)")
                continue
            write_atomic(path.with_suffix(".predictions.jsonl"),
                         "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
            write_atomic(path, json.dumps(unit, indent=1, ensure_ascii=False))  # last: marks the unit done
            log(summary_line(unit, cfg))
    procs.barrier()                            # every unit is written before anyone reports
    if not write or not procs.is_main:
        return None
    from .report import write_report

    return write_report([out], out, log=log)


def cached_model(lm_cache: dict, model: str, device: str, dtype: str = "float32", quantize: str | None = None):
    """The model from `lm_cache`, loaded into it on first use."""
    import torch

    from ..models import load_model

    key = (model, str(device), dtype, quantize)
    if key not in lm_cache:
        lm_cache[key] = load_model(model, device=device, dtype=getattr(torch, dtype), quantize=quantize)
    return lm_cache[key]


def run_units(jobs: list[tuple[str, str, int, EvalConfig]], out, data_dir=None, device="cpu", dtype="float32",
              progress: bool = True, log=print, lm_cache: dict | None = None, quantize: str | None = None,
              procs: Processes | None = None) -> list[tuple[str, str, int]]:
    """Run (model, task, seed, config) units, each with its own config (benchmarks whose shots differ by task),
    in the order given, and write each one as `run` does; no report. Started by a launcher, the units not yet
    finished are divided round-robin among the processes, each unit run whole by one process (with fewer units
    than processes, each unit's items are divided as in `run`). Returns the (model, task, seed) this process
    ran; on return every process's units are written (the caller's main process may report)."""
    procs = procs or Processes(device)
    todo = procs.broadcast([(m, t, s) for m, t, s, cfg in jobs if not finished(Path(out), m, t, s, cfg)])
    configs = {(m, t, s): cfg for m, t, s, cfg in jobs}
    lm_cache = {} if lm_cache is None else lm_cache
    by_items = len(todo) < procs.size
    for model in dict.fromkeys(m for m, _, _ in todo):       # every process loads, the main one first
        with procs.main_first():
            cached_model(lm_cache, model, procs.device(device), dtype, quantize)
    mine = todo if by_items else todo[procs.rank::procs.size]
    for m, t, s in mine:
        run([m], [t], [s], configs[(m, t, s)], out, data_dir=data_dir, device=device, dtype=dtype,
            progress=progress, log=log, lm_cache=lm_cache, write=False, quantize=quantize,
            procs=procs if by_items else procs.alone())
    procs.barrier()
    return mine


def finished(out: Path, model: str, task: str, seed: int, cfg: EvalConfig) -> bool:
    """Whether the unit is already in `out` with every method of cfg (made with the same settings; other settings
    are an error). A unit that lacks some of cfg's methods is not finished: a run adds them (see `lacking`)."""
    return lacking(out, model, task, seed, cfg) == []
