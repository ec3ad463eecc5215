"""Statistics for comparing methods on the same items: paired bootstrap intervals, wins/ties/losses.

Every method of a unit scores the same eval items, so differences are paired per item. A difference
between two methods over several tasks is the mean over tasks of each task's mean over (seed, item)
pairs; its interval resamples the (seed, item) pairs of each task independently (stratified by task),
so tasks keep equal weight and the seed-to-seed spread of demonstrations is part of the interval.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float          # points (percent accuracy)
    low: float
    high: float
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"

    @property
    def above_zero(self) -> bool:
        return self.low > 0


def paired_bootstrap(diffs_by_task: dict, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """`diffs_by_task`: {task: array of per-(seed, item) differences in correctness (each -1, 0 or 1, or
    any paired per-item difference)}. Returns the mean over tasks of the per-task mean difference, in
    points, with a percentile bootstrap interval (items resampled within each task)."""
    if not diffs_by_task:
        raise ValueError("no paired items to compare")
    rng = np.random.default_rng(seed)
    means = np.zeros(n_boot)
    point = 0.0
    for diffs in diffs_by_task.values():
        d = np.asarray(diffs, dtype=float)
        if d.size == 0:
            raise ValueError("a task has no paired items")
        point += d.mean()
        means += d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    k = len(diffs_by_task)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means / k, [alpha, 1 - alpha])
    return Interval(100 * point / k, 100 * float(lo), 100 * float(hi), level)


def wins_ties_losses(a: list[float], b: list[float], tie: float = 1e-9) -> tuple[int, int, int]:
    """How often a > b, a == b, a < b over paired values (e.g. per-seed accuracies)."""
    w = sum(x > y + tie for x, y in zip(a, b))
    l = sum(x < y - tie for x, y in zip(a, b))
    return w, len(a) - w - l, l
