"""The field's methods for k labelled examples beside grad KV (issue 28): CT-KV, LoRA, (IA)^3, prefix, prompt and
context-aware prompt tuning, on the ablation benchmark's units, with their cost, and the rule that recommends the
default. Three stages, each resumable, each fixed by a rule written here before it runs:

    python benchmarks/field.py --stage lr         # the peft methods' lr grid on copies of screen units -> lr/chosen.json
    python benchmarks/field.py --stage confirm    # each peft method at its chosen lr added to the confirmation's units;
                                                  #   ct_kv (and ct_kv@dev, free beside it) on seed 3 of each
    python benchmarks/field.py --stage large      # qwen2.5-coder-1.5b, seed 3: baselines, grad KV, the two best new
    python benchmarks/field.py --write-only       # only rewrite FIELD.md (and the README block) from finished units
    python benchmarks/field.py --stage confirm --models smollm2-135m --tasks sst2 --seeds 3    # a slice

Units: `lr` writes under benchmarks/results/field/lr/units/ (each starts as a copy of a screen unit of
benchmarks/ablations.py holding only its baselines and grad KV, then gains the grid: the screen's own files are never
written); `confirm` adds methods to benchmarks/results/ablations/confirm/units/ in place, through the runner
(`lacking` / `merge_unit`: only the lacking methods run, on the unit's own demonstrations, dev and eval items, checked
against a fresh draw, and every entry already there stays byte for byte); `large` writes
benchmarks/results/field/large/units/. Every run appends what it did to <stage>/sittings.jsonl under
benchmarks/results/field/, shown in FIELD.md. Run it alone on the machine.

Cost, measured before any stage ran (TIMING, ESTIMATE below; FIELD.md repeats them). The one real-model timing allowed
(lora + lora_icl at lr 0.001 and prefix at lr 0.01 on a fresh unit of the screen's smollm2-135m sst2 seed 0, `nice -n
10`, beside a long benchmark on this 2-core machine) did not finish in its 10 minutes: a lower bound of ~3 min a
peft key under that load, ~1.6 min alone, against the 89 s grad_kv@lr01 takes in such a unit. Taking a peft key as
1.1-2x the unit's grad_kv@lr01 seconds (alone on the machine):

    stage     what                                                       hours
    lr        18 keys x 4 screen units (seed 0; sst2, trec; 2 models)     2.0-3.6
    confirm   6 peft keys x 45 units (5.6-10 h a seed, seed 3 first)    17-31
              ct_kv + ct_kv@dev on the 15 seed-3 units                    ~4
              per-step eval curves of the confirmation's curve unit       ~0.7
              (smollm2-135m sst2 seed 3 scores them, as its config says)
    large     5 units of qwen2.5-coder-1.5b (baselines, grad KV, 2 peft)  5.5-8

30-48 h in all, beyond the issue's 10-15 h: so CONFIRM_SEEDS was shrunk to seed 3 before any confirmation unit gained a
new method (SHRUNK says why): the confirmation's peft keys 5.6-10 h, all of it 18-26 h.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablations as ab  # noqa: E402  (the units, protocol and statistics of the ablation benchmark)

from deepthink.evaluation import EvalConfig, run_units  # noqa: E402
from deepthink.evaluation.distributed import Processes  # noqa: E402
from deepthink.evaluation.provenance import Sitting, interrupt_on_sigterm, sitting_lines, stopped_by  # noqa: E402
from deepthink.evaluation.report import fmt, label, load_units, replace_marked  # noqa: E402
from deepthink.evaluation.runner import read_unit, unit_path  # noqa: E402
from deepthink.evaluation.stats import wins_ties_losses  # noqa: E402
from deepthink.io import sha256_file, write_atomic  # noqa: E402
from deepthink.methods.peft_baselines import LR_GRID  # noqa: E402
from deepthink.models import set_threads  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "field"
MARKDOWN = ROOT / "results" / "FIELD.md"
SCREEN = ab.RESULTS / "screen"          # read only: the lr stage copies its units
CONFIRM = ab.RESULTS / "confirm"        # the confirmation's units gain the new methods in place
README = ROOT.parent / "README.md"
README_MARK = ("<!-- field-summary: written by benchmarks/field.py -->", "<!-- /field-summary -->")

PEFT = ["lora", "lora_icl", "ia3", "prefix", "prompt", "cpt"]
CT_KV = {"ct_kv": {}, "ct_kv@dev": {"selection": "dev-acc"}}   # one run: the dev-chosen epoch costs one eval pass
CT_KV_SEEDS = [3]                       # ct_kv's 200 epochs cost ~13x grad KV's tuning: seed 3 of each (model, task)
PEFT_OPTIONS: dict = {}                 # options every peft method gets beside its lr (none: their defaults)


def new_methods() -> list[str]:
    return PEFT + list(CT_KV)


BASE = ["zero_shot", "icl", "icl_cc", "grad_kv@lr01"]   # kept in the lr stage's copies; the large stage's baselines
DEFAULT = "grad_kv@lr01"                # grad KV as the ablation units key it (lr 0.01, T on dev): the default
SMALL = ab.STAGES["confirm"]["models"]
LARGE = dict(models=["qwen2.5-coder-1.5b"], seeds=[3], max_eval=300, dev_size=64)   # the confirmation's protocol
N_BEST = 2                              # new methods run on the large model
LR_UNITS = dict(seeds=[0], tasks=["sst2", "trec"])   # the lr grid's subset of the screen (both models; see SHRUNK)
CONFIRM_SEEDS = [3]                     # the confirmation's seeds that gain the peft methods, and the rule reads (SHRUNK)
TIMING = ("lora and lora_icl (lr 0.001, one shared training run) and prefix (lr 0.01), 15 steps each with dev "
          "accuracy at every step, added to a fresh unit of the screen's protocol (smollm2-135m, sst2, seed 0: 4 shots "
          "per class, 64 dev and 200 eval items), did not finish within the 10 minutes allowed for the one real-model "
          "timing (killed at 600 s wall with the model load, `nice -n 10`, 2 torch threads, beside a long benchmark "
          "on this 2-core machine; the script printed nothing before the end). So the three keys took more than about "
          "9.5 min under that load, over 3 min a key: a lower bound. Run alone, with the machine's speed shared about "
          "equally, that is about 1.6 min a key or more, against the 89 s of grad_kv@lr01 in the same kind of unit "
          "alone (screen seed 1; its dev curve of 15 x 64 items is most of it, as the peft methods' 16 x 64 are).")
ESTIMATE = ("A peft key (one method at one lr) is taken to cost c times the same unit's grad_kv@lr01 wall seconds "
            "alone, c = 1.1 to 2 (TIMING: 1.1 if the shared machine halved the speed, 2 if it cost little). "
            "lr stage: 18 keys (6 methods x 3 lrs) on 4 units whose grad_kv@lr01 took 355 s in all: 2.0-3.6 h. "
            "Confirmation: 6 keys on 45 units whose grad_kv@lr01 took 2.56 h in all: 17-31 h, 5.6-10 h a seed (seed 3 "
            "first); ct_kv with ct_kv@dev on the 15 seed-3 units: 13 x grad KV's 0.23 h of tuning there, 21 dev "
            "readings of 64 items and two eval passes: about 4 h; the confirmation's curve unit (smollm2-135m sst2 seed 3) also scores every new method's per-step eval curve, as its config says: about 0.7 h. Large stage (qwen2.5-coder-1.5b taken as 3x "
            "qwen2.5-coder-0.5b, whose seed-3 units took 153 s for the baselines and 363 s for grad_kv@lr01): "
            "1.1-1.6 h a unit, 5.5-8 h for five; ct_kv would add about 1.4 h a unit there (13 x ~0.08 h of tuning). "
            "All of it: 30-48 h here, beyond the issue's 10-15 h, so the confirmation's seeds were shrunk to seed 3 "
            "before it started (CONFIRM_SEEDS, SHRUNK): 18-26 h in all.")
SHRUNK = ("The lr grid runs on 4 screen units, seed 0 of sst2 and trec on both screen models (gemma3-270m, "
          "smollm2-135m), not on all 20: decided from cost alone before any grid unit ran (TIMING and ESTIMATE, "
          "benchmarks/field.py): the full screen would take 15-27 h, seed 0 alone 7.5-14 h. sst2 and trec are the two "
          "cheapest tasks, one binary and one six-way; every grid method and lr runs on every one of the 4 units, so "
          "the subset favours no method. ct_kv is not run on the large model, for cost alone (ESTIMATE: about 7 h "
          "for its five units, more than the rest of that stage); it is judged on the three small models. "
          "The confirmation's new methods run on seed 3 of each (model, task) alone (CONFIRM_SEEDS = [3], 15 units), "
          "not on seeds 3-5: decided from cost alone (ESTIMATE) on 2026-12-04, before any confirmation unit gained a "
          "new method and before the lr grid ran: three seeds would take 17-31 h for the peft keys, seed 3 alone "
          "5.6-10 h, so that the whole issue fits in about 18-26 h of sittings rather than 30-48. Every candidate, "
          "grad KV included, is then judged on the same 15 units (seed 3: the same demonstrations, dev and eval "
          "items, 1,500 paired items per model), as ct_kv always was; the tables still show grad KV and the baselines "
          "over all three seeds. What one seed cannot show is how much a method's gain varies with the draw of the "
          "demonstrations: the intervals resample items, not demonstration sets.")


def grid_key(method: str, lr: float) -> str:
    """The lr stage's key of `method` at `lr`: "lora@lr0.001" (no ablation key has this form)."""
    return f"{method}@lr{lr:g}"


