"""Deep-Thinking (forward tuning) at a fixed T, and with T chosen on training data.

dt_fixed: T fixed in advance (default 5 with momentum 0: the ACL paper's setting without a dev set).
dt_dev:   T in 1..steps chosen by a selection rule (methods/selection.py): by default accuracy on dev
          items drawn from the training data, disjoint from the demonstrations; ties go to the smaller T;
          without dev items, T = steps. Other rules: dev-acc-guarded, dev-loglik, loo (no dev items).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..tuning.config import TuningConfig
from ..tuning.tuner import ForwardTuner
from .base import Method, Prepared, Setup, register_method
from .selection import SELECTIONS


def tuning_config(config) -> TuningConfig:
    """The TuningConfig part of a method config that extends it."""
    return TuningConfig(**{f.name: getattr(config, f.name) for f in fields(TuningConfig)})


def _run_info(ctx) -> dict:
    return {"stopped": ctx.stopped, "norms": ctx.history}


class Tuned(Method):
    """A method that runs forward tuning with tuning_config(self.config)."""

    def check(self, setup: Setup) -> None:
        ForwardTuner(setup.lm, setup.demonstrations, tuning_config(self.config))     # its length checks; runs nothing


@dataclass(frozen=True)
class FixedT(TuningConfig):
    steps: int = field(default=5, metadata={"help": "T, forward passes over the demonstrations; 1 = plain ICL"})
    momentum: float = field(default=0.0, metadata={"help": "beta; 0 gives the ACL paper's gate form"})


@register_method
class DeepThinkingFixed(Tuned):
    name, label = "dt_fixed", "DT fixed-T"
    Config = FixedT

    def prepare(self, setup: Setup) -> Prepared:
        ctx = setup.contexts(tuning_config(self.config))[-1]
        return Prepared(ctx, info={"steps": self.config.steps, **_run_info(ctx)})

    def describe(self, info: dict) -> str:
        return f"Deep-Thinking, T={self.config.steps}, momentum {self.config.momentum:g}"


@dataclass(frozen=True)
class DevT(TuningConfig):
    steps: int = field(default=15, metadata={"help": "largest T tried (T = 1 is plain ICL)"})
    selection: str = field(default="dev-acc", metadata={
        "help": "how T is chosen (methods/selection.py): dev-acc (dev accuracy), dev-acc-guarded (T = 1 unless "
                "significantly better on dev), dev-loglik (dev log-probability of the gold choice), loo "
                "(leave-one-out over the demonstrations, no dev items); ties to the smaller T",
        "choices": tuple(SELECTIONS)})
    guard_level: float = field(default=0.05, metadata={
        "help": "dev-acc-guarded: leave T = 1 only when the one-sided exact sign test on dev items gives "
                "p <= guard_level"})

    def __post_init__(self):
        super().__post_init__()
        if self.selection not in SELECTIONS:
            raise ValueError(f"DevT.selection={self.selection!r}: valid: {', '.join(SELECTIONS)}")
        g = self.guard_level
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g < 1:
            raise ValueError(f"DevT.guard_level={g!r}: must be a number in (0, 1), e.g. 0.05")


@register_method
class DeepThinkingDev(Tuned):
    name, label = "dt_dev", "DT dev-T"
    Config = DevT

    def prepare(self, setup: Setup) -> Prepared:
        tuning = tuning_config(self.config)
        contexts = setup.contexts(tuning)
        chosen, info = SELECTIONS[self.config.selection].fn(self, setup, contexts, tuning)
        best = contexts[chosen - 1]
        return Prepared(best, info={"chosen_steps": chosen, "dev_curve": info.pop("dev_curve"),
                                    "selection": self.config.selection, **info, **_run_info(contexts[-1])},
                        curve=contexts)

    def describe(self, info: dict) -> str:
        how = "on dev" if self.config.selection == "dev-acc" else f"by {self.config.selection}"
        return f"Deep-Thinking, T={info['chosen_steps']} chosen {how}"
