"""`deepthink demo`: zero-shot, ICL, calibrated ICL, Deep-Thinking and gradient KV tuning on the small sentiment
task shipped in the package.

40 training and 20 test reviews written for this demo (src/deepthink/demo_data). One demonstration per
class is drawn from train (seed 0); the other 38 training reviews are the dev set that picks T.
"""
from __future__ import annotations


def run_demo(model: str = "smollm2-135m", device: str = "cpu", steps: int = 10, seed: int = 0) -> int:
    import time

    from .evaluation import EvalConfig, legacy_methods, run_unit
    from .models import load_model

    t = time.perf_counter()
    print(f"loading {model} ...", flush=True)
    lm = load_model(model, device=device)
    print(f"loaded in {time.perf_counter() - t:.1f}s")
    # the paper's two settings (legacy_methods), the bar (icl_cc) and the recommended default (grad_kv, lr 0.01)
    methods = {**legacy_methods(steps=steps), "icl_cc": {}, "grad_kv": {}}
    cfg = EvalConfig(shots=1, dev_size=38, curve=True, methods=methods)
    unit, _ = run_unit(lm, "sentiment-demo", seed, cfg)
    acc, methods = unit["accuracy"], cfg.make_methods()
    print(f"\ntask sentiment-demo: {unit['n_eval']} test reviews, {unit['n_dev']} dev reviews, "
          f"demonstrations ({unit['demonstrations']['tokens']} tokens):")
    print("  " + unit["demonstrations"]["text"].strip().replace("\n", "\n  "))
    for method in methods:
        info = unit["methods"][method.key]
        if not (info.get("dev_curve") and info.get("eval_curve")):
            continue
        opts = method.options()
        name = (f"gradient KV tuning, lr={opts['lr']}" if "lr" in opts
                else f"Deep-Thinking, eta={opts['step_size']}, momentum={opts['momentum']}")
        print(f"\n{name}: accuracy per step")
        print("  step   dev %   test % (per-step test numbers are for looking only; T is chosen on dev)")
        for t, (d, e) in enumerate(zip(info["dev_curve"], info["eval_curve"]["points"]), 1):
            mark = "  <- chosen on dev" if t == info["chosen_steps"] else ""
            print(f"  {t:4d}  {d['sum']:6.1f}  {e['sum']:6.1f}{mark}")
    print("\ntest accuracy (summed log-prob scoring):")
    said = {m.key: m.describe(unit["methods"][m.key]) for m in methods}
    width = max(map(len, said.values())) + 2
    for method in methods:
        print(f"  {said[method.key]:<{width}}{acc[method.key]['sum']:6.1f}")
    print(f"\n{unit['wall_s']['total']:.1f}s. With 20 test items one item is 5 points: read differences with care.")
    return 0
