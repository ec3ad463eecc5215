"""Selection rules: how dt_dev chooses T in 1..steps from training data only (`-o dt_dev.selection=NAME`).

Every rule scores the contexts after steps 1..steps of one tuning run; "accuracy" is by summed
log-probability (the "sum" column), ties go to the smaller T, and the rule reads the scores through
`method.adapt` (so dt_dev_cc chooses on calibrated scores). None reads eval items (a Setup holds none).

dev-acc          accuracy on the dev items. Without dev items: T = steps.
dev-acc-guarded  T = 1 (ICL) unless the dev-acc choice T* beats it significantly: with b the dev items T*
                 gets right and T = 1 wrong and c the reverse, an exact one-sided sign test (McNemar's exact
                 test) gives p = P(X >= b), X ~ Binomial(b + c, 1/2); T* is kept when p <= guard_level
                 (default 0.05), else T = 1. The test runs on the T that won on the same items, so the chance
                 of leaving ICL when no T is better exceeds guard_level (Bonferroni bounds it by
                 (steps - 1) * guard_level). Without dev items: T = 1.
dev-loglik       mean over dev items of the log-probability of the gold choice among the item's choices,
                 log softmax_j(s_j)[gold] with s_j the summed log-probability of choice j: the log-loss of
                 the classifier whose argmax is the "sum" prediction; smoother than accuracy. Without dev
                 items: T = steps.
loo              leave-one-out over the demonstrations, no dev items: for each demonstration i, tune on the
                 others (same config, same order) and score demonstration i's query with its choices after
                 steps 1..steps; T by that accuracy over the n held-out demonstrations. Needs n >= 2
                 demonstrations as items (Setup.demos).

Each rule returns (T, info): info["selection_curve"] is its objective per T; some add their details.

grad_kv's rules (`-o grad_kv.selection=NAME`, ITEM_RULES below) are pure functions of per-item dev outcomes, so
that a stored record replays them exactly (benchmarks/selection.py): `correct[t][i]` (1 when dev item i's "sum"
prediction after step t + 1 is right) and `logp[t][i]` (the gold choice's log softmax over the item's choices, as
in dev-loglik). `level` is the rule's threshold. Every rule ties to the smaller T.

dev-acc          T by dev accuracy (grad_kv's rule before issue 31).
dev-mcnemar      T = 1 unless some T > 1 beats it on the dev items by an exact one-sided sign test (McNemar) at
                 `level`: wins b = items right at T and wrong at T = 1, losses c the reverse, p = P(X >= b),
                 X ~ Bin(b + c, 1/2). Among the T that pass: the highest dev accuracy, then the highest mean gold
                 log-probability. Every T is tested, so with no T better than 1 the chance of leaving 1 exceeds
                 `level` (Bonferroni: at most (steps - 1) * level).
dev-bootstrap    the same, with a paired bootstrap over the dev items instead of the sign test: T passes when the
                 `level` quantile of the resampled mean gain over T = 1 (1000 resamples, seeded) is above 0.
"""
from __future__ import annotations

import math

from ..registry import Entry, Registry
from ..scoring import Scores
from ..tuning.config import TuningConfig
from .base import Setup, Workspace


Selection = Entry   # fn(method, setup, contexts, tuning: TuningConfig) -> (T, info)
SELECTIONS = Registry("selection rule")


def register_selection(name: str, help: str):
    """Decorator: make `fn(method, setup, contexts, tuning) -> (T, info)` a dt_dev selection rule."""
    return SELECTIONS.register(name, help)


def argmax_first(curve: list[float]) -> int:
    """1-based index of the largest value; ties go to the smaller T."""
    return max(range(len(curve)), key=lambda t: (curve[t], -t)) + 1


def sign_test(wins: int, losses: int) -> float:
    """One-sided exact sign test (McNemar's exact test on the discordant pairs): P(X >= wins), X ~ Bin(wins +
    losses, 1/2). 1.0 when there are no discordant pairs."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def gold_loglik(scores: Scores, gold: list[int]) -> float:
    """Mean over items of log softmax over the item's choices (summed log-probabilities) at the gold choice."""
    total = 0.0
    for row, g in zip(scores.logprob, gold):
        top = max(row)
        total += row[g] - (top + math.log(sum(math.exp(x - top) for x in row)))
    return total / max(1, len(gold))


