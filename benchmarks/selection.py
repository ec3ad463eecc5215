"""Selection rules for grad_kv's T, replayed on stored data (issue 31).

    python benchmarks/selection.py                     # record the oracle files: screen, then confirmation (resumable)
    python benchmarks/selection.py --stage screen --models smollm2-135m --tasks sst2 --seeds 0   # a slice
    python benchmarks/selection.py --write-only        # only replay the rules and rewrite SELECTION.md

The recorder re-runs the default method (`grad_kv@lr01` of benchmarks/ablations.py: Adam at lr 0.01, T in 1..15)
on exactly the demonstrations, dev items and eval items of each ablation unit (screen: gemma3-270m + smollm2-135m,
seeds 0-1; confirmation: those + qwen2.5-coder-0.5b, seeds 3-5; the same seeded draw, checked against the unit),
and stores per step t = 1..15: per dev item whether the "sum" prediction is right and the gold choice's
log-probability among the choices and margin over the best other choice; the same for a pool of 64 further
training items (disjoint from the demonstrations and dev items: dev + pool = "a larger dev split" of 128; 64, not
192, decided from the first unit's measured cost, see POOL); per eval item whether it is
right; the train loss. Scoring eval at every step is an ORACLE: the files say so, and they serve only to replay
selection rules (which read dev / pool data only) and read the eval outcome at the T a rule picks. The recomputed
dev curve must match the unit's stored one within one dev item per step; a mismatch is recorded and printed.

Resumable: one file per unit under benchmarks/results/selection/<stage>/oracle/, written when the unit finishes;
run the same command again to continue. Each run appends to <stage>/sittings.jsonl (command, units, minutes, git).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ABLATIONS = ROOT / "results" / "ablations"
RESULTS = ROOT / "results" / "selection"
MARKDOWN = ROOT / "results" / "SELECTION.md"

METHOD = "grad_kv@lr01"          # the default method as the ablation units ran it
LABEL = "oracle: eval scored at every step, for replaying selection rules only"
# further training items scored per step: dev 64 + pool 64 = a dev split of 128. The first unit (smollm2-135m sst2
# seed 0) recorded 192: on a 2-core machine shared with several jobs its 15 steps took 5684 s, 3133 s of them
# scoring the pool (tuning + dev curve 1150 s, eval 1401 s), which would put the 65 units past several days, so the
# rest record 64. The draw is a seeded sample whose first 64 are the
# 64-item draw (tests/evaluation/test_selection_script.py), so the replay reads the first POOL of any record.
POOL = 64
STAGES = {"screen": dict(models=["smollm2-135m", "gemma3-270m"], seeds=[0, 1], max_eval=200, dev_size=64),
          "confirm": dict(models=["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"], seeds=[3, 4, 5],
                          max_eval=300, dev_size=64)}
TASKS = ["sst2", "sst5", "trec", "mr", "agnews"]


def oracle_path(stage: str, model: str, task: str, seed: int) -> Path:
    from deepthink.io import safe_name

    return RESULTS / stage / "oracle" / f"{safe_name(model)}__{safe_name(task)}__seed{seed}.json"


def ablation_unit(stage: str, model: str, task: str, seed: int) -> dict:
    from deepthink.evaluation.runner import unit_path

    path = unit_path(ABLATIONS / stage, model, task, seed)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no ablation unit to replay (run benchmarks/ablations.py --stage {stage})")
    return json.loads(path.read_text())


def per_item(scores, gold: list[int]) -> dict:
    """Per item: right or not ("sum" prediction, as a 0/1 string), the gold choice's log softmax over the item's
    choices (summed log-probabilities) and its margin over the best other choice."""
    from deepthink.methods.selection import gold_logps

    preds = scores.predictions()
    logp = [round(x, 5) for x in gold_logps(scores, gold)]
    margin = [round(row[g] - max(x for j, x in enumerate(row) if j != g), 5) for row, g in zip(scores.logprob, gold)]
    return {"correct": "".join("1" if p == g else "0" for p, g in zip(preds, gold)), "gold_logp": logp,
            "margin": margin}


def pool_items(plan, seed: int, size: int, data_dir=None) -> list:
    """`size` training items drawn with their own seed from those that are neither demonstrations nor dev items."""
    from deepthink.data import load_rows

    if plan.task.demo_pool != "train" or size == 0:
        return []
    rows = load_rows(plan.task, "train", data_dir)
    taken = {e.index for e in plan.demos} | {e.index for e in plan.dev}
    rest = [i for i in range(len(rows)) if i not in taken]
    ids = random.Random(f"pool:{seed}").sample(rest, min(size, len(rest)))
    return [plan.task.example(rows[i], i, "train") for i in ids]


def record_unit(lm, stage: str, model: str, task: str, seed: int, data_dir=None, pool_size: int = POOL,
                log=print) -> dict:
    """The oracle record of one ablation unit (see the module's docstring)."""
    from deepthink.data import make_plan
    from deepthink.evaluation.config import upgrade_config
    from deepthink.evaluation.provenance import git_hash
    from deepthink.methods import Setup, make_method
    from deepthink.evaluation.report import unit_correct

    t0 = time.perf_counter()
    unit = ablation_unit(stage, model, task, seed)
    shots = unit["demonstrations"].get("shots", unit["config"]["shots"])      # older units: as configured
    plan = make_plan(task, seed, shots=shots, dev_size=unit["n_dev"], max_eval=unit["config"]["max_eval"],
                     data_dir=data_dir)
    drawn = {"demonstrations": plan.demonstrations == unit["demonstrations"]["text"],
             "dev": [e.index for e in plan.dev] == unit["dev_indices"],
             "eval": [e.index for e in plan.eval] == unit["eval_indices"]}
    if not all(drawn.values()):
        raise ValueError(f"{model} {task} seed {seed}: the seeded draw differs from the ablation unit's ({drawn}); "
                         "the oracle would describe other items")
    opts = upgrade_config(unit["config"])["methods"][METHOD]
    method = make_method(METHOD, opts)
    setup = Setup(lm, plan.demonstrations, plan.dev, unit["config"]["batch_size"], task=plan.task, demos=plan.demos)
    prepared = method.prepare(setup)                 # the tuning run and its dev curve, as the unit ran them
    t_prep = time.perf_counter()
    contexts = prepared.curve
    dev_gold, ev_gold = [e.label for e in plan.dev], [e.label for e in plan.eval]
    dev = [per_item(setup.score_dev(c), dev_gold) for c in contexts]
    t_dev = time.perf_counter()
    pool = pool_items(plan, seed, pool_size, data_dir)
    pool_gold = [e.label for e in pool]
    pooled = [per_item(setup.workspace.score(c, pool, setup.batch_size), pool_gold) for c in contexts] if pool else []
    t_pool = time.perf_counter()
    ev = [per_item(setup.workspace.score(c, plan.eval, setup.batch_size), ev_gold)["correct"] for c in contexts]
    t_eval = time.perf_counter()

    stored = [c["sum"] for c in unit["methods"][METHOD]["dev_curve"]]
    again = [100.0 * d["correct"].count("1") / len(dev_gold) for d in dev]
    off = [round(abs(a - b) * len(dev_gold) / 100) for a, b in zip(stored, again)]
    chosen = unit["methods"][METHOD]["chosen_steps"]
    correct = unit_correct({"_file": str(_unit_file(stage, model, task, seed))})
    row = {i: n for n, i in enumerate(unit["eval_indices"])}
    icl = "".join(str(correct["icl"][i]) for i in sorted(correct["icl"], key=row.get))
    chosen_unit = "".join(str(correct[METHOD][i]) for i in sorted(correct[METHOD], key=row.get))
    check = {"dev_curve_stored": stored, "dev_curve_recomputed": again, "dev_items_off": off,
             "dev_match": len(stored) == len(again) and max(off, default=0) <= 1,
             "chosen_stored": chosen, "chosen_recomputed": prepared.info["chosen_steps"],
             "eval_items_off_at_T1_vs_icl": sum(a != b for a, b in zip(ev[0], icl)),
             "eval_items_off_at_chosen_vs_unit": sum(a != b for a, b in zip(ev[chosen - 1], chosen_unit))}
    if not check["dev_match"]:
        log(f"MISMATCH {stage} {model} {task} seed {seed}: recomputed dev curve differs from the stored one by "
            f"up to {max(off)} dev items per step (stored {stored}, recomputed {again})")
    return {"label": LABEL, "stage": stage, "model": model, "task": task, "seed": seed, "method": METHOD,
            "options": opts, "steps": len(contexts), "n_dev": len(dev_gold), "n_pool": len(pool),
            "n_eval": len(ev_gold), "pool_indices": [e.index for e in pool],
            "train_loss": prepared.info["train_loss"], "dev": dev, "pool": pooled, "eval": ev, "check": check,
            "wall_s": {"tuning_and_dev_curve": round(t_prep - t0, 1), "dev_per_item": round(t_dev - t_prep, 1),
                       "pool": round(t_pool - t_dev, 1), "eval": round(t_eval - t_pool, 1),
                       "total": round(t_eval - t0, 1)},
            "git": git_hash()}


def _unit_file(stage, model, task, seed) -> Path:
    from deepthink.evaluation.runner import unit_path

    return unit_path(ABLATIONS / stage, model, task, seed)


def record(jobs: list[tuple[str, str, str, int]], data_dir=None, pool_size: int = POOL, log=print,
           done: list | None = None) -> list[str]:
    """Record every (stage, model, task, seed) job without an oracle file yet, one model loaded at a time; returns
    the names of the files written (appended to `done` as they are, so that an interrupt keeps the list)."""
    from deepthink.evaluation.runner import cached_model
    from deepthink.io import write_atomic

    done, cache = ([] if done is None else done), {}
    todo = [j for j in jobs if not oracle_path(*j).exists()]
    log(f"{len(jobs) - len(todo)} of {len(jobs)} oracle units already recorded; {len(todo)} to go")
    for n, (stage, model, task, seed) in enumerate(todo, 1):
        if model not in {k[0] for k in cache}:
            cache.clear()
            gc.collect()
        lm = cached_model(cache, model, "cpu")
        rec = record_unit(lm, stage, model, task, seed, data_dir=data_dir, pool_size=pool_size, log=log)
        path = oracle_path(stage, model, task, seed)
        write_atomic(path, json.dumps(rec, separators=(",", ":")))
        done.append(path.stem)
        c = rec["check"]
        log(f"[{n}/{len(todo)}] {time.strftime('%H:%M')} {stage} {model} {task} seed {seed}: "
            f"{rec['wall_s']['total']:.0f}s ({rec['wall_s']}); dev curve {'matches' if c['dev_match'] else 'DIFFERS'} (max {max(c['dev_items_off'])} "
            f"items off), T {c['chosen_stored']}->{c['chosen_recomputed']}, eval off at T=1 vs ICL "
            f"{c['eval_items_off_at_T1_vs_icl']}, at chosen T {c['eval_items_off_at_chosen_vs_unit']}")
    return done


def jobs_of(stages, models=None, tasks=None, seeds=None) -> list[tuple[str, str, str, int]]:
    """Stage by stage, model by model (the cheapest first), seed by seed."""
    return [(st, m, t, s) for st in stages for m in STAGES[st]["models"] if not models or m in models
            for s in STAGES[st]["seeds"] if not seeds or s in seeds for t in TASKS if not tasks or t in tasks]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=sorted(STAGES), nargs="+", default=["screen", "confirm"])
    p.add_argument("--models", nargs="+", default=None, help="record only these models")
    p.add_argument("--tasks", nargs="+", default=None, choices=TASKS, help="record only these tasks")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="record only these seeds")
    p.add_argument("--data-dir", default=None, help="folder with <task>/{train,eval}.jsonl (default: ../shared/data)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the physical cores)")
    p.add_argument("--write-only", action="store_true", help="only replay the rules and rewrite SELECTION.md")
    p.add_argument("--quiet", action="store_true", help="no per-unit progress lines")
    args = p.parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    if not args.write_only:
        from deepthink.evaluation.provenance import Sitting, interrupt_on_sigterm, stopped_by
        from deepthink.models import set_threads

        set_threads(args.threads)
        interrupt_on_sigterm()   # a kill ends the sitting like an interrupt: recorded, the rest kept
        for stage in args.stage:
            jobs = jobs_of([stage], args.models, args.tasks, args.seeds)
            sitting = Sitting("python benchmarks/selection.py " + " ".join(sys.argv[1:] if argv is None else argv))
            done, error = [], None
            try:
                record(jobs, data_dir=args.data_dir, log=log, done=done)
            except BaseException as e:
                error = stopped_by(e)
                raise
            finally:
                sitting.record(RESULTS / stage / "sittings.jsonl", done, 1, error)
    print(f"wrote {write_markdown()}")
    return 0


