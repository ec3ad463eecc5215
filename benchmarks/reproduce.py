"""Reproduction benchmark: the paper's ten tasks on the real models installable here, >= 3 seeds.

Resumable: every (model, task, seed) unit is saved when it finishes under
benchmarks/results/reproduction/<profile>/; run the same command again to continue. When all units
of the profile are present (or with --write-only) it writes benchmarks/results/REPRODUCTION.md.

    python benchmarks/reproduce.py                      # default profile
    python benchmarks/reproduce.py --profile full       # bigger eval/dev sizes, adds qwen2.5-coder-0.5b
    python benchmarks/reproduce.py --models smollm2-135m --tasks sst2   # a slice of the profile
    accelerate launch --multi_gpu --num_processes 4 benchmarks/reproduce.py   # units divided among 4 processes
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from deepthink.evaluation import EvalConfig, legacy_methods, run_units
from deepthink.evaluation import report
from deepthink.evaluation import run as run_eval
from deepthink.evaluation.distributed import Processes
from deepthink.evaluation.report import REFERENCE, fmt, label
from deepthink.models import set_threads
from deepthink.tasks import list_tasks

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
PAPER = ROOT.parents[1] / "shared" / "PAPER.md"
TASKS = [t for t in list_tasks() if t != "sentiment-demo"]

# Sizes: the default profile is sized for about 2 hours on this 2-core CPU with nothing else running.
# Measured cost of one gemma3-270m unit (eval 100, dev 32, T <= 10; `wall_s` in each unit): 80-170 s for
# the classification tasks, copa, obqa, qasc and winogrande. HellaSwag's four ~25-token endings put ~100
# positions per item through gemma's 262k-word LM head (~1.5 s per item scored, ~18 min per unit), so
# it alone scores 50 items with 16 dev items (TASK_SIZES); every other task uses the profile's sizes.
PROFILES = {
    "default": dict(models=["gemma3-270m"], seeds=[0, 1, 2],
                    config=EvalConfig(shots=1, dev_size=32, max_eval=100,
                                      methods=legacy_methods(steps=10, step_size=0.01, momentum=0.9, fixed_steps=5,
                                                             fixed_momentum=0.0)),
                    task_sizes={"hellaswag": dict(max_eval=50, dev_size=16)}),
    "full": dict(models=["gemma3-270m", "smollm2-135m", "qwen2.5-coder-0.5b"], seeds=[0, 1, 2, 3, 4],
                 config=EvalConfig(shots=1, dev_size=128, max_eval=500,
                                   methods=legacy_methods(steps=15, step_size=0.01, momentum=0.9, fixed_steps=5,
                                                          fixed_momentum=0.0)),
                 task_sizes={}),
}


def task_config(profile: str, task: str) -> EvalConfig:
    """The profile's EvalConfig with the task's own sizes (TASK_SIZES) applied."""
    prof = PROFILES[profile]
    return replace(prof["config"], **prof["task_sizes"].get(task, {}))


PAPER_TASKS = {"SST2": "sst2", "SST5": "sst5", "TREC": "trec", "MR": "mr", "AGNews": "agnews"}


def paper_table2(path: Path = PAPER) -> dict[str, dict[str, tuple[float, float]]]:
    """{model: {task: (ICL, Deep-Thinking)}} from PAPER.md's v3 Table 2, if the file is there."""
    if not path.exists():
        return {}
    text = path.read_text()
    section = text.split("## v3 Table 2", 1)[-1].split("##", 1)[0]
    out = {}
    for m in re.finditer(r"^\| ([^|]+?) \| ([\d. /]+) \| ([\d. /]+) \|$", section, re.M):
        icl = [float(x) for x in m.group(2).split("/")]
        dt = [float(x) for x in m.group(3).split("/")]
        out[m.group(1)] = {t: (a, b) for t, a, b in zip(PAPER_TASKS.values(), icl, dt)}
    return out