def _dev_accuracy_curve(method, setup: Setup, contexts) -> list[dict]:
    return [setup.dev_accuracy(method.adapt(ctx, setup)) for ctx in contexts] if setup.dev else []


@register_selection("dev-acc", help="accuracy on dev items (ties to the smaller T; no dev items: T = steps)")
def dev_acc(method, setup: Setup, contexts, tuning: TuningConfig):
    dev_curve = _dev_accuracy_curve(method, setup, contexts)
    curve = [c["sum"] for c in dev_curve]
    chosen = argmax_first(curve) if curve else tuning.steps
    return chosen, {"dev_curve": dev_curve, "selection_curve": curve}


@register_selection("dev-acc-guarded", help="dev-acc, but T = 1 unless the best T beats it on dev by an exact "
                                            "one-sided sign test at guard_level (no dev items: T = 1)")
def dev_acc_guarded(method, setup: Setup, contexts, tuning: TuningConfig):
    dev_curve = _dev_accuracy_curve(method, setup, contexts)
    curve = [c["sum"] for c in dev_curve]
    level = method.config.guard_level
    if not curve:
        return 1, {"dev_curve": [], "selection_curve": [], "guard": {"best_steps": None, "wins": 0, "losses": 0,
                                                                       "p_value": 1.0, "level": level}}
    best = argmax_first(curve)
    gold = [e.label for e in setup.dev]
    first = setup.score_dev(method.adapt(contexts[0], setup)).predictions()
    chosen_preds = setup.score_dev(method.adapt(contexts[best - 1], setup)).predictions()
    wins = sum(b == g != a for a, b, g in zip(first, chosen_preds, gold))
    losses = sum(a == g != b for a, b, g in zip(first, chosen_preds, gold))
    p = sign_test(wins, losses)
    chosen = best if best > 1 and p <= level else 1
    return chosen, {"dev_curve": dev_curve, "selection_curve": curve,
                    "guard": {"best_steps": best, "wins": wins, "losses": losses, "p_value": p, "level": level}}


@register_selection("dev-loglik", help="mean log-probability of the gold choice among the choices on dev "
                                       "(ties to the smaller T; no dev items: T = steps)")
def dev_loglik(method, setup: Setup, contexts, tuning: TuningConfig):
    if not setup.dev:
        return tuning.steps, {"dev_curve": [], "selection_curve": []}
    gold = [e.label for e in setup.dev]
    scorers = [method.adapt(ctx, setup) for ctx in contexts]
    curve = [gold_loglik(setup.score_dev(s), gold) for s in scorers]
    dev_curve = [setup.dev_accuracy(s) for s in scorers]
    return argmax_first(curve), {"dev_curve": dev_curve, "selection_curve": curve}


@register_selection("loo", help="leave-one-out over the demonstrations: tune on the others, score the held-out "
                                "one; T by that accuracy (ties to the smaller T); reads no dev items")
def leave_one_out(method, setup: Setup, contexts, tuning: TuningConfig):
    demos = list(setup.demos)
    if len(demos) < 2:
        raise ValueError(f"selection 'loo' needs at least 2 demonstrations given as items (Setup.demos), got "
                         f"{len(demos)}: use more shots, or a dev-based selection (dev-acc)")
    if "".join(e.block for e in demos) != setup.demonstrations:
        raise ValueError("selection 'loo' needs Setup.demos to spell out Setup.demonstrations (each demonstration's "
                         "text followed by its separator); these demonstrations did not come from a task's items")
    correct = [[] for _ in range(tuning.steps)]
    loglik = [0.0] * tuning.steps
    for i, held in enumerate(demos):
        rest = "".join(e.block for j, e in enumerate(demos) if j != i)
        ws, items = Workspace(setup.lm, rest, on_progress=setup.workspace.on_progress), [held]
        for t, ctx in enumerate(ws.contexts(tuning)):
            s = ws.score(method.adapt(ctx, setup), items, setup.batch_size)
            correct[t].append(s.predictions()[0] == held.label)
            loglik[t] += gold_loglik(s, [held.label]) / len(demos)
    curve = [round(100.0 * sum(c) / len(c), 4) for c in correct]
    return argmax_first(curve), {"dev_curve": [], "selection_curve": curve, "loo_loglik": loglik,
                                 "loo_items": len(demos)}


