#!/usr/bin/env python
"""Cost of gradient KV tuning against forward tuning: tuning time and peak memory at the paper's shot counts.

    python benchmarks/grad_cost.py                                   # the full run (the lead's; ~15-30 min on CPU)
    python benchmarks/grad_cost.py --models smollm2-135m --settings sst2:1 --steps 2   # smoke test

Each (model, task, shots, tuner) runs in a fresh process (`--worker`): the model and the demonstrations are
loaded and the memory-mapped weights paged in; then the tuning run of --steps steps runs twice: during the
first a thread samples the process's RSS every 5 ms ("peak MB": its peak minus the RSS just before; on CUDA
the growth of torch.cuda.max_memory_allocated), the second is timed ("seconds", free of one-time costs). Tuners:
  forward       forward tuning, TuningConfig defaults (eta 0.01, beta 0.9)
  grad_kv       gradient KV tuning, GradientConfig defaults (Adam, lr 0.001, every demonstration each step)
  grad_kv_ckpt  the same with checkpointing=True
  grad_kv_reenc the leak-free objective (loo-reencode: n extra encodings of the demonstrations, held for the run)
Settings are TASK:SHOTS (shots per class): sst2:4 is the paper's 8 demonstrations, trec:2 its 12.
Writes <out>/grad_cost.json (every row) and <out>/grad_cost.md; the last line printed is the JSON of the rows.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

TUNERS = {
    "forward": {},
    "grad_kv": {},
    "grad_kv_ckpt": {"checkpointing": True},
    "grad_kv_reenc": {"objective": "loo-reencode"},
}
MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled by a thread."""

    def __init__(self, every: float = 0.005):
        import psutil

        self.proc, self.every, self.peak, self._stop = psutil.Process(), every, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __enter__(self):
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def worker(model: str, task: str, shots: int, tuner: str, steps: int, seed: int, device: str,
           threads: int | None = None) -> dict:
    import torch

    import deepthink
    from deepthink import TuningConfig, data, models
    from deepthink.tuning.gradient import GradientConfig, GradientTuner
    from deepthink.tuning.tuner import tune

    models.set_threads(threads)
    lm = deepthink.load_model(model, device=device)
    plan = data.make_plan(task, seed, shots, dev_size=0, max_eval=1)
    n_tokens = len(lm.tokenizer(plan.demonstrations).input_ids)

    def run(steps):
        if tuner == "forward":
            return tune(lm, plan.demonstrations, TuningConfig(steps=steps))
        for ctx in GradientTuner(lm, plan.demonstrations, plan.demos, GradientConfig(steps=steps, **TUNERS[tuner])):
            pass
        return ctx

    with torch.no_grad():             # page in the memory-mapped weights, so that RSS growth is the run's own
        for t in list(lm.model.parameters()) + list(lm.model.buffers()):
            t.sum()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as mem:             # the first run: memory (freed memory stays in the process afterwards)
        run(steps)
        if cuda:
            torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else (mem.peak - mem.start)
    t0 = time.perf_counter()           # the second run: time, without one-time costs
    ctx = run(steps)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"model": model, "task": task, "shots": shots, "demos": len(plan.demos), "tokens": n_tokens,
            "tuner": tuner, "steps": steps, "seconds": round(seconds, 3), "per_step_s": round(seconds / steps, 4),
            "peak_mb": round(peak / 2 ** 20, 1), "cache_mb": round(ctx.nbytes / 2 ** 20, 2), "device": device,
            "threads": torch.get_num_threads()}


def installed(model: str) -> str | None:
    """None when the registry model can be loaded here, else why not."""
    from deepthink.models import REGISTRY

    entry = REGISTRY.get(model)
    if entry is None:
        return None
    import importlib.util

    missing = [pkg for pkg, _ in entry.chunks if importlib.util.find_spec(pkg) is None]
    return f"not installed ({entry.install})" if missing else None


def markdown(rows: list[dict], skipped: dict[str, str]) -> str:
    lines = ["# Gradient KV tuning: cost against forward tuning", "",
             "`python benchmarks/grad_cost.py` (one fresh process per row; time of one tuning run of T steps, "
             "peak = RSS growth during it on CPU). forward = forward tuning (TuningConfig defaults); grad_kv = "
             "Adam on the cache, leave-one-out masked objective over all demonstrations each step; _ckpt = with "
             "layer checkpointing; _reenc = the leak-free loo-reencode objective.", "",
             "| model | task | demos | tokens | tuner | T | seconds | s/step | peak MB | cache MB | x forward time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fwd = {(r["model"], r["task"], r["shots"]): r["seconds"] for r in rows if r["tuner"] == "forward"}
    for r in rows:
        base = fwd.get((r["model"], r["task"], r["shots"]))
        ratio = f"{r['seconds'] / base:.1f}" if base else "-"
        lines.append(f"| {r['model']} | {r['task']} | {r['demos']} | {r['tokens']} | {r['tuner']} | {r['steps']} | "
                     f"{r['seconds']:.2f} | {r['per_step_s']:.3f} | {r['peak_mb']:.0f} | {r['cache_mb']:.2f} | "
                     f"{ratio} |")
    for model, why in skipped.items():
        lines.append(f"\n{model}: {why}.")
    if rows:
        lines.append(f"\nDevice {rows[0]['device']}, {rows[0]['threads']} torch threads.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--settings", nargs="+", default=["sst2:4", "trec:2"], help="TASK:SHOTS per class")
    p.add_argument("--tuners", nargs="+", default=list(TUNERS), choices=list(TUNERS))
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: physical cores)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--worker", nargs=4, metavar=("MODEL", "TASK", "SHOTS", "TUNER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        model, task, shots, tuner = args.worker
        print(json.dumps(worker(model, task, int(shots), tuner, args.steps, args.seed, args.device, args.threads)))
        return 0
    rows, skipped = [], {}
    for model in args.models:
        why = installed(model)
        if why:
            skipped[model] = why
            print(f"{model}: {why}", file=sys.stderr)
            continue
        for setting in args.settings:
            task, shots = setting.split(":")
            for tuner in args.tuners:
                cmd = [sys.executable, __file__, "--worker", model, task, shots, tuner, "--steps", str(args.steps),
                       "--seed", str(args.seed), "--device", args.device]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{model} {setting} {tuner}: {row['seconds']:.2f} s, peak {row['peak_mb']:.0f} MB",
                      file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grad_cost.json").write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1) + "\n")
    (out / "grad_cost.md").write_text(markdown(rows, skipped))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
