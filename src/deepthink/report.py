"""Tables and plots from saved evaluation runs (OUT/units/*.json); `deepthink report DIR...` merges runs."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .evaluate import ORACLE, SETTINGS, _write_atomic, environment

LABELS = {"zero_shot": "zero-shot", "icl": "ICL", "dt_fixed": "DT fixed-T", "dt_dev": "DT dev-T"}


def load_units(dirs) -> list[dict]:
    units, seen = [], {}
    for d in map(Path, dirs):
        files = sorted((d / "units").glob("*.json"))
        if not files:
            raise FileNotFoundError(f"{d} holds no finished units (expected {d}/units/*.json from `deepthink eval`)")
        for f in files:
            u = json.loads(f.read_text())
            key = (u["model"], u["task"], u["seed"])
            if key in seen:
                if seen[key] != u["accuracy"]:
                    raise ValueError(f"{f}: {key} also appears in another run with different results; "
                                     "report them separately")
                continue
            seen[key] = u["accuracy"]
            u["_file"] = str(f)
            units.append(u)
    return units


def mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample std over seeds (None with a single seed: no spread was measured)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def fmt(ms: tuple[float, float | None]) -> str:
    return f"{ms[0]:.1f}" if ms[1] is None else f"{ms[0]:.1f} ± {ms[1]:.1f}"


def summarize(units: list[dict], metric: str = "sum") -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for u in units:
        groups.setdefault((u["model"], u["task"]), []).append(u)
    rows = []
    for (model, task), us in sorted(groups.items()):
        row = {"model": model, "task": task, "seeds": sorted(u["seed"] for u in us), "n_eval": us[0]["n_eval"]}
        for s in SETTINGS:
            row[s] = mean_std([u["accuracy"][s][metric] for u in us])
        row["chosen_steps"] = [u["chosen_steps"] for u in us]
        rows.append(row)
    return rows


def format_table(rows: list[dict], metric: str = "sum") -> str:
    title = "accuracy % (mean ± std over seeds), " + ("summed log-prob" if metric == "sum" else "per-token log-prob")
    head = ["model", "task", "seeds", "n"] + [LABELS[s] for s in SETTINGS] + ["dev-chosen T", "DT dev − ICL"]
    lines = [[r["model"], r["task"], str(len(r["seeds"])), str(r["n_eval"])]
             + [fmt(r[s]) for s in SETTINGS]
             + [",".join(map(str, r["chosen_steps"])), f"{r['dt_dev'][0] - r['icl'][0]:+.1f}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(l) for l in lines])


def plot(units: list[dict], out: Path) -> list[Path]:
    """accuracy vs step (dev; eval oracle dashed when present) and per-layer ||dK||, ||dV|| vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for u in units:
        groups.setdefault((u["model"], u["task"]), []).append(u)
    for (model, task), us in sorted(groups.items()):
        fig, (ax, axk, axv) = plt.subplots(1, 3, figsize=(15, 4))
        for u in sorted(us, key=lambda u: u["seed"]):
            if u["dev_curve"]:
                ys = [p["sum"] for p in u["dev_curve"]]
                line, = ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=3, label=f"dev, seed {u['seed']}")
                ax.axvline(u["chosen_steps"], color=line.get_color(), lw=0.8, ls=":")
            if u.get("eval_curve"):
                ys = [p["sum"] for p in u["eval_curve"]["points"]]
                ax.plot(range(1, len(ys) + 1), ys, ls="--", alpha=0.6, label=f"eval {ORACLE}, seed {u['seed']}")
        ax.set(xlabel="step T", ylabel="accuracy %", title=f"{model} / {task}: accuracy vs step")
        ax.legend(fontsize=7)
        for axis, key in ((axk, "dk"), (axv, "dv")):
            hist = [u["norms"]["dt_dev"] for u in us]
            n_steps = min(len(h) for h in hist)
            n_layers = len(hist[0][0][key])
            cmap = plt.get_cmap("viridis")
            for layer in range(n_layers):
                ys = [statistics.fmean(h[t][key][layer] for h in hist) for t in range(1, n_steps)]
                axis.plot(range(2, n_steps + 1), ys, color=cmap(layer / max(1, n_layers - 1)), lw=1)
            axis.set(xlabel="step T", yscale="log" if n_steps > 2 else "linear",
                     title=f"per-layer ‖Δ{key[1].upper()}‖ (mean over seeds; dark = first layer)")
        fig.tight_layout()
        path = out / f"{_safe(model)}__{_safe(task)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in s)


def write_report(dirs, out, log=print) -> dict:
    """Merge the units of `dirs`; write OUT/results.json, OUT/predictions.jsonl, OUT/plots/*.png; print tables."""
    out = Path(out)
    units = load_units(dirs)
    rows = {m: summarize(units, m) for m in ("sum", "norm")}
    results = {"environment": environment(), "settings": {s: LABELS[s] for s in SETTINGS},
               "summary": rows, "units": [{k: v for k, v in u.items() if k != "_file"} for u in units]}
    _write_atomic(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False))
    preds = []
    for u in units:
        p = Path(u["_file"]).with_suffix(".predictions.jsonl")
        if p.exists():
            preds.append(p.read_text(encoding="utf-8"))
    _write_atomic(out / "predictions.jsonl", "".join(preds))
    plots = plot(units, out / "plots")
    log(format_table(rows["sum"], "sum"))
    log("")
    log(format_table(rows["norm"], "norm"))
    log(f"\nwrote {out / 'results.json'}, {out / 'predictions.jsonl'} and {len(plots)} plot(s) in {out / 'plots'}")
    return results


def replace_marked(path: Path, marks: tuple[str, str], body: str) -> bool:
    """Put `body` between the two marker lines of a text file (a README's generated table); False, touching
    nothing, when the file or either marker is missing."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    start, end = marks
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1])
    return True


def register(sub) -> None:
    p = sub.add_parser("report", help="re-render tables and plots from saved runs, merging several")
    p.add_argument("dirs", nargs="+", help="output folders of `deepthink eval`")
    p.add_argument("--out", default=None, help="where to write the merged results (default: the first folder)")
    p.set_defaults(func=lambda a: (write_report(a.dirs, a.out or a.dirs[0]), 0)[1])
