"""Tables and plots from saved evaluation runs (OUT/units/*.json); `deepthink report DIR...` merges runs.

Nothing here names a method: columns follow the methods the units hold, labelled from the method
registry; methods that chose a step count on dev get a "chosen T" column and their difference to the
reference method (ICL by default).
"""
from __future__ import annotations

import functools
import json
import statistics
import textwrap
from pathlib import Path

from ..io import safe_name, write_atomic
from ..methods.base import variant_label
from .config import ORACLE, upgrade_config
from .provenance import environment

REFERENCE = "icl"


def label(name: str) -> str:
    """A method's column label (its registry label, "@VARIANT" added; the bare name for a method not
    registered in this process)."""
    return variant_label(name)


def unit_correct(unit: dict) -> dict[str, dict[int, int]]:
    """Per method, {eval row index: 1 if its prediction (summed log-prob) was right, else 0}, from the unit's
    per-item predictions beside unit["_file"]; each file is parsed once while it is unchanged (reports pair
    every method with several others, unit by unit)."""
    path = Path(unit["_file"]).with_suffix(".predictions.jsonl")
    st = path.stat()
    return _correct(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _correct(path: str, mtime_ns: int, size: int) -> dict[str, dict[int, int]]:
    out: dict[str, dict[int, int]] = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        for method, v in row.items():
            if isinstance(v, dict) and "pred" in v:
                out.setdefault(method, {})[row["index"]] = int(v["pred"] == row["gold"])
    return out


def upgrade_unit(u: dict) -> dict:
    """A unit in today's layout: units written before methods existed keep the four original methods'
    facts at the top level (chosen_steps, dev_curve, eval_curve, stopped, norms)."""
    if "methods" in u:
        return u
    u = dict(u)
    u["config"] = upgrade_config(u.get("config", {}))
    fixed_steps = u["config"]["methods"]["dt_fixed"]["steps"]
    u["methods"] = {
        "zero_shot": {}, "icl": {},
        "dt_fixed": {"steps": fixed_steps, "stopped": u["stopped"]["dt_fixed"], "norms": u["norms"]["dt_fixed"]},
        "dt_dev": {"chosen_steps": u["chosen_steps"], "dev_curve": u["dev_curve"], "stopped": u["stopped"]["dt_dev"],
                   "norms": u["norms"]["dt_dev"], **({"eval_curve": u["eval_curve"]} if u.get("eval_curve") else {})},
    }
    return u


def load_units(dirs) -> list[dict]:
    units, seen = [], {}
    for d in map(Path, dirs):
        files = sorted((d / "units").glob("*.json"))
        if not files:
            raise FileNotFoundError(f"{d} holds no finished units (expected {d}/units/*.json from `deepthink eval`)")
        for f in files:
            u = upgrade_unit(json.loads(f.read_text()))
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


def method_names(units: list[dict]) -> list[str]:
    """The methods the units hold, in the order they were run (first seen first), those not applicable to a
    unit's task (no accuracy, a reason in its info) and those that failed ("fails": a reason) included."""
    names: list[str] = []
    for u in units:
        info = u.get("methods", {})
        ran = [m for m in info if m in u["accuracy"] or "not_applicable" in info[m] or "fails" in info[m]]
        names += [m for m in dict.fromkeys(ran + list(u["accuracy"])) if m not in names]
    return names


def failure(units: list[dict], method: str) -> str | None:
    """"fails: <reason>" when `method` failed in every one of `units` (the reasons of the first unit), else None."""
    reasons = [u["methods"].get(method, {}).get("fails") for u in units]
    return f"fails: {reasons[0]}" if reasons and all(reasons) else None


def not_applicable(units: list[dict]) -> dict[str, dict[str, str]]:
    """{method: {task: why}} for methods a unit recorded as not applicable to its task."""
    out: dict[str, dict[str, str]] = {}
    for u in units:
        for m, info in u.get("methods", {}).items():
            if "not_applicable" in info:
                out.setdefault(m, {}).setdefault(u["task"], info["not_applicable"])
    return out


def choosing(units: list[dict]) -> list[str]:
    """Methods that chose a step count (their info records chosen_steps)."""
    return [m for m in method_names(units) if any("chosen_steps" in u["methods"].get(m, {}) for u in units)]


def mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample std over seeds (None with a single seed: no spread was measured)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def labelled(row: dict) -> dict:
    """A summary row as results.json holds it: each method's (mean, std) as {"mean": ..., "std": ...}."""
    return {k: ({"mean": v[0], "std": v[1]} if isinstance(v, tuple) else v) for k, v in row.items()}


def fmt(ms: tuple[float, float | None] | str | None) -> str:
    if ms is None:
        return "–"
    if isinstance(ms, str):          # "fails: <reason>"
        return ms
    return f"{ms[0]:.1f}" if ms[1] is None else f"{ms[0]:.1f} ± {ms[1]:.1f}"


def summarize(units: list[dict], metric: str = "sum") -> list[dict]:
    """Per (model, task): mean ± std over seeds per method (None where a method is missing), the chosen T
    of every method that chose one."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for u in units:
        groups.setdefault((u["model"], u["task"]), []).append(u)
    names, selecting = method_names(units), choosing(units)
    rows = []
    for (model, task), us in sorted(groups.items()):
        row = {"model": model, "task": task, "seeds": sorted(u["seed"] for u in us), "n_eval": us[0]["n_eval"]}
        for m in names:
            vals = [u["accuracy"][m][metric] for u in us if m in u["accuracy"]]
            row[m] = mean_std(vals) if vals else failure(us, m)
        row["chosen_steps"] = {m: [u["methods"].get(m, {}).get("chosen_steps") for u in us] for m in selecting}
        rows.append(row)
    return rows


def difference(row: dict, method: str, reference: str = REFERENCE) -> str:
    if not isinstance(row.get(method), tuple) or not isinstance(row.get(reference), tuple):
        return "–"
    return f"{row[method][0] - row[reference][0]:+.1f}"


def format_table(rows: list[dict], metric: str = "sum", reference: str = REFERENCE) -> str:
    title = "accuracy % (mean ± std over seeds), " + ("summed log-prob" if metric == "sum" else "per-token log-prob")
    names = [k for k in rows[0] if k not in ("model", "task", "seeds", "n_eval", "chosen_steps")] if rows else []
    selecting = list(rows[0]["chosen_steps"]) if rows else []
    ref = reference if reference in names else None
    head = (["model", "task", "seeds", "n"] + [label(m) for m in names]
            + [("dev-chosen T" if len(selecting) == 1 else f"{label(m)} T") for m in selecting]
            + ([f"{label(m)} − {label(ref)}" for m in selecting] if ref else []))
    lines = [[r["model"], r["task"], str(len(r["seeds"])), str(r["n_eval"])]
             + [fmt(r[m]) for m in names]
             + [",".join(map(str, r["chosen_steps"][m])) for m in selecting]
             + ([difference(r, m, ref) for m in selecting] if ref else []) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(l) for l in lines])


def format_not_applicable(units: list[dict]) -> str:
    """The footnote for "–" cells of methods that do not apply to some tasks ("" when every method ran)."""
    lines = []
    for m, tasks in not_applicable(units).items():
        reason = next(iter(tasks.values())).split(":")[0].split(", but ")[0]     # the general part of the reason
        lines.append(f"– {label(m)}: not applicable to {', '.join(tasks)} ({reason}; each unit records why)")
    return "\n".join(lines)


ZERO_SHOT = "zero_shot"


def unit_diffs(units: list[dict], method: str, reference: str) -> list[int] | None:
    """Per (seed, item) of `units`, correct(method) - correct(reference); None if a unit's predictions are gone."""
    diffs = []
    for u in units:
        try:
            correct = unit_correct(u)
        except (KeyError, OSError):
            return None
        a, b = correct.get(method), correct.get(reference)
        if a is None or b is None:
            return None
        diffs += [a[i] - b[i] for i in a if i in b]
    return diffs


def verdicts(units: list[dict], reference: str = REFERENCE) -> list[dict]:
    """Per (model, task): which method did best by mean accuracy (summed log-prob) over seeds, with its paired
    bootstrap interval against the reference (ICL), resampling (seed, item) pairs; whether zero-shot beat every
    method; whether the best method beats the reference (interval above 0). Each entry has a one-line `line`."""
    from .stats import paired_bootstrap

    groups: dict[tuple[str, str], list[dict]] = {}
    for u in units:
        groups.setdefault((u["model"], u["task"]), []).append(u)
    out = []
    for row in summarize(units, "sum"):
        us = groups[(row["model"], row["task"])]
        means = {m: row[m][0] for m in method_names(us) if row.get(m) is not None}
        ref = reference if reference in means else None
        others = [m for m in means if m not in (reference, ZERO_SHOT)]
        best = max(others, key=lambda m: means[m]) if others else None      # first on ties
        diffs = unit_diffs(us, best, ref) if ref and best else None
        iv = paired_bootstrap({row["task"]: diffs}) if diffs else None      # resamples (seed, item) pairs
        zs_wins = ZERO_SHOT in means and len(means) > 1 and all(means[ZERO_SHOT] > v for m, v in means.items()
                                                                if m != ZERO_SHOT)
        head = f"{row['model']} {row['task']}: "
        ref_text = f"{label(ref)} ({means[ref]:.1f})" if ref else ""
        best_text = f"{label(best)} {means[best]:.1f}" if best else ""
        if zs_wins:
            text = f"zero-shot wins ({means[ZERO_SHOT]:.1f}): it beats every method" + (
                f", {ref_text} included" if ref else "")
            if best:
                text += f"; best method {best_text}" + (f", {iv} vs {label(ref)}" if iv else "")
        elif best is None:
            text = "only baselines ran: " + ", ".join(f"{label(m)} {v:.1f}" for m, v in means.items())
        elif ref is None:
            text = f"best method {best_text} ({label(reference)} did not run: no interval)"
        elif iv is None:
            text = f"best method {best_text}, {means[best] - means[ref]:+.1f} vs {ref_text} (per-item predictions " \
                   "missing: no interval)"
        elif iv.above_zero:
            text = f"best method {best_text} beats {ref_text} by {iv}"
        else:
            why = "the interval includes 0" if iv.high >= 0 else f"{label(ref)} is better"
            text = f"no method beats {ref_text}: best method {best_text}, {iv} vs {label(ref)} ({why})"
        out.append({"model": row["model"], "task": row["task"], "best": best, "reference": ref,
                    "means": means, "best_vs_reference": None if iv is None else
                    {"mean": iv.mean, "low": iv.low, "high": iv.high, "level": iv.level},
                    "zero_shot_wins": zs_wins, "beats_reference": bool(iv and iv.above_zero), "line": head + text})
    return out


def format_verdicts(entries: list[dict], reference: str = REFERENCE) -> str:
    head = (f"verdict (mean accuracy over seeds, summed log-prob; \"vs {label(reference)}\": the difference in points "
            "[its 95% paired bootstrap interval over seeds x items]):")
    return "\n".join([head] + [e["line"] for e in entries])


def plot(units: list[dict], out: Path) -> list[Path]:
    """Per (model, task): accuracy vs step of every method that chose T on dev (eval oracle dashed when
    present), and per-layer ||dK||, ||dV|| vs step of the longest tuning run recorded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for u in units:
        groups.setdefault((u["model"], u["task"]), []).append(u)
    for (model, task), us in sorted(groups.items()):
        runs = [m for m in method_names(us) if all(us_m.get("norms") for us_m in (u["methods"].get(m, {}) for u in us))]
        selecting = choosing(us)
        if not runs and not selecting:
            continue
        fig, (ax, axk, axv) = plt.subplots(1, 3, figsize=(15, 4))
        for m in selecting:
            tag = "" if len(selecting) == 1 else f"{label(m)}, "
            for u in sorted(us, key=lambda u: u["seed"]):
                info = u["methods"].get(m, {})
                if info.get("dev_curve"):
                    ys = [p["sum"] for p in info["dev_curve"]]
                    line, = ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=3, label=f"{tag}dev, seed {u['seed']}")
                    ax.axvline(info["chosen_steps"], color=line.get_color(), lw=0.8, ls=":")
                if info.get("eval_curve"):
                    ys = [p["sum"] for p in info["eval_curve"]["points"]]
                    ax.plot(range(1, len(ys) + 1), ys, ls="--", alpha=0.6,
                            label=f"{tag}eval {ORACLE}, seed {u['seed']}")
        ax.set(xlabel="step T", ylabel="accuracy %", title="accuracy vs step (dotted: T chosen on dev)")
        if ax.lines:
            ax.legend(fontsize=7)
        if runs:
            longest = max(runs, key=lambda m: min(len(u["methods"][m]["norms"]) for u in us))
            hist = [u["methods"][longest]["norms"] for u in us]
            n_steps = min(len(h) for h in hist)
            n_layers = len(hist[0][0]["dk"])
            cmap = plt.get_cmap("viridis")
            for axis, key in ((axk, "dk"), (axv, "dv")):
                positive = True
                for layer in range(n_layers):
                    ys = [statistics.fmean(h[t][key][layer] for h in hist) for t in range(1, n_steps)]
                    positive &= all(y > 0 for y in ys)
                    axis.plot(range(2, n_steps + 1), ys, color=cmap(layer / max(1, n_layers - 1)), lw=1)
                # a log scale where every norm is positive (V does not move under some controls: linear then)
                axis.set(xlabel="step T", yscale="log" if n_steps > 2 and positive else "linear",
                         title=f"per-layer ‖Δ{key[1].upper()}‖ per step, {label(longest)}")
        # what the three panels share goes above them, so that no panel's title runs into its neighbour's
        fig.suptitle(textwrap.fill(f"{model} / {task}", 110) + ("\nnorms: mean over seeds; dark = first layer"
                                                                if runs else ""), fontsize=10)
        for axis in (ax, axk, axv):
            axis.set_title(textwrap.fill(axis.get_title(), 48), fontsize=9)
        fig.tight_layout()
        path = out / f"{safe_name(model)}__{safe_name(task)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def write_report(dirs, out, log=print) -> dict:
    """Merge the units of `dirs`; write OUT/results.json, OUT/predictions.jsonl, OUT/plots/*.png; print tables."""
    out = Path(out)
    units = load_units(dirs)
    rows = {m: summarize(units, m) for m in ("sum", "norm")}
    verdict = verdicts(units)
    results = {"environment": environment(), "settings": {m: label(m) for m in method_names(units)},
               "summary": {m: [labelled(r) for r in rs] for m, rs in rows.items()},
               "verdict": verdict, "units": [{k: v for k, v in u.items() if k != "_file"} for u in units]}
    write_atomic(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False))
    preds = []
    for u in units:
        p = Path(u["_file"]).with_suffix(".predictions.jsonl")
        if p.exists():
            preds.append(p.read_text(encoding="utf-8"))
    write_atomic(out / "predictions.jsonl", "".join(preds))
    plots = plot(units, out / "plots")
    footnote = format_not_applicable(units)
    text = "\n\n".join([format_table(rows["sum"], "sum") + (f"\n{footnote}" if footnote else ""),
                         format_table(rows["norm"], "norm"), format_verdicts(verdict)])
    write_atomic(out / "report.txt", text + "\n")
    log(text)
    log(f"\nwrote {out / 'results.json'}, {out / 'report.txt'} (tables and verdict), {out / 'predictions.jsonl'} "
        f"and {len(plots)} plot(s) in {out / 'plots'}")
    return results


def read_marked(path: Path, marks: tuple[str, str]) -> str | None:
    """What stands between the two marker lines of a text file (None when the file or a marker is missing)."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    start, end = marks
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def replace_marked(path: Path, marks: tuple[str, str], body: str) -> bool:
    """Put `body` between the two marker lines of a text file (a README's generated table); False, touching
    nothing, when the file or either marker is missing."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    start, end = marks
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    write_atomic(path, head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1])
    return True
