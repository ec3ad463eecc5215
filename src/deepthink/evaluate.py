"""The evaluation protocol: zero-shot vs ICL vs Deep-Thinking per (model, task, seed), honestly.

Settings, each scoring the eval split once:
- zero_shot: no demonstrations (only the tokenizer's own special tokens as prefix);
- icl: step 1 of forward tuning, i.e. the demonstrations' own cache;
- dt_fixed: Deep-Thinking at a fixed T (default 5, momentum 0: the ACL paper's no-dev setting);
- dt_dev: Deep-Thinking with T in 1..--steps chosen by accuracy on dev items drawn from the training
  data, disjoint from the demonstrations (ties go to the smaller T).
`--curve` also scores eval at every step; that curve is an oracle (chosen on eval) and feeds no number.

Each finished unit is written atomically to OUT/units/; re-running the same command skips finished
units, so an interrupt loses at most the unit in flight.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .tuning import ForwardTuner, TuningConfig

SETTINGS = ("zero_shot", "icl", "dt_fixed", "dt_dev")
ORACLE = "oracle (chosen on eval)"


@dataclass(frozen=True)
class EvalConfig:
    """What one evaluation run measures; stored in every unit so a resumed run can check it."""

    shots: int = 1
    steps: int = 15                 # max T for dt_dev
    step_size: float = 0.01
    momentum: float = 0.9           # dt_dev's momentum
    fixed_steps: int = 5            # dt_fixed's T
    fixed_momentum: float = 0.0     # dt_fixed's momentum (ACL gate form)
    positions: str = "shifted"
    update: str = "kv"
    dev_size: int = 128
    max_eval: int | None = None
    curve: bool = False
    batch_size: int = 16

    def __post_init__(self):
        for name in ("shots", "dev_size", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (1 if name != "dev_size" else 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")
        TuningConfig(self.steps, self.step_size, self.momentum, self.positions, self.update)
        TuningConfig(self.fixed_steps, self.step_size, self.fixed_momentum, self.positions, self.update)
        if self.max_eval is not None and self.max_eval < 1:
            raise ValueError(f"--max-eval must be >= 1, got {self.max_eval}")

    def tuning(self, fixed: bool) -> TuningConfig:
        return TuningConfig(self.fixed_steps if fixed else self.steps, self.step_size,
                            self.fixed_momentum if fixed else self.momentum, self.positions, self.update)


def accuracy(preds: list[int], gold: list[int]) -> float:
    return round(100.0 * sum(p == g for p, g in zip(preds, gold)) / max(1, len(gold)), 4)


def score_examples(ctx, examples, batch_size: int):
    """Scores of a list of Examples (grouped by number of choices, order kept)."""
    from .scoring import Scores

    logprob, n_tokens = [None] * len(examples), [None] * len(examples)
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(len(e.continuations), []).append(i)
    for idx in groups.values():
        s = ctx.score([examples[i].query for i in idx], [list(examples[i].continuations) for i in idx],
                      batch_size=batch_size)
        for i, lp, nt in zip(idx, s.logprob, s.n_tokens):
            logprob[i], n_tokens[i] = lp, nt
    return Scores(logprob, n_tokens)


def _accs(scores, gold) -> dict:
    return {"sum": accuracy(scores.predictions(), gold), "norm": accuracy(scores.predictions(normalize=True), gold)}


def run_unit(lm, task, seed: int, cfg: EvalConfig, data_dir=None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Evaluate one (model, task, seed); -> (unit result, per-item prediction rows)."""
    from .context import zero_shot
    from .data import make_plan

    t_start = time.perf_counter()
    plan = make_plan(task, seed, shots=cfg.shots, dev_size=cfg.dev_size, max_eval=cfg.max_eval, data_dir=data_dir)
    gold = [e.label for e in plan.eval]
    dev_gold = [e.label for e in plan.dev]
    times: dict[str, float] = {}
    scores: dict[str, object] = {}
    bar = _bar(progress, total=4 + cfg.steps + cfg.fixed_steps, desc=f"{lm.name} {plan.task.name} seed {seed}")

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        times[name] = times.get(name, 0.0) + round(time.perf_counter() - t, 3)
        return out

    scores["zero_shot"] = timed("zero_shot", lambda: score_examples(zero_shot(lm), plan.eval, cfg.batch_size))
    bar.update(1)

    # dt_dev: tune step by step, score dev at every step (and eval too with --curve, as an oracle)
    tuner = ForwardTuner(lm, plan.demonstrations, cfg.tuning(fixed=False))
    dev_curve, eval_curve, contexts = [], [], []
    for ctx in tuner:
        contexts.append(ctx)
        if plan.dev:
            dev_curve.append(timed("dev", lambda: _accs(score_examples(ctx, plan.dev, cfg.batch_size), dev_gold)))
        if ctx.steps_done == 1:
            scores["icl"] = timed("icl", lambda: score_examples(ctx, plan.eval, cfg.batch_size))
            bar.update(1)
        if cfg.curve:
            s = scores["icl"] if ctx.steps_done == 1 else timed("curve", lambda: score_examples(ctx, plan.eval, cfg.batch_size))
            eval_curve.append(_accs(s, gold))
        bar.update(1)
    if dev_curve:   # ties go to the smaller T
        chosen = max(range(len(dev_curve)), key=lambda t: (dev_curve[t]["sum"], -t)) + 1
    else:
        chosen = cfg.steps
    best = contexts[chosen - 1]
    scores["dt_dev"] = scores["icl"] if chosen == 1 else timed(
        "dt_dev", lambda: score_examples(best, plan.eval, cfg.batch_size))
    bar.update(1)

    fixed = None
    for fixed in ForwardTuner(lm, plan.demonstrations, cfg.tuning(fixed=True)):
        bar.update(1)
    scores["dt_fixed"] = timed("dt_fixed", lambda: score_examples(fixed, plan.eval, cfg.batch_size))
    bar.update(1)
    bar.close()

    tok = lm.tokenizer
    unit = {
        "model": lm.name, "task": plan.task.name, "seed": seed,
        "accuracy": {s: _accs(scores[s], gold) for s in SETTINGS},
        "chosen_steps": chosen,
        "dev_curve": dev_curve,
        "eval_curve": {"label": ORACLE, "points": eval_curve} if cfg.curve else None,
        "stopped": {"dt_dev": tuner.stopped, "dt_fixed": fixed.stopped},
        "norms": {"dt_dev": tuner.history, "dt_fixed": fixed.history},
        "n_eval": len(plan.eval), "n_dev": len(plan.dev),
        "demonstrations": {"text": plan.demonstrations,
                           "items": [{"split": e.split, "index": e.index} for e in plan.demos],
                           "tokens": tuner.length},
        "eval_indices": [e.index for e in plan.eval],
        "dev_indices": [e.index for e in plan.dev],
        "tokens": {"eval_query": sum(len(tok(e.query, add_special_tokens=False).input_ids) for e in plan.eval)},
        "notes": plan.notes,
        "wall_s": {**times, "total": round(time.perf_counter() - t_start, 3)},
    }
    preds = []
    by_sum = {s: scores[s].predictions() for s in SETTINGS}
    by_norm = {s: scores[s].predictions(normalize=True) for s in SETTINGS}
    normalized = {s: scores[s].normalized for s in SETTINGS}
    for i, e in enumerate(plan.eval):
        row = {"model": lm.name, "task": plan.task.name, "seed": seed, "split": e.split, "index": e.index,
               "gold": e.label}
        for s in SETTINGS:
            sc = scores[s]
            row[s] = {"logprob": sc.logprob[i], "normalized": normalized[s][i],
                      "pred": by_sum[s][i], "pred_norm": by_norm[s][i]}
        preds.append(row)
    return unit, preds


