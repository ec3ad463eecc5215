#!/usr/bin/env python
"""How much the leave-one-out mask leaks: loo-mask against loo-reencode on real demonstration sets.

    python benchmarks/grad_leak.py                     # the full run (the lead's): 2 models x 3 settings x 3 seeds
    python benchmarks/grad_leak.py --models smollm2-135m --settings sst2:1 --seeds 0 --steps 1   # smoke test

For each (model, task, shots, seed) the demonstrations of the paper's draw are read three ways, per
demonstration i, on the same cache (deepthink.tuning.gradient.leak):
  visible   NLL of i's gold continuation with nothing hidden (its answer can be copied from the prefix)
  mask      loo-mask: i's span hidden from its query (later demonstrations' keys/values still read i)
  reencode  loo-reencode: the demonstrations encoded with nothing attending to i (same positions), span hidden
leak = reencode - mask (positive: the mask objective is easier than the leak-free one); share = leak /
(reencode - visible), the part of the copying advantage that gets through the mask. Also the leave-one-out
accuracy (every choice scored) under mask and reencode. Read at step 1 (the ICL cache) and, with --steps T > 1,
after T - 1 Adam updates of grad_kv (lr --lr, loo-mask objective): does optimising the masked objective
learn to use the leak?
Writes <out>/grad_leak.json and <out>/grad_leak.md; the last line printed is the JSON of the summary rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def measure(lm, task: str, shots: int, seed: int, steps: int, lr: float) -> list[dict]:
    from deepthink import data
    from deepthink.tuning.gradient import GradientConfig, GradientTuner, leak

    plan = data.make_plan(task, seed, shots, dev_size=0, max_eval=1)
    tuner = GradientTuner(lm, plan.demonstrations, plan.demos, GradientConfig(steps=steps, lr=lr))
    rows = []
    for ctx in tuner:
        if ctx.steps_done not in (1, steps):
            continue
        r = leak(tuner)
        acc = {o: tuner.loo_eval(objective=o)["acc"] for o in ("loo-mask", "loo-reencode")}
        rows.append({"model": lm.name, "task": task, "shots": shots, "seed": seed, "demos": len(plan.demos),
                     "step": ctx.steps_done, "acc_mask": acc["loo-mask"], "acc_reencode": acc["loo-reencode"],
                     **{k: v for k, v in r.items() if k != "per_demo"}, "per_demo": r["per_demo"]})
    return rows


def markdown(rows: list[dict], lr: float) -> str:
    def f(x, fmt=".3f"):
        return "-" if x is None else format(x, fmt)

    lines = ["# Gradient KV tuning: what the leave-one-out mask leaks", "",
             "`python benchmarks/grad_leak.py`. Mean over the demonstrations of one draw of the NLL (nats) of each "
             "one's gold continuation: visible (nothing hidden), mask (its span hidden: loo-mask), reencode (what "
             "follows it re-encoded without it: loo-reencode). leak = reencode - mask; share = leak / (reencode - "
             f"visible), mean over demonstrations. Step 1 = the ICL cache; a later step = after Adam (lr {lr:g}) "
             "on loo-mask. LOO acc = leave-one-out accuracy over the demonstrations (%).", "",
             "| model | task | demos | seed | step | visible | mask | reencode | leak | share | LOO acc mask | "
             "LOO acc reencode |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['task']} | {r['demos']} | {r['seed']} | {r['step']} | "
                     f"{f(r['mean_visible'])} | {f(r['mean_mask'])} | {f(r['mean_reencode'])} | "
                     f"{f(r['mean_leak'])} | {f(r['mean_share'], '.2f')} | {r['acc_mask']:.1f} | "
                     f"{r['acc_reencode']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--settings", nargs="+", default=["sst2:1", "sst2:4", "trec:2"], help="TASK:SHOTS per class")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=15, help="also read the cache after this step (1: ICL only)")
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)

    import deepthink

    rows = []
    for model in args.models:
        lm = deepthink.load_model(model)
        for setting in args.settings:
            task, shots = setting.split(":")
            for seed in args.seeds:
                for r in measure(lm, task, int(shots), seed, args.steps, args.lr):
                    rows.append(r)
                    print(f"{model} {setting} seed {seed} step {r['step']}: leak {r['mean_leak']:.4f} "
                          f"(mask {r['mean_mask']:.3f}, reencode {r['mean_reencode']:.3f})", file=sys.stderr)
        del lm
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grad_leak.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "grad_leak.md").write_text(markdown(rows, args.lr))
    print(json.dumps([{k: v for k, v in r.items() if k != "per_demo"} for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