def lr_grid(method: str) -> tuple:
    return LR_GRID["lora" if method == "lora_icl" else method]    # lora_icl reads lora's training run


def grid_methods(methods=None) -> dict:
    return {grid_key(m, lr): {**PEFT_OPTIONS, "lr": lr} for m in methods or PEFT for lr in lr_grid(m)}


def training_groups() -> list[list[str]]:
    """PEFT as runs that each train their own adapters (lora_icl beside lora: it reads lora's training run). A unit
    is saved after each run, so that an interrupt loses one method's work, not the unit's."""
    groups: dict[str, list[str]] = {}
    for m in PEFT:
        groups.setdefault("lora" if m == "lora_icl" else m, []).append(m)
    return list(groups.values())


def collisions() -> set[str]:
    """Field keys that an ablation method already uses (none: the confirmation's units gain them beside its own)."""
    return (set(grid_methods()) | set(new_methods())) & set(ab.GRID)


assert not collisions(), f"field keys collide with benchmarks/ablations.py's: {collisions()}"

RULE_LR = ("The lr rule, written before the grid ran: per method, the lr of its grid with the highest mean eval "
           "accuracy (summed log-prob) over the grid's screen units, a tie to the smaller lr. Screen eval items may "
           "choose it (the screen is not what is reported); confirmation items never do. A unit on which any lr of "
           "the method failed is left out for every lr of it (peft's failures are the architecture's, not the lr's); "
           "a method that failed on every unit keeps its default lr, and its confirmation units will say why it fails. "
           "lora_icl reads lora's training run and has its own choice from lora's grid.")
RULE_LARGE = (f"The large model's rule, written before the confirmation ran: once every confirmation unit holds every "
              f"new method, the {N_BEST} peft methods with the highest mean Δ against the bar over the three small "
              "models (per model, the mean over tasks of the paired difference to the better of ICL and calibrated "
              "ICL), among those that failed on no (model, task); a tie to the one with fewer tuning seconds. ct_kv "
              "is left out of the large model for cost (SHRUNK). The large stage refuses to start before that.")
RULE = ("The recommendation rule (issue 28), written before any confirmation unit gained a new method. Candidates: "
        f"grad KV (`{DEFAULT}`, the default) and every new method, all read on the same units: the small models' of seeds "
        f"{', '.join(map(str, CONFIRM_SEEDS))} (SHRUNK) and the large model's. A candidate qualifies if (a) its paired 95 % interval "
        "against the bar (the better of ICL and calibrated ICL per (model, task), chosen on eval) is above 0 on at "
        "least three of the four models (a model it did not run on counts as not above 0), (b) no (model, task) mean "
        "accuracy of it is more than 1 point below ICL's, and (c) it failed on no unit it ran on (a method that fails "
        "anywhere does not qualify: nothing is averaged over the seeds where it happened to run). Among qualifying "
        "methods the one with the highest mean Δ against the bar over the three small models (which every candidate "
        "ran) is recommended, except that any qualifying method within 0.5 points of it with "
        "fewer tuning seconds (the mean over its units) is preferred, the cheapest of those. If no method qualifies, "
        "the default stays grad KV (`grad_kv`, lr 0.01, T on dev): nothing of the field beats the bar reliably enough "
        "to replace it. The rule is applied once the confirmation and the large stage are complete; before that "
        "this page says pending.")


