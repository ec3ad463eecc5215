"""Contextual calibration (Zhao et al. 2021, "Calibrate Before Use") of any method: NAME_cc.

With the same prefix (zero-shot, ICL, a tuned context, ...), score the task's query template filled with
each content-free input c in C (default "N/A", "" and "[MASK]", written `content_free="N/A||[MASK]"`),
and subtract, per choice j, their mean score from every query's score of choice j:

    scores="sum"   s~_ij = s_ij - b_j,                 b_j = mean_c s_cj
    scores="norm"  s~_ij / n_ij = s_ij / n_ij - b'_j,  b'_j = mean_c s_cj / n_cj

with s the summed log-probability of a choice's n tokens. The calibrated Scores keep each query's own token
counts n_ij, so their `.logprob` is the calibrated summed score and `.normalized` the calibrated per-token
score: "sum" subtracts the content-free summed score from the summed score (per token: (s_ij - b_j) / n_ij);
"norm" subtracts the content-free per-token score from the per-token score (summed: s_ij - n_ij b'_j). The
runner reports both columns (decision by the summed and by the per-token calibrated score) in both modes.
The two modes differ only where a choice tokenises to a different number of tokens after a query than
after the content-free queries (n_ij != n_cj); for the fixed-label tasks calibration serves, the choice
follows the same template text in every query and the modes give equal scores (tests check it).

Zhao et al. average the content-free *probabilities* renormalised over the label words and divide by them;
we subtract the mean *log*-probability (a geometric mean), which for one content-free input is the same
decision rule (the renormalisation is one constant per item), and extends to multi-token choices.

Tasks whose choices differ per item (copa, hellaswag, obqa, qasc, winogrande) or whose query is built by
a hook have no content-free query with the same choices: refused, as is a Setup without a task.

`calibrated(MethodClass)` makes the calibrated variant of any registered method (a plugin's too): its
Config is the method's plus `content_free` and `scores`; a method that chooses among scorers on training
data (dt_dev) chooses on calibrated scores, through `Method.adapt`.
"""
from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Sequence

from ..scoring import Scores, score_grouped
from .base import METHODS, Method, NotApplicable, Prepared, Setup, register_method

CONTENT_FREE = "N/A||[MASK]"       # "|"-separated: "N/A", "" and "[MASK]"
MODES = ("sum", "norm")


def content_free_inputs(text: str) -> list[str]:
    """"N/A||[MASK]" -> ["N/A", "", "[MASK]"] (one entry per "|"-separated field, empty ones included)."""
    return text.split("|")


def content_free_queries(task, inputs: Sequence[str]) -> list[str]:
    """The task's query template with each content-free input in its query field; refuses tasks without one
    set of choices shared by every item."""
    if task is None:
        raise ValueError("calibration needs the task (its query template) to build content-free queries; these "
                         "demonstrations come without one: run it on a task (deepthink eval --task ...)")
    if task.choices is None:
        raise NotApplicable(f"calibration needs one set of choices shared by every item, but task {task.name!r} "
                            f"has per-item choices ({task.choices_field}): there is no content-free query with the "
                            "same choices. Use the uncalibrated method on this task")
    if task.hook is not None:
        raise NotApplicable(f"calibration cannot build a content-free query for task {task.name!r}: its query "
                            f"comes from the row hook {task.hook!r}, not from one input field")
    queries = []
    for text in inputs:
        q = task.query_template.format(query=text.strip() if task.strip_query else text)
        if not q:
            raise ValueError(f"content-free input {text!r} gives an empty query with the template "
                             f"{task.query_template!r}: remove it from content_free")
        queries.append(q)
    return queries


class CalibratedScorer:
    """Any scorer (`.score(queries, choices, batch_size=...) -> Scores`) with contextual calibration.

    The content-free baselines are scored once per set of choices, with the same scorer (so the same prefix).
    `parts`/`combine` let a Workspace reuse the inner scorer's scores of the same items."""

    def __init__(self, inner, queries: Sequence[str], mode: str = "sum", batch_size: int = 16):
        if mode not in MODES:
            raise ValueError(f"calibration scores={mode!r}: valid: {', '.join(MODES)}")
        self.inner, self.queries, self.mode, self.batch_size = inner, list(queries), mode, batch_size
        self.parts = (inner,)
        self._baselines: dict[tuple[str, ...], tuple[list[float], list[float]]] = {}

    def baseline(self, choices: Sequence[str]) -> tuple[list[float], list[float]]:
        """(b_j summed, b'_j per token) for these choices: means over the content-free queries."""
        key = tuple(choices)
        if key not in self._baselines:
            s = self.inner.score(self.queries, [list(key)] * len(self.queries), batch_size=self.batch_size)
            n = len(self.queries)
            summed = [sum(row[j] for row in s.logprob) / n for j in range(len(key))]
            per_token = [sum(row[j] for row in s.normalized) / n for j in range(len(key))]
            self._baselines[key] = (summed, per_token)
        return self._baselines[key]

    def combine(self, parts: list[Scores], queries: Sequence[str], choices: Sequence[Sequence[str]]) -> Scores:
        (raw,) = parts
        logprob = []
        for row, ns, cs in zip(raw.logprob, raw.n_tokens, choices):
            summed, per_token = self.baseline(cs)
            if self.mode == "sum":
                logprob.append([s - b for s, b in zip(row, summed)])
            else:
                logprob.append([n * (s / n - b) for s, n, b in zip(row, ns, per_token)])
        return Scores(logprob, [list(ns) for ns in raw.n_tokens])

    def score(self, queries: Sequence[str], choices, batch_size: int = 16, **kwargs) -> Scores:
        """The calibrated Scores of `queries` (any numbers of choices, like TunedContext.predict)."""
        if choices and all(isinstance(c, str) for c in choices):
            choices = [list(choices)] * len(queries)
        raw = score_grouped(self.inner.score, list(queries), [list(c) for c in choices], batch_size=batch_size,
                            **kwargs)
        return self.combine([raw], queries, choices)


