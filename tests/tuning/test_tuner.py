"""The method's identities on tiny random models of every architecture."""
import math

import pytest
import torch

import deepthink
from deepthink import TuningConfig
from conftest import ARCHS, CHOICES, DEMOS, MULTI, QUERIES, approx, plain_icl_scores, reference_tune, tiny_lm

ATOL = 1e-4


def assert_close_lists(a, b, atol=ATOL):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def test_step1_equals_plain_icl(lm):
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    want = plain_icl_scores(lm, DEMOS, QUERIES, [CHOICES] * 3)
    for method in ("fast", "naive"):
        got = ctx.score(QUERIES, CHOICES, method=method).logprob
        assert got == approx(want, abs=ATOL)
    want = plain_icl_scores(lm, DEMOS, QUERIES, MULTI)
    assert ctx.score(QUERIES, MULTI).logprob == approx(want, abs=ATOL)


def test_zero_shot_equals_query_alone(lm):
    ctx = deepthink.zero_shot(lm)
    assert ctx.length == len(lm.tokenizer("").input_ids)
    want = plain_icl_scores(lm, "", QUERIES, MULTI)
    assert ctx.score(QUERIES, MULTI).logprob == approx(want, abs=ATOL)


def test_zero_step_size_leaves_cache_unchanged(lm):
    tuner = deepthink.ForwardTuner(lm, DEMOS, TuningConfig(steps=4, step_size=0.0))
    first = tuner.step()
    for ctx in tuner:
        assert_close_lists(ctx.keys, first.keys, atol=0)
        assert_close_lists(ctx.values, first.values, atol=0)
    assert tuner.step_count == 4


def test_momentum_zero_is_gate_form(lm):
    eta = 0.3
    tuner = deepthink.ForwardTuner(lm, DEMOS, TuningConfig(steps=4, step_size=eta, momentum=0.0))
    prev = tuner.step()
    for _ in range(3):
        new_k, new_v = tuner._encode(prev.prefix)  # K_t, V_t from the current cache
        ctx = tuner.step()
        assert_close_lists(ctx.keys, [eta * n + (1 - eta) * k for n, k in zip(new_k, prev.keys)])
        assert_close_lists(ctx.values, [eta * n + (1 - eta) * v for n, v in zip(new_v, prev.values)])
        prev = ctx


def test_fast_equals_naive(lm):
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.1))
    for choices in (CHOICES, MULTI):
        fast = ctx.score(QUERIES, choices, batch_size=2)
        naive = ctx.score(QUERIES, choices, method="naive")
        assert fast.logprob == approx(naive.logprob, abs=ATOL)
        assert fast.n_tokens == naive.n_tokens


@pytest.mark.parametrize("positions", ["shifted", "aligned"])
def test_matches_independent_implementation(lm, positions):
    if positions == "aligned" and lm.config.model_type == "bloom":
        with pytest.raises(ValueError, match="aligned"):
            deepthink.ForwardTuner(lm, DEMOS, TuningConfig(steps=5, positions="aligned"))
        return
    cfg = TuningConfig(steps=5, step_size=0.2, momentum=0.9, positions=positions)
    ctx = deepthink.tune(lm, DEMOS, cfg)
    K, V = reference_tune(lm, DEMOS, 5, 0.2, 0.9, positions)
    assert_close_lists(ctx.keys, K)
    assert_close_lists(ctx.values, V)
    assert any(not torch.allclose(a, b) for a, b in zip(ctx.keys, deepthink.tune(lm, DEMOS, TuningConfig(steps=1)).keys))


def test_positions_modes_differ():
    lm = tiny_lm("llama")
    a = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.2))
    b = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.2, positions="aligned"))
    assert not torch.allclose(a.keys[1], b.keys[1])


@pytest.mark.parametrize("update", ["k", "v"])
def test_update_only_keys_or_values(update):
    lm = tiny_lm("qwen2")
    icl = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.2, update=update))
    same, changed = (ctx.values, ctx.keys) if update == "k" else (ctx.keys, ctx.values)
    ref_same, ref_changed = (icl.values, icl.keys) if update == "k" else (icl.keys, icl.values)
    assert_close_lists(same, ref_same, atol=0)
    assert not torch.allclose(changed[1], ref_changed[1])
    # after one update the touched half equals the full kv update's (later steps diverge: the other half differs)
    two = deepthink.tune(lm, DEMOS, TuningConfig(steps=2, step_size=0.2, update=update))
    K, V = reference_tune(lm, DEMOS, 2, 0.2, 0.9, "shifted")
    assert_close_lists(two.keys if update == "k" else two.values, K if update == "k" else V)