# ---- the replay: selection rules on the stored oracle files ---------------------------------------------------

LEVELS = (0.05, 0.1, 0.2)
# (name, grad_kv selection rule, level, dev items: "dev" = the unit's 64, "dev+pool" = those and the pool's first
# POOL items)
RULES = ([("dev-acc", "dev-acc", 0.1, "dev")]
         + [(f"{r}@{lv:g}", r, lv, "dev") for r in ("dev-mcnemar", "dev-bootstrap") for lv in LEVELS]
         + [("dev-acc/128", "dev-acc", 0.1, "dev+pool")]
         + [(f"{r}@{lv:g}/128", r, lv, "dev+pool") for r in ("dev-mcnemar", "dev-bootstrap") for lv in LEVELS])
TODAY = "dev-acc"
GOAL_WORST, GOAL_BAR = -0.5, 1.0
CHOICE = ("The rule is chosen on the screen alone, by this rule written before any confirmation oracle was read: "
          f"among the candidates whose worst (model, task) mean difference to ICL is at least {GOAL_WORST:+g} points, "
          "the one with the highest mean difference to the bar (mean over models); a tie goes to the earlier "
          "candidate in the table (64 dev items before 128, lower levels before higher). If no candidate clears "
          "the worst-case line, the one with the highest worst (model, task) mean.")
