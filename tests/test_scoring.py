"""Scoring: input validation, tokenisation at the boundary, batching invariance."""
import pytest

import deepthink
from deepthink import TuningConfig
from deepthink.scoring import Scores, prepare
from conftest import CHOICES, DEMOS, MULTI, QUERIES, tiny_lm, approx


@pytest.fixture(scope="module")
def ctx():
    return deepthink.tune(tiny_lm("llama"), DEMOS, TuningConfig(steps=2, step_size=0.1))


def test_batch_size_and_order_do_not_change_scores(ctx):
    queries = QUERIES * 3
    choices = MULTI * 3
    a = ctx.score(queries, choices, batch_size=1).logprob
    b = ctx.score(queries, choices, batch_size=7).logprob
    assert a == approx(b, abs=1e-4)
    assert a[:3] == approx(ctx.score(QUERIES, MULTI).logprob, abs=1e-4)


def test_normalized_and_predictions():
    s = Scores(logprob=[[-2.0, -3.0], [-4.0, -4.0], [-6.0, -4.0]], n_tokens=[[1, 3], [1, 1], [3, 1]])
    assert s.normalized == [[-2.0, -1.0], [-4.0, -4.0], [-2.0, -4.0]]
    assert s.predictions() == [0, 0, 1]            # ties go to the first choice
    assert s.predictions(normalize=True) == [1, 0, 0]


def test_boundary_rule_matches_reference(ctx):
    tok = ctx.lm.tokenizer
    units, n = prepare(tok, ["Review: witty"], [" witty movie", "movie"])
    q = tok("Review: witty", add_special_tokens=False).input_ids
    for u in units:
        for j, toks in u.choices:
            full = tok("Review: witty" + [" witty movie", "movie"][j], add_special_tokens=False).input_ids
            assert u.context == full[:len(q)] and toks == full[len(q):]


@pytest.mark.parametrize("queries, choices, match", [
    ([], CHOICES, "empty"),
    ("a single string", CHOICES, "list of strings"),
    (QUERIES, [CHOICES, CHOICES], "3 queries but 2"),
    (QUERIES[:2], [CHOICES, [" a", " b", " c"]], "same number of choices"),
    (QUERIES[:1], [" good", " good"], "duplicate"),
    (QUERIES[:1], [" good", ""], "adds no tokens"),
    ([""], CHOICES, "tokenises to nothing"),
    (QUERIES[:1], [[]], "at least one choice"),
    ([3], CHOICES, "strings"),
])
def test_bad_inputs_rejected(ctx, queries, choices, match):
    with pytest.raises(ValueError, match=match):
        ctx.score(queries, choices)


def test_query_beyond_context_length_rejected():
    lm = tiny_lm("gpt2")  # 256 positions
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    with pytest.raises(ValueError, match="beyond the model's 256 positions"):
        ctx.score(["Review: " + "witty " * 250], CHOICES)


def test_unknown_method_and_bad_batch_size(ctx):
    with pytest.raises(ValueError, match="naive"):
        ctx.score(QUERIES, CHOICES, method="turbo")
    with pytest.raises(ValueError, match="batch_size"):
        ctx.score(QUERIES, CHOICES, batch_size=0)


def test_unicode_emoji_and_long_inputs(ctx):
    queries = ["Review: 很好看的电影 🎬🍿\nSentiment:", "Review: " + "naïve café " * 40 + "\nSentiment:"]
    fast = ctx.score(queries, CHOICES)
    naive = ctx.score(queries, CHOICES, method="naive")
    assert fast.logprob == approx(naive.logprob, abs=1e-4)
