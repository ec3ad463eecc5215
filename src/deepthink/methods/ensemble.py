"""dt_ensemble: each choice's log-probability averaged over the contexts after steps 1..T of one tuning run.

    s_ij = (1/T) sum_{t=1..T} s_ij(t)        s_ij(t): summed log-probability of choice j of query i after step t

One tuning run, T scoring passes: a smoother alternative to picking one T. The token counts n_ij do not
depend on the context (the tokenisation rule reads only query and choice), so the per-token score of the
ensemble, s_ij / n_ij, is also the mean of the per-token scores: the "sum" and "norm" columns average the
same way. T = 1 is ICL exactly. Options are TuningConfig's, defaults as dt_fixed (T = 5, momentum 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..scoring import Scores
from .base import Prepared, Setup, register_method
from .deep_thinking import FixedT, Tuned, tuning_config


class EnsembleScorer:
    """The mean of several scorers' summed log-probabilities (`parts`/`combine`: a Workspace reuses their scores)."""

    def __init__(self, parts: Sequence):
        if not parts:
            raise ValueError("an ensemble needs at least one scorer")
        self.parts = tuple(parts)

    def combine(self, scores: list[Scores], queries=None, choices=None) -> Scores:
        if len(scores) == 1:
            return scores[0]
        k = len(scores)
        logprob = [[sum(vals) / k for vals in zip(*rows)] for rows in zip(*(s.logprob for s in scores))]
        return Scores(logprob, [list(ns) for ns in scores[0].n_tokens])

    def score(self, queries, choices, batch_size: int = 16, **kwargs) -> Scores:
        return self.combine([p.score(queries, choices, batch_size=batch_size, **kwargs) for p in self.parts])


@dataclass(frozen=True)
class EnsembleT(FixedT):
    steps: int = field(default=5, metadata={"help": "T: the contexts after steps 1..T are averaged (1 = plain ICL)"})


@register_method
class DeepThinkingEnsemble(Tuned):
    """Deep-Thinking's steps 1..T as an ensemble (mean log-probability per choice)."""

    name, label = "dt_ensemble", "DT step ensemble"
    Config = EnsembleT

    def prepare(self, setup: Setup) -> Prepared:
        contexts = setup.contexts(tuning_config(self.config))
        scorer = contexts[0] if len(contexts) == 1 else EnsembleScorer(contexts)
        last = contexts[-1]
        return Prepared(scorer, info={"steps": self.config.steps, "stopped": last.stopped, "norms": last.history})

    def describe(self, info: dict) -> str:
        return f"Deep-Thinking, mean over steps 1..{self.config.steps}, momentum {self.config.momentum:g}"