PRODUCT = ("What the product does with it, written after 35 of the confirmation's 45 units had been read and before "
           "the last 10 were: grad_kv's default selection moves from dev-acc to the rule chosen on the screen when, "
           "on the complete confirmation, the chosen rule's paired difference to dev-acc (same items, each rule's "
           "own T) has a mean of at least 0 on every model and its worst (model, task) mean vs ICL is no lower "
           "than dev-acc's, whether the goal below is met or not (it is then at least as good and as safe as what "
           "users get today); otherwise the default stays dev-acc.")


def load_cases(stage: str) -> list[dict]:
    """Per oracle unit of `stage`: its per-step dev / pool / eval outcomes and the unit's per-item ICL and
    calibrated ICL outcomes (in eval order)."""
    from deepthink.evaluation.report import unit_correct

    cases = []
    for f in sorted((RESULTS / stage / "oracle").glob("*.json")):
        rec = json.loads(f.read_text())
        unit_file = _unit_file(stage, rec["model"], rec["task"], rec["seed"])
        unit = json.loads(unit_file.read_text())
        correct = unit_correct({"_file": str(unit_file)})
        order = unit["eval_indices"]
        bits = lambda rows: [[int(c) for c in r] for r in rows]
        cases.append({"model": rec["model"], "task": rec["task"], "seed": rec["seed"], "check": rec["check"],
                      "eval": bits(rec["eval"]),
                      "dev": (bits([d["correct"] for d in rec["dev"]]), [d["gold_logp"] for d in rec["dev"]]),
                      "pool": (bits([d["correct"] for d in rec["pool"]]), [d["gold_logp"] for d in rec["pool"]]),
                      "icl": [correct["icl"][i] for i in order], "icl_cc": [correct["icl_cc"][i] for i in order]})
    return cases


