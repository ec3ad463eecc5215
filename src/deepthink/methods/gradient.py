"""grad_kv: the demonstrations' cache optimised by Adam on a leave-one-out objective (deepthink.tuning.gradient).

The objective is Context Tuning's, CT-KV (Lu, Teehan, Yang, Ren, arXiv 2507.04221, ICML 2026; code
agentic-learning-ai-lab/context-tuning); the recipe is ours: Adam at lr 0.01, no schedule, clipping or dropout,
at most 15 steps with T chosen on dev. `ct_kv` (methods/ctkv.py) is their recipe; docs/gradient.md lists every
difference.

The step count T in 1..steps (1 = plain ICL) is chosen like dt_dev's:
  dev-acc: accuracy on dev items drawn from the training data, disjoint from the demonstrations; ties go to
           the smaller T. Without dev items it falls back to `loo` (recorded in info["selection_used"]).
  dev-mcnemar, dev-bootstrap: T = 1 unless a T > 1 beats it on the dev items by a paired test at `level`
           (methods/selection.py); without dev items T = 1.
  loo:     no dev items: leave-one-out accuracy over the demonstrations themselves (every choice of each
           demonstration scored with its own span hidden), ties to the smaller T. The terms are also what
           Adam fits, so after step 1 this reading is optimistic; it is the no-dev option, not an unbiased one.
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field, fields

from ..tuning.gradient import GradientConfig, GradientTuner
from .base import Method, Prepared, Setup, register_method
from .selection import ITEM_RULES, argmax_first, choose, gold_logps

SELECTIONS = (*ITEM_RULES, "loo")
ONE_DEMO = "one demonstration, nothing to leave out: plain ICL (T=1)"


def gradient_config(config) -> GradientConfig:
    """The GradientConfig part of a method config that extends it."""
    return GradientConfig(**{f.name: getattr(config, f.name) for f in fields(GradientConfig)})


def _peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (ru_maxrss: kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)


@dataclass(frozen=True)
class GradKVConfig(GradientConfig):
    # 0.01, not the tuner's 0.001: the method chooses T, and at 0.01 with T chosen on dev it is the recommended
    # default of benchmarks/results/ABLATIONS.md (the confirmation's rule); a fixed T at 0.01 overfits, which is
    # why GradientConfig, used for a fixed step count, keeps 0.001
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate (0 leaves the cache unchanged)"})
    selection: str = field(default="dev-acc", metadata={
        "help": "how T is chosen: dev-acc (accuracy on dev, ties to the smaller T; loo without dev items), "
                "dev-mcnemar / dev-bootstrap (T = 1 unless a T beats it on dev by a paired test at level; T = 1 "
                "without dev items) or loo (leave-one-out accuracy over the demonstrations, no dev items used)",
        "choices": SELECTIONS})
    level: float = field(default=0.1, metadata={
        "help": "the threshold of dev-mcnemar (the sign test's p-value) and dev-bootstrap (the quantile of the "
                "lower bound); unused by dev-acc and loo"})

    def __post_init__(self):
        super().__post_init__()
        if self.selection not in SELECTIONS:
            raise ValueError(f"GradKVConfig.selection={self.selection!r}: valid: {', '.join(SELECTIONS)}")
        if isinstance(self.level, bool) or not isinstance(self.level, (int, float)) or not 0 < self.level < 1:
            raise ValueError(f"GradKVConfig.level={self.level!r}: must be a number between 0 and 1 (e.g. 0.1)")


@register_method
class GradKV(Method):
    """CT-KV's objective (Lu et al., arXiv 2507.04221), our recipe: Adam lr 0.01, T<=15 on dev (docs/gradient.md).

    Adam on the demonstrations' keys/values, leave-one-out objective; T chosen on dev (or leave-one-out); where
    this recipe differs from CT-KV's (AdamW 1e-3, cosine, 200 epochs, clipping, token dropout): docs/gradient.md.
    """

    name, label = "grad_kv", "grad KV"
    Config = GradKVConfig

    @staticmethod
    def _need_items(setup: Setup) -> None:
        if not setup.demos:
            raise ValueError("grad_kv needs the demonstrations as items (Setup.demos: a task draw or a .jsonl "
                             "demos file) to know each one's query and answer; a verbatim text file has none")

    def check(self, setup: Setup) -> None:
        self._need_items(setup)
        if len(setup.demos) < 2:
            return                       # plain ICL (see prepare): nothing to tune, nothing too long to tune
        GradientTuner(setup.lm, setup.demonstrations, setup.demos, gradient_config(self.config))  # lengths; no forward

    def prepare(self, setup: Setup) -> Prepared:
        cfg = self.config
        self._need_items(setup)
        if len(setup.demos) < 2:
            # leave-one-out needs a second demonstration to learn from: with one (e.g. copa at --shots 1) the
            # method is plain ICL, recorded and described as such, so that a default method set runs on every task
            icl = setup.icl()
            info = {"chosen_steps": 1, "selection_used": "none", "note": ONE_DEMO, "dev_curve": [], "loo_curve": [],
                    "train_loss": [], "stopped": None, "tuning_seconds": 0.0, "process_peak_rss_mb": _peak_rss_mb()}
            return Prepared(icl, info=info, curve=[icl])
        gcfg = gradient_config(cfg)
        # one run per GradientConfig in a workspace: variants that differ only in selection (and the calibrated
        # form) read the same run, its contexts and therefore its cached dev scores
        tuner, contexts, seconds, peak = setup.workspace.shared(("grad_kv", gcfg), lambda: self._run(setup, gcfg))
        selection = cfg.selection
        if selection != "loo" and not setup.dev:
            selection = "loo" if selection == "dev-acc" else "none"     # the guarded rules stay at T = 1
        dev_curve = [setup.dev_accuracy(ctx) for ctx in contexts] if setup.dev else []
        loo_curve, extra = [], {}
        if selection == "loo":
            loo_curve = [{k: v for k, v in tuner.loo_eval(ctx).items() if k != "per_demo"} for ctx in contexts]
            chosen = argmax_first([c["acc"] for c in loo_curve])                 # ties go to the smaller T
        elif selection == "none":
            chosen, extra = 1, {"note": f"{cfg.selection} without dev items: T = 1 (plain ICL)"}
        else:
            gold = [e.label for e in setup.dev]
            scores = [setup.score_dev(ctx) for ctx in contexts]
            correct = [[int(p == g) for p, g in zip(s.predictions(), gold)] for s in scores]
            logp = [gold_logps(s, gold) for s in scores]
            chosen, detail = choose(selection, correct, logp, cfg.level)
            # per step and dev item, so that any rule can be replayed on the unit later (benchmarks/selection.py)
            extra = {"dev_items": {"correct": ["".join(map(str, c)) for c in correct],
                                   "gold_logp": [[round(x, 4) for x in row] for row in logp]},
                     "selection_detail": {k: v for k, v in detail.items() if k != "selection_curve"}}
        best = contexts[chosen - 1]
        info = {"chosen_steps": chosen, "selection_used": selection, "dev_curve": dev_curve, "loo_curve": loo_curve,
                "train_loss": [h["loss"] for h in tuner.history], "stopped": tuner.stopped,
                "tuning_seconds": round(seconds, 3), "process_peak_rss_mb": peak, **extra}
        return Prepared(best, info=info, curve=contexts)

    @staticmethod
    def _run(setup: Setup, gcfg: GradientConfig) -> tuple:
        """(tuner, contexts of steps 1..T, seconds, process peak RSS in MB after the run)."""
        start = time.perf_counter()
        icl = setup.icl()
        tuner = GradientTuner(setup.lm, setup.demonstrations, setup.demos, gcfg, init=icl)
        contexts = []
        for ctx in tuner:
            if tuner.step_count == 1:
                ctx = icl                 # the same object as every other method's step 1: scores are shared
            contexts.append(ctx)
            setup.workspace.progress(f"gradient step {len(contexts)}")
            if setup.on_step is not None:  # dev scores are cached by the workspace: prepare reads them again free
                last = tuner.history[-1]
                setup.on_step({"step": tuner.step_count,
                               "loss": last["loss"] if last["step"] == tuner.step_count else None,
                               "dev_accuracy": setup.dev_accuracy(ctx)["sum"] if setup.dev else None})
        return tuner, contexts, time.perf_counter() - start, _peak_rss_mb()

    def describe(self, info: dict) -> str:
        if info.get("note"):
            return f"gradient KV tuning: {info['note']}"
        level = f" at level {self.config.level:g}" if info["selection_used"] in ("dev-mcnemar", "dev-bootstrap") else ""
        return (f"gradient KV tuning, lr {self.config.lr:g}, T={info['chosen_steps']} chosen by "
                f"{info['selection_used']}{level}")