# ---- grad_kv's rules: pure functions of per-item dev outcomes ---------------------------------------------------

ItemRule = Entry  # fn(correct: [[0/1] per dev item] per step, logp: [[float]] per step, level: float) -> (T, info)
ITEM_RULES = Registry("grad_kv selection rule")


def register_item_rule(name: str, help: str):
    """Decorator: make `fn(correct, logp, level) -> (T, info)` a grad_kv selection rule."""
    return ITEM_RULES.register(name, help)


def gold_logps(scores: Scores, gold: list[int]) -> list[float]:
    """Per item: log softmax over the item's choices (summed log-probabilities) at the gold choice."""
    out = []
    for row, g in zip(scores.logprob, gold):
        top = max(row)
        out.append(row[g] - (top + math.log(sum(math.exp(x - top) for x in row))))
    return out


def _accuracy(correct) -> list[float]:
    return [100.0 * sum(c) / len(c) for c in correct]


def _best_of(ts: list[int], correct, logp) -> int:
    """Of the 1-based steps `ts`: the highest dev accuracy, then the highest mean gold log-probability, then the
    smallest T."""
    return max(ts, key=lambda t: (sum(correct[t - 1]), sum(logp[t - 1]) / len(logp[t - 1]), -t))


@register_item_rule("dev-acc", help="accuracy on dev items, ties to the smaller T")
def item_dev_acc(correct, logp, level):
    curve = _accuracy(correct)
    return argmax_first(curve), {"selection_curve": curve}


def _guarded(correct, logp, level, passes) -> tuple[int, dict]:
    """T = 1 unless some T > 1 `passes(wins, losses, diffs)` against T = 1; among those the best (_best_of)."""
    first, tests, ok = correct[0], [], []
    for t in range(2, len(correct) + 1):
        diffs = [b - a for a, b in zip(first, correct[t - 1])]
        wins, losses = diffs.count(1), diffs.count(-1)
        stat = passes(wins, losses, diffs)
        tests.append({"T": t, "wins": wins, "losses": losses, "stat": stat["stat"]})
        if stat["pass"]:
            ok.append(t)
    chosen = _best_of(ok, correct, logp) if ok else 1
    return chosen, {"selection_curve": _accuracy(correct), "level": level, "passed": ok, "tests": tests}


@register_item_rule("dev-mcnemar", help="T = 1 unless a T beats it on dev by an exact one-sided sign test "
                                        "(McNemar) at level; then the best such T by accuracy, then log-likelihood")
def item_dev_mcnemar(correct, logp, level):
    def passes(wins, losses, diffs):
        p = sign_test(wins, losses)
        return {"stat": p, "pass": wins > losses and p <= level}
    return _guarded(correct, logp, level, passes)


def bootstrap_lower(diffs: list[int], level: float, n_boot: int = 1000, seed: int = 0) -> float:
    """The `level` quantile of the mean of `diffs` resampled with replacement (a one-sided lower bound)."""
    import numpy as np

    d = np.asarray(diffs, dtype=float)
    means = d[np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    return float(np.quantile(means, level))


@register_item_rule("dev-bootstrap", help="T = 1 unless a T's paired bootstrap lower bound (quantile `level`) of "
                                          "its dev gain over T = 1 is above 0; then the best such T")
def item_dev_bootstrap(correct, logp, level):
    def passes(wins, losses, diffs):
        if wins <= losses:
            return {"stat": None, "pass": False}
        low = bootstrap_lower(diffs, level)
        return {"stat": round(100 * low, 4), "pass": low > 0}
    return _guarded(correct, logp, level, passes)


def choose(rule: str, correct, logp, level: float) -> tuple[int, dict]:
    """T by grad_kv selection rule `rule` from per-item dev outcomes (see the module's docstring)."""
    if not correct or not correct[0]:
        raise ValueError(f"selection {rule!r} needs dev items: give some (--dev-size), or use selection loo")
    if len(correct) != len(logp) or any(len(c) != len(correct[0]) for c in (*correct, *logp)):
        raise ValueError("selection needs one outcome per dev item at every step (correct and logp alike)")
    return ITEM_RULES.get_entry(rule).fn(correct, logp, level)