def _bar(progress: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, leave=False, **kw)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


@functools.cache
def git_hash() -> str | None:
    """HEAD of the checkout deepthink runs from, with "+dirty" when tracked files other than results and
    Markdown differ from it. Taken once per process (first call: run() makes it at start), so a long run
    records the code it imported, not edits made while it ran."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        if not head:
            return None
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/",
                      ":(top,exclude)benchmarks/results", ":(top,exclude,glob)**/*.md")
        return head + ("+dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import torch
    import transformers

    return {"deepthink": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "git": git_hash(),
            "threads": torch.get_num_threads()}


def unit_path(out: Path, model: str, task: str, seed: int) -> Path:
    safe = lambda s: "".join(c if c.isalnum() or c in "-._" else "_" for c in s)
    return out / "units" / f"{safe(model)}__{safe(task)}__seed{seed}.json"


def run(models: list[str], tasks: list[str], seeds: list[int], cfg: EvalConfig, out, data_dir=None,
        device="cpu", dtype="float32", progress: bool = True, log=print, lm_cache: dict | None = None,
        write: bool = True, quantize: str | None = None) -> dict | None:
    """Run every (model, task, seed) unit not already in `out`, then write results.json and plots (unless
    write=False). lm_cache: a dict to keep loaded models in across calls."""
    import torch

    from .models import load_model
    from .tasks import get_task

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to --out {out}: {e.strerror or e}; choose a writable directory") from e
    task_objs = [get_task(t) for t in tasks]  # fail early on unknown names
    git_hash()    # the code as this run found it
    lm_cache = {} if lm_cache is None else lm_cache
    for model in models:
        todo = [(t, s) for t in task_objs for s in seeds if not _finished(out, model, t.name, s, cfg)]
        if not todo:
            log(f"{model}: all {len(task_objs) * len(seeds)} units already done in {out}")
            continue
        key = (model, str(device), dtype, quantize)
        if key not in lm_cache:
            lm_cache[key] = load_model(model, device=device, dtype=getattr(torch, dtype), quantize=quantize)
        lm = lm_cache[key]
        for task, seed in todo:
            unit, preds = run_unit(lm, task, seed, cfg, data_dir=data_dir, progress=progress)
            unit.update({"model_source": lm.source, "model_fingerprint": lm.fingerprint, "dtype": dtype,
                         "quantize": quantize, "device": str(device), "config": asdict(cfg), "environment": environment()})
            path = unit_path(out, model, task.name, seed)
            _write_atomic(path.with_suffix(".predictions.jsonl"),
                          "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
            _write_atomic(path, json.dumps(unit, indent=1, ensure_ascii=False))  # last: marks the unit done
            a = unit["accuracy"]
            log(f"{model} {task.name} seed {seed}: zero-shot {a['zero_shot']['sum']:.1f}  ICL {a['icl']['sum']:.1f}  "
                f"DT(T={cfg.fixed_steps}) {a['dt_fixed']['sum']:.1f}  DT(dev T={unit['chosen_steps']}) "
                f"{a['dt_dev']['sum']:.1f}  [{unit['wall_s']['total']:.0f}s]")
    if not write:
        return None
    from .report import write_report

    return write_report([out], out, log=log)


def _finished(out: Path, model: str, task: str, seed: int, cfg: EvalConfig) -> bool:
    path = unit_path(out, model, task, seed)
    if not path.exists():
        return False
    try:
        unit = json.loads(path.read_text())
    except ValueError:
        return False  # a damaged unit is re-run
    if unit.get("config") != asdict(cfg):
        diff = {k: (unit.get("config", {}).get(k), v) for k, v in asdict(cfg).items()
                if unit.get("config", {}).get(k) != v}
        raise ValueError(f"{path} was made with other settings {diff} (saved, now): use a new --out "
                         "or the same flags to resume")
    return True


def register(sub) -> None:
    p = sub.add_parser("eval", help="zero-shot vs ICL vs Deep-Thinking on tasks; resumable; writes results and plots",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    from .cli import add_model_args

    add_model_args(p, multiple=True)
    p.set_defaults(func=cmd_eval)
    d = EvalConfig()
    p.add_argument("--task", nargs="+", required=True, help="task names (see `deepthink tasks`) or task YAML files")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds: demonstrations, dev and subsets")
    p.add_argument("--shots", type=int, default=d.shots, help="demonstrations per class (stratified tasks) or in "
                   "total (others)")
    p.add_argument("--steps", type=int, default=d.steps, help="largest T tried on dev for the dt_dev setting")
    p.add_argument("--step-size", type=float, default=d.step_size, help="eta")
    p.add_argument("--momentum", type=float, default=d.momentum, help="beta for dt_dev")
    p.add_argument("--fixed-steps", type=int, default=d.fixed_steps, help="T of the dt_fixed setting (no dev set)")
    p.add_argument("--fixed-momentum", type=float, default=d.fixed_momentum, help="beta of dt_fixed (0 = gate form)")
    p.add_argument("--positions", default=d.positions, choices=["shifted", "aligned"], help="where the re-encoded "
                   "copy sits")
    p.add_argument("--update", default=d.update, choices=["kv", "k", "v"], help="which of keys/values are updated")
    p.add_argument("--dev-size", type=int, default=d.dev_size, help="dev items drawn from training data, disjoint "
                   "from the demonstrations (0: no dev set; dt_dev then uses --steps)")
    p.add_argument("--max-eval", type=int, default=None, help="score a seeded random subset of N eval items")
    p.add_argument("--curve", action="store_true", help="also score eval at every step (an oracle curve, "
                   "for analysis only; no reported number uses it)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="queries per forward pass")
    p.add_argument("--data-dir", default=None, help="folder with <task>/{train,eval}.jsonl (default: "
                   "$DEEPTHINK_DATA_DIR, ../shared/data, else the Hugging Face hub)")
    p.add_argument("--out", required=True, help="output folder; re-running the same command resumes there")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: physical cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_eval(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EvalConfig(shots=args.shots, steps=args.steps, step_size=args.step_size, momentum=args.momentum,
                     fixed_steps=args.fixed_steps, fixed_momentum=args.fixed_momentum, positions=args.positions,
                     update=args.update, dev_size=args.dev_size, max_eval=args.max_eval, curve=args.curve,
                     batch_size=args.batch_size)
    run(args.model, args.task, args.seeds, cfg, args.out, data_dir=args.data_dir, device=args.device,
        dtype=args.dtype, progress=not args.quiet, quantize=args.quantize)
    return 0
