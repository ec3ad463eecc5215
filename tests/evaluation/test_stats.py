"""Paired bootstrap intervals and wins/ties/losses."""
import numpy as np
import pytest

from deepthink.evaluation.stats import paired_bootstrap, wins_ties_losses


def test_interval_contains_the_mean_and_shrinks_with_more_items():
    rng = np.random.default_rng(1)
    small = {"a": rng.choice([-1, 0, 1], p=[0.2, 0.5, 0.3], size=100)}
    big = {"a": rng.choice([-1, 0, 1], p=[0.2, 0.5, 0.3], size=10000)}
    s, b = paired_bootstrap(small), paired_bootstrap(big)
    assert s.low <= s.mean <= s.high and b.low <= b.mean <= b.high
    assert (b.high - b.low) < (s.high - s.low) / 5
    assert b.low > 0 and abs(b.mean - 10) < 2                   # true difference: +10 points


def test_tasks_weigh_equally_and_identical_methods_give_zero():
    iv = paired_bootstrap({"a": [1] * 10, "b": [0] * 1000})
    assert iv.mean == pytest.approx(50.0)                         # mean of 100 and 0, not item-weighted
    zero = paired_bootstrap({"a": [0] * 50, "b": [0] * 20})
    assert (zero.mean, zero.low, zero.high) == (0.0, 0.0, 0.0) and not zero.above_zero
    assert str(paired_bootstrap({"a": [1, 1]})) == "+100.0 [+100.0, +100.0]"


def test_bad_input():
    with pytest.raises(ValueError, match="no paired items"):
        paired_bootstrap({})
    with pytest.raises(ValueError, match="no paired items"):
        paired_bootstrap({"a": []})


def test_wins_ties_losses():
    assert wins_ties_losses([1, 2, 3, 4], [1, 1, 5, 4]) == (1, 2, 1)