def _shown(path: Path, root: Path) -> str:
    """`path` relative to `root` where it lies inside it (links in the Markdown), else as given."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def verdict(rows: list[dict], names: list[str]) -> list[str]:
    """Plain lines per model: each method's mean change against the reference (ICL), where it helped or hurt."""
    lines = []
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model and r.get(REFERENCE) is not None]
        for key in names:
            if key == REFERENCE:
                continue
            have = [r for r in mine if r.get(key) is not None]
            gains = [r[key][0] - r[REFERENCE][0] for r in have]
            if not gains:
                continue
            better = [r["task"] for r, g in zip(have, gains) if g > 0]
            worse = [r["task"] for r, g in zip(have, gains) if g < 0]
            lines.append(f"- **{model}, {label(key)} vs {label(REFERENCE)}**: mean change {sum(gains) / len(gains):+.1f} "
                         f"points over {len(have)} tasks; higher on {', '.join(better) or 'none'}; lower on "
                         f"{', '.join(worse) or 'none'}.")
    return lines


def protocol(cfg: dict) -> str:
    """What each method of the profile did, from its recorded options."""
    parts = []
    for name, o in cfg["methods"].items():
        if "selection" in o:
            parts.append(f"{label(name)}: T in 1..{o['steps']} with momentum {o['momentum']}, chosen by dev accuracy "
                         "(ties to the smaller T); T = 1 is plain ICL.")
        elif "steps" in o:
            parts.append(f"{label(name)}: T = {o['steps']}, momentum {o['momentum']}"
                         + (" (the ACL paper's no-dev setting)." if o["momentum"] == 0 else "."))
    steps = {o["step_size"] for o in cfg["methods"].values() if "step_size" in o}
    return " ".join(parts) + (f" Step size {', '.join(map(str, sorted(steps)))}." if steps else "")