# ---- the lr stage: copies of the screen's units, the grid added --------------------------------------------------

def lr_units() -> list[tuple[str, str, int]]:
    return [(m, t, s) for s in LR_UNITS["seeds"] for m in ab.STAGES["screen"]["models"] for t in LR_UNITS["tasks"]]


def copy_screen_unit(model: str, task: str, seed: int) -> Path:
    """The lr stage's unit for (model, task, seed): a copy of the screen unit holding only BASE (its accuracy, info,
    config, seconds and per-item predictions as they are), with everything that fixes the items (demonstrations,
    dev and eval indices, model fingerprint) unchanged, so that the runner adds the grid on the same items. Made once;
    the screen's files are only read."""
    dst = unit_path(RESULTS / "lr", model, task, seed)
    if dst.exists():
        return dst
    src = unit_path(SCREEN, model, task, seed)
    unit = read_unit(src)
    if unit is None:
        raise FileNotFoundError(f"{src}: no screen unit to copy (benchmarks/ablations.py --stage screen makes it)")
    keep = [k for k in BASE if k in unit["config"]["methods"]]
    copy = dict(unit)
    copy["accuracy"] = {k: v for k, v in unit["accuracy"].items() if k in keep}
    copy["methods"] = {k: v for k, v in unit["methods"].items() if k in keep}
    copy["wall_s"] = {**{k: v for k, v in unit["wall_s"].items() if k in keep},
                      "total": round(sum(unit["wall_s"].get(k, 0) for k in keep), 3)}
    # the grid scores no per-step eval curve (an oracle; the screen's curve unit had one for its own methods)
    copy["config"] = {**unit["config"], "curve": False, "methods": {k: unit["config"]["methods"][k] for k in keep}}
    where = src.relative_to(ROOT.parent) if src.is_relative_to(ROOT.parent) else src
    copy["copied_from"] = {"unit": str(where), "sha256": sha256_file(src), "methods": keep,
                           "curve": unit["config"].get("curve", False)}
    rows = [json.loads(line) for line in src.with_suffix(".predictions.jsonl").read_text().splitlines()]
    others = set(unit["config"]["methods"]) - set(keep)
    text = "".join(json.dumps({k: v for k, v in r.items() if k not in others}, ensure_ascii=False) + "\n" for r in rows)
    write_atomic(dst.with_suffix(".predictions.jsonl"), text)
    write_atomic(dst, json.dumps(copy, indent=1, ensure_ascii=False))      # last: marks the copy made
    return dst


def same_items_as_source(unit: dict, source: dict) -> None:
    """Refuse a grid unit whose demonstrations, dev or eval items or model are not its screen unit's."""
    fields = ("demonstrations", "dev_indices", "eval_indices", "model_fingerprint", "n_eval", "n_dev")
    differs = [f for f in fields if (unit[f]["items"] if f == "demonstrations" else unit[f])
               != (source[f]["items"] if f == "demonstrations" else source[f])]
    if differs:
        raise ValueError(f"{unit['model']} {unit['task']} seed {unit['seed']}: the lr unit's {', '.join(differs)} "
                         "differ from its screen unit's: delete benchmarks/results/field/lr and run the lr stage again")


def grid_accuracy(units: list[dict]) -> dict:
    """{method: {lr: (mean accuracy over the units every lr of it ran on, n units) or None}, "fails": {method:
    reason}}."""
    out, fails = {}, {}
    for m in PEFT:
        keys = {lr: grid_key(m, lr) for lr in lr_grid(m)}
        ok = []
        for u in units:
            failed = [u["methods"].get(k, {}).get("fails") for k in keys.values()]
            if any(failed):
                fails.setdefault(m, next(f for f in failed if f))
            elif all(k in u["accuracy"] for k in keys.values()):
                ok.append(u)
        out[m] = {lr: ((statistics.fmean(u["accuracy"][k]["sum"] for u in ok), len(ok)) if ok else None)
                  for lr, k in keys.items()}
    return {**out, "fails": fails}


def choose_lr(units: list[dict]) -> dict:
    """RULE_LR: {method: lr}."""
    acc, chosen = grid_accuracy(units), {}
    for m in PEFT:
        ran = {lr: v[0] for lr, v in acc[m].items() if v is not None}
        if not ran:
            from deepthink.methods import get_method
            chosen[m] = get_method(m).Config().lr            # failed everywhere: its default, said so in FIELD.md
            continue
        chosen[m] = max(sorted(ran), key=lambda lr: round(ran[lr], 9))   # max keeps the first (smaller lr) of a tie
    return chosen


def chosen_path() -> Path:
    return RESULTS / "lr" / "chosen.json"


def write_chosen(units: list[dict]) -> dict:
    made = {"chosen": choose_lr(units), "grid": {m: {f"{lr:g}": v for lr, v in g.items()} for m, g in
                                                  grid_accuracy(units).items() if m != "fails"},
            "fails": grid_accuracy(units)["fails"], "units": sorted(Path(u["_file"]).stem for u in units),
            "rule": RULE_LR, "made": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_atomic(chosen_path(), json.dumps(made, indent=1))
    return made


def load_chosen() -> dict:
    path = chosen_path()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `python benchmarks/field.py --stage lr` to the end first "
                                "(the confirmation runs each peft method at the lr the screen's grid chose)")
    return json.loads(path.read_text())


# ---- the confirmation: the new methods added to the ablation confirmation's units --------------------------------

def confirm_methods(seed: int) -> list[dict]:
    """The methods added to a confirmation unit of `seed`, one run per training group (a unit is saved after each:
    an interrupt keeps every run before it): the peft methods at their chosen lr, then ct_kv on CT_KV_SEEDS."""
    chosen = load_chosen()["chosen"]
    runs = [{m: {**PEFT_OPTIONS, "lr": chosen[m]} for m in group} for group in training_groups()]
    return runs + ([dict(CT_KV)] if seed in CT_KV_SEEDS else [])