def replay(case: dict, rule: str, level: float, items: str) -> int:
    """The T that grad_kv's selection `rule` at `level` picks on the case's dev items (or dev + pool)."""
    from deepthink.methods.selection import choose

    correct, logp = case["dev"]
    if items == "dev+pool":
        if not case["pool"][0]:
            raise ValueError(f"{case['model']} {case['task']} seed {case['seed']}: no pool items were recorded")
        correct = [a + b[:POOL] for a, b in zip(correct, case["pool"][0])]
        logp = [a + b[:POOL] for a, b in zip(logp, case["pool"][1])]
    return choose(rule, correct, logp, level)[0]


def bars(cases: list[dict]) -> dict:
    """(model, task) -> "icl" or "icl_cc", whichever has the higher mean accuracy there (the bar, chosen on eval;
    a tie goes to ICL)."""
    out = {}
    for key in {(c["model"], c["task"]) for c in cases}:
        cs = [c for c in cases if (c["model"], c["task"]) == key]
        acc = {k: sum(sum(c[k]) / len(c[k]) for c in cs) for k in ("icl", "icl_cc")}
        out[key] = "icl_cc" if acc["icl_cc"] > acc["icl"] else "icl"
    return out


def measure(cases: list[dict], name: str, rule: str, level: float, items: str) -> dict:
    """One rule on the cases: per model the paired difference to ICL and to the bar, the worst (model, task) mean
    and unit against ICL, how often T = 1 was kept, the Ts chosen."""
    bar = bars(cases)
    rows = []
    for c in cases:
        t = replay(c, rule, level, items)
        got = c["eval"][t - 1]
        rows.append({"case": c, "T": t, "vs_icl": [a - b for a, b in zip(got, c["icl"])],
                     "vs_bar": [a - b for a, b in zip(got, c[bar[(c["model"], c["task"])]])]})
    models = sorted({c["model"] for c in cases})
    icl, bar_ = by_model(cases, [r["vs_icl"] for r in rows]), by_model(cases, [r["vs_bar"] for r in rows])
    per_model = {m: (icl[m], bar_[m]) for m in models}
    groups = {}
    for r in rows:
        groups.setdefault((r["case"]["model"], r["case"]["task"]), []).append(100 * sum(r["vs_icl"]) / len(r["vs_icl"]))
    worst_pair = min((sum(v) / len(v), f"{m} {t}") for (m, t), v in groups.items())
    worst_unit = min((100 * sum(r["vs_icl"]) / len(r["vs_icl"]),
                      f"{r['case']['model']} {r['case']['task']}/{r['case']['seed']} (T={r['T']})") for r in rows)
    return {"name": name, "per_model": per_model, "worst_pair": worst_pair, "worst_unit": worst_unit,
            "kept": sum(r["T"] == 1 for r in rows), "n": len(rows), "Ts": [r["T"] for r in rows],
            "mean_bar": sum(per_model[m][1].mean for m in models) / len(models),
            "mean_icl": sum(per_model[m][0].mean for m in models) / len(models)}