def write_markdown(profile: str, out_dir: Path, command: str, dest: Path = RESULTS / "REPRODUCTION.md") -> Path:
    units = report.load_units([out_dir])
    prof = PROFILES[profile]
    have = {(u["model"], u["task"], u["seed"]) for u in units}
    wanted = [(m, t, s) for m in prof["models"] for s in prof["seeds"] for t in TASKS]
    done = [k for k in wanted if k in have]
    missing = [k for k in wanted if k not in have]
    rows = report.summarize(units, "sum")
    norm_rows = {(r["model"], r["task"]): r for r in report.summarize(units, "norm")}
    names, selecting = report.method_names(units), report.choosing(units)
    cfg = prof["config"].to_dict()
    env = units[0]["environment"]
    paper = paper_table2()
    lines = [
        "# Reproduction: zero-shot vs ICL vs Deep-Thinking on the paper's ten tasks",
        "",
        f"Profile `{profile}`, produced by `{command}` (resumable; units in "
        f"`{_shown(out_dir, ROOT.parent)}/units/`, per-item scores in `predictions.jsonl`).",
        f"deepthink {env['deepthink']} (git {str(env['git'])[:10]}), torch {env['torch']}, transformers "
        f"{env['transformers']}, {env['threads']} CPU threads, {env['platform']}.",
        "",
        "Protocol (per model, task and seed): demonstrations sampled as the reference does "
        f"({cfg['shots']} per class, or {cfg['shots']} in total for tasks without fixed labels); "
        f"eval = a seeded random {cfg['max_eval']} items of the scored split (fewer where the split is smaller); "
        f"dev = {cfg['dev_size']} items drawn from the training data, disjoint from the demonstrations. "
        f"{protocol(cfg)} Nothing is chosen on eval. "
        + "".join(f"{t} alone uses " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sizes.items())
                  + " (its long multi-token endings make each item ~10x dearer). "
                  for t, sizes in prof["task_sizes"].items()) +
        "Scoring: summed log-probability of the choice tokens (the per-token table follows).",
        "",
        f"**Status: {len(done)} of {len(done) + len(missing)} units of the profile finished.**"
        + (" Missing (run the same command again to continue): "
           + ", ".join(f"{m}/{t}/seed {s}" for m, t, s in missing) + "." if missing else ""),
        "",
        *([(out_dir / "NOTES.md").read_text().strip(), ""] if (out_dir / "NOTES.md").exists() else []),
        "## Accuracy % (mean ± std over seeds; a single seed shows no ±), summed log-prob",
        "",
        "| model | task | seeds | n eval | " + " | ".join(label(m) for m in names) + " | "
        + "".join(f"{chosen_label(m, selecting)} | {label(m)} − {label(REFERENCE)} | " for m in selecting).rstrip(" ")
        + ("" if selecting else "|"),
        "|---|---|---|---|" + "---|" * (len(names) + 2 * len(selecting)),
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['task']} | {len(r['seeds'])} | {r['n_eval']} | "
                     + " | ".join(fmt(r[m]) for m in names) + " |"
                     + "".join(f" {','.join(map(str, r['chosen_steps'][m]))} | {report.difference(r, m)} |"
                               for m in selecting))
    lines += ["", "## Accuracy % with per-token normalised scores (same runs)", "",
              "| model | task | " + " | ".join(label(m) for m in names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        n = norm_rows[(r["model"], r["task"])]
        lines.append(f"| {r['model']} | {r['task']} | " + " | ".join(fmt(n[m]) for m in names) + " |")
    lines += ["", "## Does Deep-Thinking help here?", "", *verdict(rows, names)]
    lines += ["", "These are small models (135M–270M parameters) with one demonstration per class and "
              f"{cfg['max_eval']}-item eval subsets: one item is {100 / cfg['max_eval']:.0f} point(s), and the "
              "seed-to-seed spread is often larger than the differences between settings. Read the "
              "± columns before the means."]
    if paper:
        lines += ["", "## The paper's numbers (v3 Table 2, ICL → Deep-Thinking, other models, 10 seeds, "
                  "more shots, T chosen with a dev set)", "",
                  "| paper model | " + " | ".join(PAPER_TASKS) + " |", "|---|" + "---|" * len(PAPER_TASKS)]
        for model, vals in paper.items():
            lines.append(f"| {model} | " + " | ".join(f"{vals[t][0]} → {vals[t][1]}" for t in PAPER_TASKS.values())
                         + " |")
        lines += ["", "None of the paper's model families can be installed here (../shared/MODELS.md), and the "
                  "paper publishes no per-task table for COPA, HellaSwag, OBQA, QASC or WinoGrande, so no row "
                  "above is a like-for-like comparison."]
    # the paper's shot counts on every model: a section benchmarks/ablations.py writes from its units and keeps
    # current; kept as it stands when this profile's part is rewritten
    kept = report.read_marked(dest, PAPER_SHOTS_MARK)
    lines += ["", PAPER_SHOTS_MARK[0], *([kept] if kept else []), PAPER_SHOTS_MARK[1]]
    notes = sorted({n if n.startswith(u["task"] + ":") else f"{u['task']}: {n}" for u in units for n in u["notes"]})
    if notes:
        lines += ["", "## Deviations from the reference, as recorded by the runs", ""] + [f"- {n}" for n in notes]
    plots = sorted((out_dir / "plots").glob("*.png"))
    if plots:
        lines += ["", "## Plots", "", "Accuracy vs step on dev (dotted line: the chosen T) and per-layer "
                  "‖ΔK‖, ‖ΔV‖ per step, one figure per model and task:", ""]
        lines += [f"- [{p.stem}]({_shown(p, dest.parent)})" for p in plots]
    total = sum(u["wall_s"]["total"] for u in units)
    lines += ["", f"Total wall time of the {len(units)} units: {total / 60:.1f} min."]
    dest.write_text("\n".join(lines) + "\n")
    return dest


README_MARK = ("<!-- reproduction-summary -->", "<!-- /reproduction-summary -->")
PAPER_SHOTS_MARK = ("<!-- paper-shots: written by benchmarks/ablations.py -->", "<!-- /paper-shots -->")


def readme_summary(profile: str, out_dir: Path) -> str:
    """Short results table for docs/results.md: summed-score accuracy per setting, mean ± std over seeds."""
    units = report.load_units([out_dir])
    rows = report.summarize(units, "sum")
    n_units = len({(u["model"], u["task"], u["seed"]) for u in units})
    names, selecting = report.method_names(units), report.choosing(units)
    lines = [f"Profile `{profile}`: {n_units} units ({', '.join(sorted({r['model'] for r in rows}))}), accuracy % "
             "(summed log-prob), mean ± std over seeds; full tables, per-token scores, dev curves and caveats in "
             "[benchmarks/results/REPRODUCTION.md](../benchmarks/results/REPRODUCTION.md).", "",
             "| model | task | n eval | " + " | ".join(label(m) for m in names)
             + "".join(f" | {chosen_label(m, selecting)}" for m in selecting) + " |",
             "|---|---|---|" + "---|" * (len(names) + len(selecting))]
    for r in rows:
        lines.append(f"| {r['model']} | {r['task']} | {r['n_eval']} | " + " | ".join(fmt(r[m]) for m in names)
                     + "".join(f" | {','.join(map(str, r['chosen_steps'][m]))}" for m in selecting) + " |")
    return "\n".join(lines + ["", *verdict(rows, names)])


def chosen_label(method: str, selecting: list[str]) -> str:
    return "dev-chosen T" if len(selecting) == 1 else f"{label(method)}: dev-chosen T"


def update_readme(profile: str, out_dir: Path, path: Path = ROOT.parent / "docs" / "results.md") -> bool:
    """Rewrite docs/results.md's results table between README_MARK; False when the markers are not there."""
    return report.replace_marked(path, README_MARK, readme_summary(profile, out_dir))


def verify(profile: str, keys: list[str], out_dir: Path, data_dir=None, tol: float = 1e-5) -> bool:
    """Re-run committed units (MODEL/TASK/SEED) with today's code into a temporary folder and compare every
    method's accuracies and per-choice log-probabilities with the committed predictions."""
    import json
    import tempfile

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        models: dict = {}
        for key in keys:
            model, task, seed = key.split("/")
            run_eval([model], [task], [int(seed)], task_config(profile, task), tmp, data_dir=data_dir,
                     progress=False, lm_cache=models, write=False)
            name = f"{model}__{task}__seed{seed}"
            old = report.upgrade_unit(json.loads((out_dir / "units" / f"{name}.json").read_text()))
            new = json.loads((Path(tmp) / "units" / f"{name}.json").read_text())
            old_p = [json.loads(l) for l in (out_dir / "units" / f"{name}.predictions.jsonl").read_text().splitlines()]
            new_p = [json.loads(l) for l in (Path(tmp) / "units" / f"{name}.predictions.jsonl").read_text().splitlines()]
            worst = max(abs(a - b) for o, n in zip(old_p, new_p) for m in old["accuracy"]
                        for a, b in zip(o[m]["logprob"], n[m]["logprob"]))
            same = (old["accuracy"] == new["accuracy"] and len(old_p) == len(new_p) and worst <= tol
                    and [o["index"] for o in old_p] == [n["index"] for n in new_p]
                    and old["methods"]["dt_dev"]["chosen_steps"] == new["methods"]["dt_dev"]["chosen_steps"])
            ok &= same
            print(f"{key}: accuracies {'equal' if old['accuracy'] == new['accuracy'] else 'DIFFER'}, "
                  f"largest per-choice log-prob difference {worst:.2e} over {len(new_p)} items "
                  f"({'within' if worst <= tol else 'OVER'} {tol:g}), git {new['environment']['git']}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="default", choices=sorted(PROFILES), help="sizes and models (default: default)")
    p.add_argument("--models", nargs="+", default=None, help="run only these models of the profile")
    p.add_argument("--tasks", nargs="+", default=None, choices=TASKS, help="run only these tasks")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="run only these seeds")
    p.add_argument("--data-dir", default=None, help="folder with <task>/{train,eval}.jsonl (default: ../shared/data)")
    p.add_argument("--write-only", action="store_true", help="only (re)write REPRODUCTION.md from finished units")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verify", nargs="+", metavar="MODEL/TASK/SEED", default=None,
                   help="re-run these committed units with today's code and compare them (nothing is written)")
    args = p.parse_args(argv)
    prof = PROFILES[args.profile]
    out_dir = RESULTS / "reproduction" / args.profile
    if args.verify:
        return 0 if verify(args.profile, args.verify, out_dir, args.data_dir) else 1
    procs = Processes()   # several when started by `accelerate launch`: units divided among them
    set_threads(procs.threads(None))
    if not args.write_only:
        # seed by seed, so that an interrupted run leaves whole seeds rather than whole tasks
        jobs = [(model, task, seed, task_config(args.profile, task)) for seed in args.seeds or prof["seeds"]
                for task in args.tasks or TASKS for model in args.models or prof["models"]]
        run_units(jobs, out_dir, data_dir=args.data_dir, progress=not args.quiet, procs=procs)
        procs.close()                 # every process exits cleanly; the report needs no other process
        if not procs.is_main:
            return 0
        report.write_report([out_dir], out_dir)
    command = "python benchmarks/reproduce.py" + ("" if args.profile == "default" else f" --profile {args.profile}")
    path = write_markdown(args.profile, out_dir, command)
    print(f"wrote {path}")
    if args.profile == "default" and update_readme(args.profile, out_dir):
        print("updated the results table in docs/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