def confirm_jobs(models=None, tasks=None, seeds=None) -> list[list[tuple]]:
    """The runs, each a list of (model, task, seed, config) jobs, each config the unit's own (ab.stage_config):
    every unit must already exist (this stage adds to them; it never starts one)."""
    stage = ab.STAGES["confirm"]
    units = [(m, t, s) for s in seeds or CONFIRM_SEEDS for m in models or stage["models"] for t in tasks or ab.TASKS]
    missing = [unit_path(CONFIRM, *u).name for u in units if not unit_path(CONFIRM, *u).exists()]
    if missing:
        raise FileNotFoundError(f"the ablation confirmation lacks {len(missing)} unit(s) ({', '.join(missing[:3])}"
                                f"{', ...' if len(missing) > 3 else ''}) in {CONFIRM / 'units'}: this stage only adds "
                                "methods to finished units (benchmarks/ablations.py --stage confirm makes them)")
    peft, ct_kv = [], []          # each unit's peft runs in turn (a unit at a time), then ct_kv's long runs
    for m, t, s in units:
        for methods in confirm_methods(s):
            job = (m, t, s, ab.stage_config("confirm", m, t, s, methods))
            (ct_kv if set(methods) <= set(CT_KV) else peft).append([job])
    return peft + ([sum(ct_kv, [])] if ct_kv else [])


def planned(seed: int) -> list[str]:
    """The new methods a confirmation unit of `seed` is to hold."""
    return PEFT + (list(CT_KV) if seed in CT_KV_SEEDS else [])


def confirm_complete(units: list[dict]) -> bool:
    """Whether every confirmation unit of CONFIRM_SEEDS holds every new method planned for it."""
    stage = ab.STAGES["confirm"]
    have = {Path(u["_file"]).stem: u for u in units}
    want = [(unit_path(CONFIRM, m, t, s).stem, s) for m in stage["models"] for t in ab.TASKS for s in CONFIRM_SEEDS]
    return all(stem in have and all(k in have[stem]["methods"] for k in planned(s)) for stem, s in want)


# ---- the large model: baselines, grad KV and the two best new methods --------------------------------------------

def large_pick_path() -> Path:
    return RESULTS / "large" / "picked.json"


def pick_large(units: list[dict]) -> list[tuple[str, float, float]]:
    """RULE_LARGE over the confirmation's units: [(method, mean Δ vs bar over the small models, tuning s)] of the
    peft methods that failed nowhere, best first (on the judged units)."""
    units = judged(units)
    bar = ab.better_baseline(units)
    ranked = []
    for k in PEFT:                        # ct_kv is not run on the large model (SHRUNK)
        if failures(units, k):
            continue
        ivs = [ab.compare([u for u in units if u["model"] == m], k, bar) for m in SMALL]
        if None in ivs:
            continue
        ranked.append((k, round(statistics.fmean(iv.mean for iv in ivs), 9), tuning_seconds(units, k)))
    return sorted(ranked, key=lambda r: (-r[1], r[2] if r[2] is not None else float("inf")))