def by_model(cases: list[dict], diffs: list[list[int]]) -> dict:
    """Per model (sorted), the paired difference over its tasks' items: `diffs` holds each case's per-item
    differences, in case order; mean over tasks with its 95 % bootstrap interval."""
    from deepthink.evaluation.stats import paired_bootstrap

    out = {}
    for m in sorted({c["model"] for c in cases}):
        by_task = {}
        for c, d in zip(cases, diffs):
            if c["model"] == m:
                by_task.setdefault(c["task"], []).extend(d)
        out[m] = paired_bootstrap(by_task)
    return out


def versus(cases: list[dict], a: dict, b: dict) -> dict:
    """Per model, the paired difference of rule `a`'s eval outcomes to rule `b`'s (results of `measure` on the
    same cases; each at its own T)."""
    return by_model(cases, [[x - y for x, y in zip(c["eval"][ta - 1], c["eval"][tb - 1])]
                            for c, ta, tb in zip(cases, a["Ts"], b["Ts"])])


def choose_rule(results: list[dict]) -> str:
    """The screen's choice (CHOICE, in words)."""
    safe = [r for r in results if r["worst_pair"][0] >= GOAL_WORST]
    if safe:
        return max(safe, key=lambda r: (r["mean_bar"], -results.index(r)))["name"]
    return max(results, key=lambda r: (r["worst_pair"][0], -results.index(r)))["name"]


def rule_table(results: list[dict]) -> list[str]:
    models = list(results[0]["per_model"])
    lines = ["| rule | " + " | ".join(f"{m}: Δ vs ICL | {m}: Δ vs bar" for m in models)
             + " | mean Δ vs ICL | mean Δ vs bar | worst (model, task) vs ICL | worst unit vs ICL | T = 1 kept |",
             "|---|" + "---|---|" * len(models) + "---|---|---|---|---|"]
    for r in results:
        cells = [f"{r['per_model'][m][0]} | {r['per_model'][m][1]}" for m in models]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['mean_icl']:+.1f} | {r['mean_bar']:+.1f} | "
                     f"{r['worst_pair'][0]:+.1f} ({r['worst_pair'][1]}) | {r['worst_unit'][0]:+.1f} "
                     f"({r['worst_unit'][1]}) | {r['kept']} of {r['n']} |")
    return lines


def check_lines(cases: list[dict]) -> list[str]:
    off = [c for c in cases if not c["check"]["dev_match"]]
    chosen = sum(c["check"]["chosen_stored"] == c["check"]["chosen_recomputed"] for c in cases)
    icl_off = sum(c["check"]["eval_items_off_at_T1_vs_icl"] for c in cases)
    return [f"Reproduction check: the recomputed dev curve matches the unit's stored one within one dev item at every "
            f"step in {len(cases) - len(off)} of {len(cases)} units"
            + ("" if not off else " (DIFFERS: " + ", ".join(f"{c['model']} {c['task']}/{c['seed']}" for c in off) + ")")
            + f"; dev-acc's T is the stored one in {chosen} of {len(cases)}; eval items whose T = 1 outcome differs "
            f"from the unit's ICL outcome: {icl_off} over all units."]


