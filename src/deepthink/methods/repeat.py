"""icl_repeat: plain in-context learning with the demonstrations concatenated `times` times.

The prefix is the demonstration string repeated, D * r (encoded once, like ICL: one forward pass, no
update). A user of the reference code reported that two demonstrations repeated five times give most of
Deep-Thinking's gain; a forward-tuning gain is only a gain if it beats this at a matching r (r = 2, r = T).
times = 1 is ICL exactly (the same context object).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..tuning.config import TuningConfig
from ..tuning.tuner import ForwardTuner
from .base import Method, Prepared, Setup, register_method


@dataclass(frozen=True)
class RepeatConfig:
    times: int = field(default=2, metadata={"help": "r, how many copies of the demonstrations make the prefix "
                                                    "(1 = plain ICL)"})

    def __post_init__(self):
        if isinstance(self.times, bool) or not isinstance(self.times, int) or self.times < 1:
            raise ValueError(f"RepeatConfig.times={self.times!r}: must be an integer >= 1 (1 = plain ICL)")


@register_method
class ICLRepeat(Method):
    """ICL with the demonstrations repeated r times."""

    name, label = "icl_repeat", "ICL x r"
    Config = RepeatConfig

    def check(self, setup: Setup) -> None:
        ForwardTuner(setup.lm, setup.demonstrations * self.config.times, TuningConfig(steps=1))   # fits the positions

    def prepare(self, setup: Setup) -> Prepared:
        if self.config.times == 1:
            ctx = setup.icl()
        else:
            ctx = ForwardTuner(setup.lm, setup.demonstrations * self.config.times, TuningConfig(steps=1)).step()
        return Prepared(ctx, info={"times": self.config.times, "tokens": ctx.length})

    def describe(self, info: dict) -> str:
        return f"ICL, demonstrations x {self.config.times}"