def large_methods() -> dict:
    path = large_pick_path()
    if not path.exists():
        confirm = confirm_units()
        if not confirm_complete(confirm):
            raise FileNotFoundError(f"{path} does not exist and the confirmation is not complete: finish `python "
                                    "benchmarks/field.py --stage confirm` first (the large model runs the two best new "
                                    "methods of the confirmation, by RULE_LARGE)")
        ranked = pick_large(confirm)
        options = {k: next(u["config"]["methods"][k] for u in confirm if k in u["config"]["methods"])
                   for k, _, _ in ranked[:N_BEST]}
        write_atomic(path, json.dumps({"picked": [k for k, _, _ in ranked[:N_BEST]], "options": options,
                                       "ranking": ranked, "rule": RULE_LARGE,
                                       "made": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1))
    made = json.loads(path.read_text())
    return {**{k: ab.GRID[k] for k in BASE}, **{k: made["options"][k] for k in made["picked"]}}


def planned_large() -> set[str]:
    """The methods the large model runs: the baselines, grad KV and RULE_LARGE's pick (none picked yet: all may)."""
    return set(large_methods()) if large_pick_path().exists() else {DEFAULT, *new_methods()}


def large_finished(large: list[dict]) -> tuple[int, int]:
    """(finished, wanted) large-model units: finished ones hold the baselines, grad KV and the picked methods (a unit's
    file exists as soon as its first part, the baselines, has run: counting files is not enough)."""
    wanted = len(ab.TASKS) * len(LARGE["seeds"]) * len(LARGE["models"])
    if not large_pick_path().exists():
        return 0, wanted
    methods = large_methods()
    return sum(all(k in u["methods"] for k in methods) for u in large), wanted


def large_config(task: str, methods: dict) -> EvalConfig:
    return EvalConfig(shots=ab.SHOTS[task], dev_size=LARGE["dev_size"], max_eval=LARGE["max_eval"], curve=False,
                      batch_size=16, methods=methods, fit_shots=True)


# ---- reading the units -------------------------------------------------------------------------------------------

def _units(d: Path) -> list[dict]:
    return load_units([d]) if list((d / "units").glob("*.json")) else []


def lr_units_done() -> list[dict]:
    units = _units(RESULTS / "lr")
    for u in units:                   # the copy has its screen unit's file name
        same_items_as_source(u, json.loads((SCREEN / "units" / Path(u["_file"]).name).read_text()))
    return units


def confirm_units() -> list[dict]:
    return _units(CONFIRM)


def large_units() -> list[dict]:
    return _units(RESULTS / "large")


def failures(units: list[dict], key: str) -> dict[tuple[str, str], str]:
    """{(model, task): reason} where `key` failed on any unit."""
    out = {}
    for u in units:
        reason = u["methods"].get(key, {}).get("fails")
        if reason:
            out.setdefault((u["model"], u["task"]), reason)
    return out


def tuning_seconds(units: list[dict], key: str) -> float | None:
    """Mean tuning seconds of `key` over (model, task) (each the mean over its seeds), from the method's own record."""
    per: dict[tuple, list[float]] = {}
    for u in units:
        s = u["methods"].get(key, {}).get("tuning_seconds")
        if s is not None:
            per.setdefault((u["model"], u["task"]), []).append(s)
    return round(statistics.fmean(statistics.fmean(v) for v in per.values()), 3) if per else None


def cell(units: list[dict], key: str, model: str, task: str) -> str:
    """Mean ± std accuracy over seeds, or "fails: <reason>" when it failed on any seed (no mean over the rest)."""
    us = [u for u in units if (u["model"], u["task"]) == (model, task)]
    why = failures(us, key).get((model, task))
    return f"fails: {why}" if why else fmt(ab.mean_acc(us, key))


# ---- the recommendation ------------------------------------------------------------------------------------------

def candidates(units: list[dict]) -> list[str]:
    present = {k for u in units for k in u["methods"]}
    return [k for k in [DEFAULT] + new_methods() if k in present]


def judged(units: list[dict]) -> list[dict]:
    """The units the rules read: the small models' on CONFIRM_SEEDS (every candidate ran on them), the large model's."""
    return [u for u in units if u["model"] not in SMALL or u["seed"] in CONFIRM_SEEDS]


def judge(units: list[dict]) -> list[dict]:
    """Every candidate against RULE, on the judged units: per model its interval vs the bar, how many are above 0, its
    worst (model, task) mean vs ICL, its failures, its mean Δ over the small models, its tuning seconds, and whether it
    qualifies."""
    units = judged(units)
    bar = ab.better_baseline(units)
    models = sorted({u["model"] for u in units}, key=lambda m: (m not in SMALL, m))
    rows = []
    for k in candidates(units):
        fails = failures(units, k)
        ivs = {m: (None if any(mm == m for mm, _ in fails) else ab.compare([u for u in units if u["model"] == m], k, bar))
               for m in models}
        gaps = []
        for m in models:
            for t in ab.TASKS:
                us = [u for u in units if (u["model"], u["task"]) == (m, t) and k in u["accuracy"]]
                a, b = ab.mean_acc(us, k), ab.mean_acc(us, ab.REFERENCE)     # ICL on the same seeds (ct_kv: seed 3)
                if a and b and (m, t) not in fails:
                    gaps.append((round(a[0] - b[0], 9), f"{m} {t}"))
        small = [ivs[m].mean for m in SMALL if ivs.get(m) is not None]
        above = sum(1 for iv in ivs.values() if iv is not None and iv.above_zero)
        worst = min(gaps) if gaps else None
        ok = not fails and above >= 3 and worst is not None and worst[0] >= -1
        rows.append({"method": k, "ivs": ivs, "above": above, "worst": worst, "fails": fails,
                     "mean_small": statistics.fmean(small) if len(small) == len(SMALL) else None,
                     "tuning_s": tuning_seconds(units, k), "qualifies": ok and len(small) == len(SMALL)})
    return rows


def recommend(units: list[dict]) -> tuple[str, str]:
    """RULE applied: (method key, why in one sentence)."""
    ok = [r for r in judge(units) if r["qualifies"]]
    if not ok:
        return "grad_kv", "no method qualifies, so the default stays grad KV (`grad_kv`, lr 0.01, T on dev)"
    top = max(ok, key=lambda r: r["mean_small"])
    near = [r for r in ok if top["mean_small"] - r["mean_small"] <= 0.5 + 1e-9]
    cheap = min(near, key=lambda r: (r["tuning_s"] if r["tuning_s"] is not None else float("inf"), -r["mean_small"]))
    why = (f"`{cheap['method']}` has the highest mean Δ against the bar of the qualifying methods "
           f"({cheap['mean_small']:+.1f} over the three small models)" if cheap is top else
           f"`{cheap['method']}` ({cheap['mean_small']:+.1f} over the three small models, {cheap['tuning_s']:.0f} s of "
           f"tuning) is within 0.5 points of `{top['method']}` ({top['mean_small']:+.1f}, {top['tuning_s']:.0f} s) "
           "and cheaper")
    return ("grad_kv" if cheap["method"] == DEFAULT else cheap["method"]), why


# ---- FIELD.md ----------------------------------------------------------------------------------------------------

def delta_section(units: list[dict], keys: list[str]) -> list[str]:
    """Per model: accuracy per task (fails shown), Δ vs ICL, vs the bar and vs grad KV with paired intervals; then
    W/T/L per task against the bar over seeds. Where the new methods ran on fewer seeds than the unit's baselines
    (the small models: CONFIRM_SEEDS), the first table holds every method on those seeds alone (what the rules read,
    everything on the same items), the second the methods that ran on every seed, on all of them."""
    lines = []
    for model in sorted({u["model"] for u in units}):
        mu = [u for u in units if u["model"] == model]
        ju = judged(mu)
        seeds = sorted({u["seed"] for u in mu})
        lines += [f"### {model} ({len(mu)} units; seeds {', '.join(map(str, seeds))})", "",
                  "Accuracy % (summed log-prob, mean ± std over the table's seeds). Δ = mean over tasks of the paired "
                  "difference in points [95 % bootstrap interval over (seed, item)]; bar = the better of ICL and "
                  f"calibrated ICL per task (chosen on eval, on the table's units); grad KV = `{DEFAULT}`. A method "
                  "that failed on any seed of a task shows \"fails\" there and no Δ.", ""]
        if not ju or len(ju) == len(mu):      # every unit judged, or none (a small model's name off its seeds)
            lines += method_table(mu, keys)
        else:
            js = sorted({u["seed"] for u in ju})
            lines += [f"Seed{'s' if len(js) > 1 else ''} {', '.join(map(str, js))} alone: every method on the same "
                      "units (the rules read these):", "", *method_table(ju, keys),
                      f"Seeds {', '.join(map(str, seeds))}: the methods that ran on all of them:", "",
                      *method_table(mu, [k for k in keys if all(k in u["methods"] or k in u["accuracy"] for u in mu)])]
    return lines


def method_table(mu: list[dict], keys: list[str]) -> list[str]:
    """One model's units `mu`: the accuracy and Δ table of `keys` (those present), then its W/T/L table."""
    bar = ab.better_baseline(mu)
    model = mu[0]["model"]
    tasks = [t for t in ab.TASKS if any(u["task"] == t for u in mu)]
    present = [k for k in keys if any(k in u["methods"] for u in mu)]
    lines = ["| method | " + " | ".join(tasks) + " | Δ vs ICL | Δ vs bar | Δ vs grad KV |",
             "|---|" + "---|" * len(tasks) + "---|---|---|"]
    wtl = []
    for k in present:
        cells = [cell(mu, k, model, t) for t in tasks]
        failed = bool(failures(mu, k))
        ds = ["–" if failed or k == ref else str(ab.compare(mu, k, ref) or "–")
              for ref in (ab.REFERENCE, bar, DEFAULT)]
        lines.append(f"| {label(k)} | " + " | ".join(cells) + " | " + " | ".join(ds) + " |")
        per = []
        for t in tasks:
            us = [u for u in mu if u["task"] == t and k in u["accuracy"] and bar(model, t) in u["accuracy"]]
            w, ti, lo = wins_ties_losses([u["accuracy"][k]["sum"] for u in us],
                                         [u["accuracy"][bar(model, t)]["sum"] for u in us])
            per.append(f"{w}/{ti}/{lo}" if us else "–")
        wtl.append(f"| {label(k)} | " + " | ".join(per) + " |")
    return lines + ["", "W/T/L per task against the bar, over seeds (accuracy per unit):", "",
                    "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks), *wtl, ""]


def _mb(x) -> str:
    return "–" if x is None else f"{x:,.0f}"


def _bytes(x) -> str:
    if x is None:
        return "–"
    for unit, size in (("GB", 2 ** 30), ("MB", 2 ** 20), ("kB", 2 ** 10)):
        if x >= size:
            return f"{x / size:.1f} {unit}"
    return f"{x} B"


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def artifact(u: dict, k: str) -> int | None:
    """What the method saves: a peft method's adapter (its trainable tensors), a cache method's keys/values (recorded,
    or the unit's demonstration tokens times the model's KV bytes per token)."""
    info = u["methods"].get(k, {})
    if k == "zero_shot":
        return None                       # nothing to save
    if "adapter_bytes" in info:
        return info["adapter_bytes"]
    if k in u.get("cache_bytes", {}) and k not in PEFT:
        return u["cache_bytes"][k]
    if (k == "icl" or k.startswith(("grad_kv", "ct_kv"))) and u.get("kv_bytes_per_token"):
        return u["demonstrations"]["tokens"] * u["kv_bytes_per_token"]
    return None


def cost_section(units: list[dict], keys: list[str]) -> list[str]:
    lines = ["Per method and model, the mean over the units it ran on (\"–\": not recorded; units made before the "
             "runner recorded a cost keep none for their old methods). Tuning s: the method's own training record. "
             "Peak RSS: the process's resident set high-water mark during the method, reset at its start through "
             "/proc/self/clear_refs, beside the resident set at its start (both include the model's weights and what "
             "earlier methods of the unit hold; lora_icl reads lora's training run, so its peak is scoring only); for "
             "grad KV in units that predate that, the process's lifetime peak after its tuning (ru_maxrss, an upper "
             "bound) in brackets. Artifact: what `deepthink tune` would save, the peft adapter's trainable tensors "
             "against a cache method's keys/values. Cache read: the keys/values the scorer puts before each query. "
             "Items/s: the method's own eval scoring pass (methods whose eval scores another method already computed "
             "claim none). The same methods' tuning cost on a GPU, at a Llama-2-7B shape with random weights: "
             "benchmarks/results/gpu/README.md (benchmarks/tune_cost.py).", "",
             "| model | method | tuning s | peak RSS MB (start) | artifact | cache read | scoring items/s |",
             "|---|---|---|---|---|---|---|"]
    for model in sorted({u["model"] for u in units}):
        mu = [u for u in units if u["model"] == model]
        for k in keys:
            us = [u for u in mu if k in u["accuracy"]]
            if not us:
                continue
            peak = _mean(u.get("memory_mb", {}).get(k, {}).get("peak_mb") for u in us)
            start = _mean(u.get("memory_mb", {}).get(k, {}).get("start_mb") for u in us)
            mem = f"{_mb(peak)} ({_mb(start)})" if peak is not None else "–"
            proc = _mean(u["methods"][k].get("process_peak_rss_mb") for u in us)
            if peak is None and proc is not None:
                mem = f"– (≤ {proc:,.0f})"
            ts = _mean(u["methods"][k].get("tuning_seconds") for u in us)
            speed = [u["scoring"][k]["items"] / u["scoring"][k]["seconds"] for u in us
                     if k in u.get("scoring", {}) and u["scoring"][k]["seconds"] > 0]
            lines.append(f"| {model} | {label(k)} | {'–' if ts is None else f'{ts:,.1f}'} | {mem} | "
                         f"{_bytes(_mean(artifact(u, k) for u in us))} | "
                         f"{_bytes(_mean(u.get('cache_bytes', {}).get(k) for u in us))} | "
                         f"{'–' if not speed else f'{statistics.fmean(speed):,.1f}'} |")
    return lines + [""]


def lr_section(units: list[dict]) -> list[str]:
    want = len(lr_units())
    lines = [f"## The lr grid ({len(units)} of {want} units)", "", RULE_LR, "", SHRUNK, "",
             *sitting_lines(RESULTS / "lr" / "sittings.jsonl"), ""]
    if not units:
        return lines + ["No grid unit has finished yet.", ""]
    acc = grid_accuracy(units)
    width = max(len(lr_grid(m)) for m in PEFT)
    lines += ["Mean eval accuracy % over the grid's units (summed log-prob; n = units every lr of the method ran on), "
              "per lr of the method's grid:", "", "| method | " + " | ".join(f"lr {i + 1}" for i in range(width))
              + " | fails |", "|---|" + "---|" * (width + 1)]
    for m in PEFT:
        cells = [f"{lr:g}: " + (f"{v[0]:.1f} (n={v[1]})" if v else "–") for lr, v in acc[m].items()]
        cells += [""] * (width - len(cells))
        lines.append(f"| {label(m)} | " + " | ".join(cells) + f" | {acc['fails'].get(m, '') or 'none'} |")
    if chosen_path().exists():
        made = load_chosen()
        lines += ["", f"Chosen on {made['made']} (written to `benchmarks/results/field/lr/chosen.json` before any "
                  "confirmation unit gained a new method): " + ", ".join(f"`{m}` lr {lr:g}" for m, lr in
                                                                       made["chosen"].items()) + "."]
    return lines + [""]


def recommendation_section(confirm: list[dict], large: list[dict]) -> list[str]:
    lines = ["## Recommended default", "", RULE, ""]
    complete, (done, wanted) = confirm_complete(confirm), large_finished(large)
    if not complete or done < wanted:
        return lines + [f"Pending: the confirmation is {'complete' if complete else 'not complete'}, "
                        f"{done} of {wanted} large-model units have finished. Until the rule is applied the "
                        "default stays grad KV."]
    units = confirm + large
    rows = judge(units)
    models = list(rows[0]["ivs"]) if rows else []
    lines += ["| method | " + " | ".join(f"{m}: Δ vs bar" for m in models) + " | models above 0 | worst vs ICL | "
              "fails | mean Δ (small) | tuning s | qualifies |", "|---|" + "---|" * len(models) + "---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {label(r['method'])} | " + " | ".join(str(r["ivs"][m] or "–") for m in models)
                     + f" | {r['above']} of {len(models)} | "
                     + (f"{r['worst'][0]:+.1f} ({r['worst'][1]})" if r["worst"] else "–") + " | "
                     + ("; ".join(f"{m} {t}: {why}" for (m, t), why in r["fails"].items()) or "none") + " | "
                     + ("–" if r["mean_small"] is None else f"{r['mean_small']:+.1f}") + " | "
                     + ("–" if r["tuning_s"] is None else f"{r['tuning_s']:,.1f}") + f" | {'yes' if r['qualifies'] else 'no'} |")
    best, why = recommend(units)
    return lines + ["", f"**Recommended default: `{best}`**: {why}.", "", *goal_section(units)]


GOAL = ("Issue 28's goal, set before any unit gained a new method: grad KV at least level with the best of the "
        "field's methods on every model (read here literally, a reading fixed after the results were in: its "
        "mean Δ against the bar not below any other method's; the paired differences are beside it), at least 3 "
        "points over the bar on all four models with its interval above 0, and cheaper to "
        "tune than CT-KV's 200 epochs.")


def goal_rows(units: list[dict]) -> list[dict]:
    """Per model, from `judge`'s intervals: grad KV's Δ against the bar, the other method (failing on none of the
    model's units) with the highest mean Δ against the bar there, and that method minus grad KV, paired."""
    rows = {r["method"]: r for r in judge(units)}
    ours = rows.get(DEFAULT, {"ivs": {}})["ivs"]
    units = judged(units)
    out = []
    for m in (next(iter(rows.values()))["ivs"] if rows else []):
        others = [(r["ivs"][m], k) for k, r in rows.items() if k != DEFAULT and r["ivs"][m] is not None]
        best = max(others, key=lambda x: x[0].mean, default=(None, None))
        out.append({"model": m, "ours": ours.get(m), "best": best[1], "best_iv": best[0],
                    "best_vs_ours": ab.compare([u for u in units if u["model"] == m], best[1], DEFAULT)
                    if best[1] else None})
    return out


def goal_section(units: list[dict]) -> list[str]:
    """GOAL against the judged units: a row per model, then each clause met or not."""
    rows = goal_rows(units)
    lines = ["## Against the issue's goal", "", GOAL, "",
             "| model | grad KV vs bar | best other method | its Δ vs bar | it minus grad KV |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['ours'] or '–'} | " + (f"{label(r['best'])} | {r['best_iv']} | "
                                                                   f"{r['best_vs_ours']} |" if r["best"] else "– | – | – |"))
    small = [u for u in judged(units) if u["model"] in SMALL]
    ours_s, ct_s = tuning_seconds(small, DEFAULT), tuning_seconds(small, "ct_kv")
    level = [r["model"] for r in rows if r["best"] and r["ours"] and r["best_iv"].mean > r["ours"].mean]
    short = [r["model"] for r in rows if not (r["ours"] and r["ours"].mean >= 3 and r["ours"].above_zero)]
    lines += ["", "- Level with the best on every model: " + ("yes" if not level else "no; below "
              + ", ".join(f"{label(r['best'])} on {r['model']}" for r in rows if r["model"] in level)) + ".",
              "- At least 3 points over the bar, interval above 0, on all four: " + ("yes" if not short else
              "no; not on " + ", ".join(short)) + ".",
              "- Cheaper to tune than CT-KV: " + ("not measured" if ours_s is None or ct_s is None else
              f"{'yes' if ours_s < ct_s else 'no'}, {ours_s:.0f} s against {ct_s:.0f} s a unit (mean over the small "
              f"models' units both ran on)") + ".", ""]
    return lines


def readme_block(confirm: list[dict], large: list[dict]) -> str:
    """The README's rows of the field's methods: per model, Δ against the bar, or "not measured yet"."""
    units = [u for u in confirm + large if any(k in u["methods"] for k in new_methods())]
    head = ("The field's methods beside grad KV (`benchmarks/field.py`; full tables, costs and the rule that picks the "
            "default: [benchmarks/results/FIELD.md](benchmarks/results/FIELD.md)).")
    if not units:
        return head + " Not measured yet: " + ", ".join(f"`{k}`" for k in new_methods()) + "."
    all_units = judged(confirm + large)     # every method on the same units: what the rule reads
    ab_seeds = ab.STAGES["confirm"]["seeds"]     # the ablation confirmation's seeds, grad KV's row in its table
    bar = ab.better_baseline(all_units)
    models = sorted({u["model"] for u in all_units}, key=lambda m: (m not in SMALL, m))
    lines = [head + " Points against the bar (the better of ICL and calibrated ICL per task), paired 95 % interval, "
             f"on the units the rule reads (the small models' seed {', '.join(map(str, CONFIRM_SEEDS))} of each task, "
             f"where every method ran; grad KV's Δ over seeds {min(ab_seeds)}-{max(ab_seeds)} is in the ablation "
             "table above); units finished so far, counted in each cell (a partial cell is not yet comparable with "
             "its row).", "",
             "| method | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for k in [DEFAULT] + new_methods():
        cells = []
        for m in models:
            mu = [u for u in all_units if u["model"] == m]
            f = failures(mu, k)
            d, n = ab.compare(mu, k, bar), sum(k in u["accuracy"] for u in mu)     # n: the methods differ in units
            cells.append(f"fails: {next(iter(f.values()))}" if f else f"{d} ({n} units)" if d else
                         "not run here (RULE_LARGE)" if m not in SMALL and k not in planned_large() else "not measured yet")
        lines.append(f"| {label(k)} | " + " | ".join(cells) + " |")
    done, wanted = large_finished(large)
    best = recommend(all_units)[0] if confirm_complete(confirm) and done >= wanted else None
    goal = ""
    if best:
        rows = goal_rows(all_units)
        goal = (" Best other method per model against grad KV, paired (FIELD.md, \"Against the issue's goal\"): "
                + "; ".join(f"{r['model']} {label(r['best'])} {r['best_vs_ours']}" for r in rows if r["best"]) + ".")
    return "\n".join(lines) + "\n\n" + (f"Recommended default by FIELD.md's rule: `{best}`." + goal if best else
                                        "Recommended default by FIELD.md's rule: pending; grad KV until then.")


def write_markdown() -> Path:
    lr, confirm, large = lr_units_done(), confirm_units(), large_units()
    keys = ["zero_shot", "icl", "icl_cc", DEFAULT] + new_methods()
    lines = ["# The field's methods beside grad KV", "",
             "Produced by `python benchmarks/field.py` (resumable; the commands are in its docstring). The protocol is "
             "the ablation benchmark's (benchmarks/results/ABLATIONS.md): the ACL paper's shot counts, 64 dev items "
             "from the training data, every step and option chosen without eval labels; the peft methods train on the "
             "demonstrations alone and choose their step on the dev items, as grad KV does (docs/methods.md).", "",
             f"Cost, measured before any stage ran: {TIMING}", "", f"Estimate: {ESTIMATE}", "", *lr_section(lr),
             f"## Confirmation: three small models, seeds {', '.join(map(str, CONFIRM_SEEDS))}", "",
             "Each peft method at its chosen lr added to the ablation confirmation's units (ICL, calibrated ICL and "
             f"`{DEFAULT}` are those units' own, computed before and untouched); `ct_kv` (the authors' recipe, 200 "
             "epochs) and `ct_kv@dev` (the same run, the epoch chosen on dev) on seed 3 alone, for cost.", "",
             *sitting_lines(RESULTS / "confirm" / "sittings.jsonl"), ""]
    with_new = [u for u in confirm if any(k in u["methods"] for k in new_methods())]
    lines += (delta_section(confirm, keys) if with_new else ["No confirmation unit holds a new method yet.", ""])
    lines += [f"## The large model: {', '.join(LARGE['models'])}, seed {', '.join(map(str, LARGE['seeds']))}", "",
              RULE_LARGE, ""]
    if large_pick_path().exists():
        made = json.loads(large_pick_path().read_text())
        lines += [f"Picked on {made['made']}: " + ", ".join(f"`{k}`" for k in made["picked"]) + ".", ""]
    lines += [*sitting_lines(RESULTS / "large" / "sittings.jsonl"), ""]
    lines += delta_section(large, keys) if large else ["No large-model unit has finished yet.", ""]
    lines += ["## Cost", "", *(cost_section(confirm + large, keys) if with_new or large
                               else ["Not measured yet.", ""])]
    lines += recommendation_section(confirm, large)
    write_atomic(MARKDOWN, "\n".join(lines) + "\n")
    replace_marked(README, README_MARK, readme_block(confirm, large))
    return MARKDOWN


# ---- running -----------------------------------------------------------------------------------------------------

def lr_config(model: str, task: str, seed: int, methods=None) -> EvalConfig:
    """The screen unit's own settings, the grid (of `methods`, default PEFT) as methods, no per-step eval curve (the
    copies say curve False)."""
    cfg = ab.stage_config("screen", model, task, seed, grid_methods(methods))
    return EvalConfig(**{**cfg.to_dict(), "curve": False})


def stage_jobs(stage: str, models=None, tasks=None, seeds=None) -> tuple[Path, list[list[tuple]]]:
    """(where the stage's units are, its jobs in runs: each run one run_units call)."""
    if stage == "lr":
        todo = [(m, t, s) for m, t, s in lr_units()
                if (not models or m in models) and (not tasks or t in tasks) and (not seeds or s in seeds)]
        for u in todo:
            copy_screen_unit(*u)
        # a run per (unit, training group): each saves the unit, so that an interrupt loses one method's grid at most
        return RESULTS / "lr", [[(m, t, s, lr_config(m, t, s, group))]
                                for m, t, s in todo for group in training_groups()]
    if stage == "confirm":
        return CONFIRM, confirm_jobs(models, tasks, seeds)
    methods = large_methods()     # a run per (unit, part): the baselines with grad KV, then each picked method alone
    parts = [{k: methods[k] for k in BASE}] + [{k: v} for k, v in methods.items() if k not in BASE]
    return RESULTS / "large", [[(m, t, s, large_config(t, part))] for s in seeds or LARGE["seeds"]
                               for m in models or LARGE["models"] for t in tasks or ab.TASKS for part in parts]


def finished_units(out: Path, jobs: list[tuple]) -> set[str]:
    """The units (file stems) that hold every method of every one of their jobs."""
    from deepthink.evaluation.runner import lacking

    stems: dict[str, bool] = {}
    for m, t, s, cfg in jobs:
        stem = unit_path(out, m, t, s).stem
        stems[stem] = stems.get(stem, True) and lacking(out, m, t, s, cfg) == []
    return {stem for stem, done in stems.items() if done}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["lr", "confirm", "large"], default="lr")
    p.add_argument("--models", nargs="+", default=None, help="run only these models of the stage")
    p.add_argument("--tasks", nargs="+", default=None, choices=ab.TASKS, help="run only these tasks")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="run only these seeds of the stage")
    p.add_argument("--data-dir", default=None, help="folder with <task>/{train,eval}.jsonl (default: ../shared/data)")
    p.add_argument("--write-only", action="store_true", help="only rewrite FIELD.md from finished units")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    procs = Processes()
    set_threads(procs.threads(None))
    if not args.write_only:
        try:                                   # a stage whose rule has nothing to read yet is refused in one line
            if args.stage == "confirm":
                load_chosen()
            out, runs = stage_jobs(args.stage, args.models, args.tasks, args.seeds)
        except FileNotFoundError as e:
            print(f"field.py: {e}", file=sys.stderr)
            return 2
        log = RESULTS / args.stage / "sittings.jsonl"
        every = [j for run in runs for j in run]
        before = finished_units(out, every)
        interrupt_on_sigterm()     # a kill ends the sitting as Ctrl-C does: recorded, the units written kept
        sitting = Sitting("python benchmarks/field.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        error, models = None, {}          # one load of each model for all the runs
        try:
            for jobs in runs:
                run_units(jobs, out, data_dir=args.data_dir, progress=not args.quiet, procs=procs, lm_cache=models)
        except BaseException as e:    # recorded (a failed sitting costs time too), then raised
            error = stopped_by(e)
            raise
        finally:
            if procs.is_main:
                done = sorted(finished_units(out, every) - before)
                if done or error or not log.exists():
                    sitting.record(log, done, procs.size, error)
        procs.close()
        if procs.is_main and args.stage == "lr" and not chosen_path().exists():
            units = lr_units_done()
            if len(units) == len(lr_units()) and all(k in u["methods"] for u in units for k in grid_methods()):
                made = write_chosen(units)
                print(f"lr chosen by the rule: {made['chosen']} -> {chosen_path()}")
    if procs.is_main:
        print(f"wrote {write_markdown()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