def stage_lines(stage: str, cases: list[dict], want: int) -> tuple[list[str], list[dict]]:
    from deepthink.evaluation.provenance import sitting_lines

    head = [f"## {'Screen' if stage == 'screen' else 'Confirmation'} ({len(cases)} of {want} oracle units)", "",
            *sitting_lines(RESULTS / stage / "sittings.jsonl"), ""]
    if not cases:
        return head + [f"No {stage} oracle unit has been recorded yet."], []
    pooled = all(c["pool"][0] for c in cases)
    results = [measure(cases, *r) for r in RULES if pooled or r[3] == "dev"]
    return head + check_lines(cases) + [""] + rule_table(results), results


def write_markdown() -> Path:
    from deepthink.io import write_atomic

    wants = {st: len(s["models"]) * len(s["seeds"]) * len(TASKS) for st, s in STAGES.items()}
    screen = load_cases("screen")
    lines = ["# Choosing grad_kv's T safely (issue 31)", "",
             "Produced by `python benchmarks/selection.py` (record; resumable) and `python benchmarks/selection.py "
             "--write-only` (replay). Every rule reads only dev items (the unit's 64, or those and 64 further "
             "training items: '/128', a larger dev split that costs scoring 64 more items at each of the 15 steps); "
             "the eval outcome at the T it picks comes from the **oracle** files "
             f"(benchmarks/results/selection/<stage>/oracle/: \"{LABEL}\"), which serve only this replay. Δ = mean "
             "over tasks of the paired difference in points [95 % bootstrap interval over (seed, item)]; bar = the "
             "better of ICL and calibrated ICL per (model, task), chosen on eval; the worst (model, task) is the mean "
             "over seeds of the difference to ICL; T = 1 kept = units where the rule stayed at plain ICL.", "",
             "Rules (methods/selection.py): dev-acc = today's default (dev accuracy, ties to the smaller T); "
             "dev-mcnemar@L = T = 1 unless some T beats it on dev by an exact one-sided sign test at level L, then "
             "the best such T by dev accuracy, then dev log-likelihood; dev-bootstrap@L = the same with a paired "
             "bootstrap lower bound (quantile L) above 0.", "", CHOICE, "", PRODUCT, ""]
    body, results = stage_lines("screen", screen, wants["screen"])
    lines += body + [""]
    chosen = None
    if len(screen) == wants["screen"]:
        chosen = choose_rule(results)
        lines += [f"Chosen on the screen: **{chosen}**.", ""]
    else:
        lines += ["No rule is chosen until the screen is complete.", ""]
    confirm = load_cases("confirm") if chosen else []
    body, results = stage_lines("confirm", confirm, wants["confirm"])
    lines += body if chosen else ["## Confirmation", "", "Read only once the screen has chosen a rule."]
    if chosen and results:
        got = {r["name"]: r for r in results}
        c, today = got[chosen], got[TODAY]
        done = "" if len(confirm) == wants["confirm"] else " (provisional: the confirmation is not complete)"
        ok = c["worst_pair"][0] >= GOAL_WORST and c["mean_bar"] >= today["mean_bar"] - GOAL_BAR
        lines += ["", f"Goal{done}: worst (model, task) mean of {chosen} vs ICL {c['worst_pair'][0]:+.1f} (needs ≥ "
                  f"{GOAL_WORST:+g}); mean Δ vs bar {c['mean_bar']:+.1f} against dev-acc's {today['mean_bar']:+.1f} "
                  f"(needs ≥ {today['mean_bar'] - GOAL_BAR:+.1f}): **{'met' if ok else 'not met'}**."]
        if chosen != TODAY:
            vs = versus(confirm, c, today)
            switch = (all(v.mean >= 0 for v in vs.values()) and c["worst_pair"][0] >= today["worst_pair"][0])
            lines += ["", f"Product{done}: {chosen} − {TODAY}, paired: "
                      + "; ".join(f"{m} {v}" for m, v in vs.items())
                      + f"; worst (model, task) vs ICL {c['worst_pair'][0]:+.1f} against {today['worst_pair'][0]:+.1f}"
                      f": **the default {'becomes ' + chosen if switch else 'stays ' + TODAY}**."]
    write_atomic(MARKDOWN, "\n".join(lines) + "\n")
    return MARKDOWN


if __name__ == "__main__":
    sys.exit(main())
