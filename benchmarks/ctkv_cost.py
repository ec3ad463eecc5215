"""What ct_kv's E epochs cost against grad_kv's T steps, on the same draw, as a ratio (docs/methods.md).

    python benchmarks/ctkv_cost.py                       # the tiny random Llama of tests/conftest.py
    python benchmarks/ctkv_cost.py --model smollm2-135m  # a real model (minutes; run it alone on the machine)

Times are CPU seconds of this process (time.process_time) with one torch thread, so that other work on a shared
machine inflates them less than wall time. Per method: the tuning run alone (a GradientTuner with the method's
config, every step), and the whole preparation in a fresh workspace (tuning plus its dev readings: grad_kv scores
dev at each of its T steps, ct_kv at every `record_every`-th epoch). Prints one line per method and the ratios.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_llama():
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_lm

    return tiny_lm("llama")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model name or folder (default: the tests' tiny random Llama)")
    p.add_argument("--task", default="sentiment-demo")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--dev-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=200, help="ct_kv's E")
    p.add_argument("--steps", type=int, default=15, help="grad_kv's T")
    args = p.parse_args(argv)

    import torch

    from deepthink.data import make_plan
    from deepthink.methods import Setup, make_method
    from deepthink.methods.gradient import gradient_config
    from deepthink.tuning.gradient import GradientTuner

    torch.set_num_threads(1)
    if args.model:
        from deepthink.models import load_model

        lm = load_model(args.model)
    else:
        lm = tiny_llama()
    plan = make_plan(args.task, args.seed, shots=args.shots, dev_size=args.dev_size)

    def setup():
        return Setup(lm, plan.demonstrations, plan.dev, demos=plan.demos, task=plan.task)

    make_method("grad_kv", {"steps": 2}).prepare(setup())    # first-call costs (allocations, lazy imports): not counted
    rows = {}
    for key, opts in (("grad_kv", {"steps": args.steps}), ("ct_kv", {"epochs": args.epochs})):
        method = make_method(key, opts)
        gcfg = method.config.gradient_config() if key == "ct_kv" else gradient_config(method.config)
        start = time.process_time()
        list(GradientTuner(lm, plan.demonstrations, plan.demos, gcfg))
        tuning = time.process_time() - start
        start = time.process_time()
        method.prepare(setup())
        total = time.process_time() - start
        updates = gcfg.steps - 1
        rows[key] = (tuning, total, updates)
        print(f"{key}: {updates} updates, tuning {tuning:.2f} CPU s ({1000 * tuning / updates:.0f} ms/update), "
              f"preparation with dev readings {total:.2f} CPU s")
    (gt, gall, gu), (ct, call, cu) = rows["grad_kv"], rows["ct_kv"]
    print(f"{lm.name}, {args.task} {len(plan.demos)} demonstrations, {len(plan.dev)} dev items: ct_kv / grad_kv = "
          f"{ct / gt:.1f}x tuning, {call / gall:.1f}x with dev readings ({cu / gu:.1f}x the updates)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