class Calibrated:
    """Mixin of calibrated methods: the wrapped method's prepare, with every scorer it reads and answers with
    calibrated (memoised per inner scorer, so a Workspace scores each once)."""

    base: type[Method]

    def adapt(self, scorer, setup: Setup):
        memo = self.__dict__.setdefault("_calibrated", {})
        key = id(scorer)
        if key not in memo:
            queries = content_free_queries(setup.task, content_free_inputs(self.config.content_free))
            memo[key] = (scorer, CalibratedScorer(super().adapt(scorer, setup), queries, self.config.scores,
                                                  setup.batch_size))
        return memo[key][1]

    def check(self, setup: Setup) -> None:
        content_free_queries(setup.task, content_free_inputs(self.config.content_free))   # NotApplicable: no task
        super().check(setup)

    def prepare(self, setup: Setup) -> Prepared:
        content_free_queries(setup.task, content_free_inputs(self.config.content_free))   # refuse early
        p = super().prepare(setup)
        scorer = self.adapt(p.scorer, setup)
        return Prepared(scorer, info={**p.info, "calibration": calibration_info(scorer, setup.task, self.config)},
                        curve=[self.adapt(c, setup) for c in p.curve])

    def describe(self, info: dict) -> str:
        return f"{super().describe(info)} + contextual calibration ({self.config.scores})"


def calibration_info(scorer: CalibratedScorer, task, config) -> dict:
    """What is subtracted from the task's choices (as its choice template writes them after a query), as JSON."""
    text = content_free_inputs(config.content_free)[0]
    values = {"query": text.strip() if task.strip_query else text}
    q = task.query_template.format(**values)
    continuations = [task.choice_template.format(**values, choice=c)[len(q):] for c in task.choices]
    summed, per_token = scorer.baseline(continuations)
    return {"content_free": content_free_inputs(config.content_free), "scores": config.scores,
            "queries": scorer.queries, "choices": continuations, "baseline_sum": summed,
            "baseline_per_token": per_token}


def calibrated(base: type[Method], name: str | None = None, label: str | None = None) -> type[Method]:
    """Register and return the calibrated variant of the method class `base`: NAME_cc, label "LABEL + CC",
    options = base's + content_free + scores."""

    def post_init(self):
        parent = getattr(super(Config, self), "__post_init__", None)
        if parent is not None:
            parent()
        if not isinstance(self.content_free, str):
            raise ValueError(f"content_free={self.content_free!r}: give the content-free inputs as one "
                             "'|'-separated string, e.g. 'N/A||[MASK]' (N/A, the empty input, [MASK])")
        if self.scores not in MODES:
            raise ValueError(f"scores={self.scores!r}: valid: {', '.join(MODES)} (subtract summed or per-token "
                             "content-free log-probabilities)")

    Config = make_dataclass(
        f"Calibrated{base.Config.__name__}",
        [("content_free", "str", field(default=CONTENT_FREE, metadata={
            "help": "content-free inputs put in the task's query field, '|'-separated (default: N/A, the empty "
                    "input, [MASK])"})),
         ("scores", "str", field(default="sum", metadata={
             "help": "what is subtracted: 'sum' (content-free summed log-probability from the summed one) or "
                     "'norm' (per-token from per-token)", "choices": MODES}))],
        bases=(base.Config,), frozen=True, namespace={"__post_init__": post_init})
    Config.__module__ = __name__
    Config.__doc__ = f"{base.Config.__name__} plus contextual calibration: content_free, scores."
    cls = type(f"Calibrated{base.__name__}", (Calibrated, base), {
        "name": name or f"{base.name}_cc", "label": label or f"{base.label or base.name} + CC", "Config": Config,
        "base": base, "__module__": __name__,
        "__doc__": f"{base.name} with contextual calibration (content-free log-probability per choice subtracted)."})
    return register_method(cls)


BUILTIN = ("zero_shot", "icl", "dt_fixed", "dt_dev", "icl_repeat", "dt_ensemble", "grad_kv")
for _name in BUILTIN:        # zero_shot_cc, icl_cc, dt_fixed_cc, dt_dev_cc, icl_repeat_cc, dt_ensemble_cc, grad_kv_cc
    calibrated(METHODS[_name])
