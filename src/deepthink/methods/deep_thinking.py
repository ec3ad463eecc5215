"""Deep-Thinking (forward tuning) at a fixed T, and with T chosen on dev items.

dt_fixed: T fixed in advance (default 5 with momentum 0: the ACL paper's setting without a dev set).
dt_dev:   T in 1..steps chosen by accuracy on dev items drawn from the training data, disjoint from
          the demonstrations; ties go to the smaller T; without dev items, T = steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..tuning.config import TuningConfig
from .base import Method, Prepared, Setup, register_method

SELECTIONS = ("dev-acc",)


def tuning_config(config) -> TuningConfig:
    """The TuningConfig part of a method config that extends it."""
    return TuningConfig(**{f.name: getattr(config, f.name) for f in fields(TuningConfig)})


def _run_info(ctx) -> dict:
    return {"stopped": ctx.stopped, "norms": ctx.history}


@dataclass(frozen=True)
class FixedT(TuningConfig):
    steps: int = field(default=5, metadata={"help": "T, forward passes over the demonstrations; 1 = plain ICL"})
    momentum: float = field(default=0.0, metadata={"help": "beta; 0 gives the ACL paper's gate form"})


@register_method
class DeepThinkingFixed(Method):
    name, label = "dt_fixed", "DT fixed-T"
    Config = FixedT

    def prepare(self, setup: Setup) -> Prepared:
        ctx = setup.contexts(tuning_config(self.config))[-1]
        return Prepared(ctx, info={"steps": self.config.steps, **_run_info(ctx)})

    def describe(self, info: dict) -> str:
        return f"Deep-Thinking, T={self.config.steps}, momentum {self.config.momentum:g}"


@dataclass(frozen=True)
class DevT(TuningConfig):
    steps: int = field(default=15, metadata={"help": "largest T tried on dev (T = 1 is plain ICL)"})
    selection: str = field(default="dev-acc", metadata={
        "help": "how T is chosen: dev-acc (accuracy on dev, ties to the smaller T)", "choices": SELECTIONS})

    def __post_init__(self):
        super().__post_init__()
        if self.selection not in SELECTIONS:
            raise ValueError(f"DevT.selection={self.selection!r}: valid: {', '.join(SELECTIONS)}")


@register_method
class DeepThinkingDev(Method):
    name, label = "dt_dev", "DT dev-T"
    Config = DevT

    def prepare(self, setup: Setup) -> Prepared:
        contexts = setup.contexts(tuning_config(self.config))
        dev_curve = [setup.dev_accuracy(ctx) for ctx in contexts] if setup.dev else []
        if dev_curve:   # ties go to the smaller T
            chosen = max(range(len(dev_curve)), key=lambda t: (dev_curve[t]["sum"], -t)) + 1
        else:
            chosen = self.config.steps
        best = contexts[chosen - 1]
        return Prepared(best, info={"chosen_steps": chosen, "dev_curve": dev_curve, **_run_info(contexts[-1])},
                        curve=contexts)

    def describe(self, info: dict) -> str:
        return f"Deep-Thinking, T={info['chosen_steps']} chosen on dev"