def test_stepwise_equals_tune_and_reset_clears_state():
    lm = tiny_lm("gpt2")
    cfg = TuningConfig(steps=4, step_size=0.2)
    tuner = deepthink.ForwardTuner(lm, DEMOS, cfg)
    contexts = list(tuner)
    assert [c.steps_done for c in contexts] == [1, 2, 3, 4]
    assert_close_lists(contexts[-1].keys, deepthink.tune(lm, DEMOS, cfg).keys, atol=0)
    # an earlier snapshot is not modified by later steps
    assert_close_lists(contexts[0].keys, deepthink.tune(lm, DEMOS, TuningConfig(steps=1)).keys, atol=0)
    tuner.reset()
    assert (tuner.step_count, tuner.keys, tuner._mk, tuner.history) == (0, [], None, [])
    with pytest.raises(RuntimeError):
        tuner.context()
    again = list(tuner)
    assert_close_lists(again[-1].keys, contexts[-1].keys, atol=0)


def test_history_records_update_norms():
    lm = tiny_lm("llama")
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.2))
    assert [h["step"] for h in ctx.history] == [1, 2, 3]
    assert all(len(h["dk"]) == len(h["dv"]) == 2 for h in ctx.history)
    k1 = deepthink.tune(lm, DEMOS, TuningConfig(steps=2, step_size=0.2)).keys
    first = deepthink.tune(lm, DEMOS, TuningConfig(steps=1)).keys
    assert ctx.history[1]["dk"][1] == pytest.approx(float((k1[1] - first[1]).norm()), rel=1e-5)
    assert ctx.history[2]["dk"][1] > 0 and ctx.history[2]["dv"][1] > 0
    assert ctx.history[2]["dk"][0] > 0  # rotary keys of layer 0 move with position; its values depend on the token only


def test_sliding_window_too_short_is_a_clear_error():
    lm = tiny_lm("gemma3", sliding_window=16)
    with pytest.raises(ValueError, match="sliding-window"):
        deepthink.ForwardTuner(lm, DEMOS, TuningConfig(steps=2))
    # step 1 alone is plain ICL, which the model's own window handles
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    want = plain_icl_scores(lm, DEMOS, QUERIES, MULTI)
    assert ctx.score(QUERIES, MULTI).logprob == approx(want, abs=ATOL)
    assert ctx.score(QUERIES, MULTI, method="naive").logprob == approx(want, abs=ATOL)


def test_sliding_window_longer_than_demos_but_shorter_than_prefix_plus_query():
    lm = tiny_lm("mistral", sliding_window=60)   # demos ~53 tokens: tuning allowed, queries cross the window
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.2))
    fast, naive = ctx.score(QUERIES, MULTI), ctx.score(QUERIES, MULTI, method="naive")
    assert fast.logprob == approx(naive.logprob, abs=ATOL)
    icl = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    assert icl.score(QUERIES, MULTI).logprob == approx(plain_icl_scores(lm, DEMOS, QUERIES, MULTI), abs=ATOL)


def test_too_long_demonstrations_are_a_clear_error():
    lm = tiny_lm("gpt2")   # 256 absolute positions
    long_demos = DEMOS * 4  # ~210 tokens: fits once, not twice
    deepthink.tune(lm, long_demos, TuningConfig(steps=1))
    with pytest.raises(ValueError, match="positions"):
        deepthink.ForwardTuner(lm, long_demos, TuningConfig(steps=2))
    deepthink.tune(lm, long_demos, TuningConfig(steps=2, positions="aligned"))


def test_divergence_stops_at_last_finite_state():
    lm = tiny_lm("llama")
    tuner = deepthink.ForwardTuner(lm, DEMOS, TuningConfig(steps=6, step_size=1e38, momentum=0.0))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        contexts = list(tuner)
    last = contexts[-1]
    assert last.stopped and "non-finite" in last.stopped
    assert all(torch.isfinite(t).all() for t in last.keys + last.values)
    assert last.steps_done < 6
    assert all(math.isfinite(x) for row in last.score(QUERIES, CHOICES).logprob for x in row)


@pytest.mark.parametrize("kwargs, field", [
    ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": True}, "steps"),
    ({"step_size": -0.1}, "step_size"), ({"step_size": float("nan")}, "step_size"),
    ({"momentum": 1.0}, "momentum"), ({"momentum": -0.5}, "momentum"), ({"momentum": "0.9"}, "momentum"),
    ({"positions": "left"}, "positions"), ({"update": "q"}, "update"),
])
def test_bad_config_is_rejected(kwargs, field):
    with pytest.raises(ValueError, match=f"TuningConfig.{field}"):
        TuningConfig(**kwargs)


def test_config_round_trip_and_unknown_keys():
    cfg = TuningConfig(steps=5, momentum=0.0)
    assert TuningConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown tuning option"):
        TuningConfig.from_dict({"steps": 3, "lr": 0.1})


def test_empty_demonstrations_rejected():
    with pytest.raises(ValueError, match="demonstrations are empty"):
        deepthink.tune(tiny_lm("gpt2"), "   ")
