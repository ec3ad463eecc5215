"""The normalized and nesterov update rules: the properties that define them, and their use by the tuner."""
import pytest
import torch

import deepthink
from deepthink import TuningConfig
from deepthink.tuning import RULES
from conftest import DEMOS, tiny_lm


def layers(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


SHAPES = [(1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 5, 4)]


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_normalized_steps_have_the_stated_norm_in_every_layer(beta):
    """||dK~_l|| = eta ||K~_l|| whatever the scale of g, at every update (momentum changes only the direction)."""
    cfg = TuningConfig(step_size=0.05, momentum=beta, rule="normalized")
    state, buf = [s * (10.0 ** i) for i, s in enumerate(layers(*SHAPES))], None   # layers of very different scale
    for step in range(3):
        new = [s + 1e-3 * (step + 1) * n for s, n in zip(state, layers(*SHAPES, seed=step + 1))]
        out, buf = RULES["normalized"].fn(state, new, buf, cfg)
        for s, o in zip(state, out):
            assert float((o - s).norm()) == pytest.approx(0.05 * float(s.norm()), rel=1e-4)
        state = out


def test_normalized_follows_the_momentum_direction_and_guards_a_zero_buffer():
    cfg = TuningConfig(step_size=0.1, momentum=0.5, rule="normalized")
    state = layers(*SHAPES)
    new = [s + d for s, d in zip(state, layers(*SHAPES, seed=7))]
    new[1] = state[1].clone()                                    # layer 1: g = 0, m = 0 -> no move
    out, buf = RULES["normalized"].fn(state, new, None, cfg)
    assert torch.equal(out[1], state[1]) and float(buf[1].norm()) == 0.0
    _, mom = RULES["momentum"].fn(state, new, None, cfg)          # the same buffer as the momentum rule
    assert all(torch.equal(a, b) for a, b in zip(buf, mom))
    d = out[0] - state[0]
    cos = float((d * buf[0]).sum() / (d.norm() * buf[0].norm()))
    assert cos == pytest.approx(1.0, abs=1e-5)                   # moves along m
    assert all(torch.equal(a, b) for a, b in zip(state, layers(*SHAPES)))   # inputs untouched


def test_nesterov_formula_and_beta_zero_is_momentum():
    s = [torch.tensor([1.0, 2.0])]
    n1, n2 = [torch.tensor([3.0, 2.0])], [torch.tensor([0.0, 0.0])]
    cfg = TuningConfig(step_size=0.5, momentum=0.5, rule="nesterov")
    s1, m1 = RULES["nesterov"].fn(s, n1, None, cfg)     # g = (2, 0), m = g; K~ += 0.5 (g + 0.5 m) = (1.5, 0)
    assert torch.equal(m1[0], torch.tensor([2.0, 0.0])) and torch.equal(s1[0], torch.tensor([2.5, 2.0]))
    s2, m2 = RULES["nesterov"].fn(s1, n2, m1, cfg)      # g = (-2.5, -2), m = g + 0.5 m = (-1.5, -2)
    assert torch.equal(m2[0], torch.tensor([-1.5, -2.0]))
    assert torch.allclose(s2[0], s1[0] + 0.5 * (torch.tensor([-2.5, -2.0]) + 0.5 * m2[0]))
    lm = tiny_lm("qwen2")
    a = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.2, momentum=0.0, rule="nesterov"))
    b = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.2, momentum=0.0))
    assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))
    c = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.2, momentum=0.9, rule="nesterov"))
    d = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.2, momentum=0.9))
    assert not all(torch.equal(x, y) for x, y in zip(c.keys, d.keys))


@pytest.mark.parametrize("rule", ["normalized", "nesterov"])
def test_rules_run_in_the_tuner_with_zero_step_size_as_icl_and_are_saved(rule, tmp_path):
    lm = tiny_lm("llama")
    icl = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    still = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.0, rule=rule))
    assert all(torch.equal(x, y) for x, y in zip(icl.keys + icl.values, still.keys + still.values))
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.05, rule=rule, update="k"))
    assert all(torch.equal(x, y) for x, y in zip(icl.values, ctx.values))      # keys-only update
    assert not all(torch.equal(x, y) for x, y in zip(icl.keys, ctx.keys))
    if rule == "normalized":   # the recorded per-layer step norms are eta ||K~||
        k2 = deepthink.tune(lm, DEMOS, TuningConfig(steps=2, step_size=0.05, rule=rule, update="k"))
        assert k2.history[1]["dk"] == pytest.approx([0.05 * float(k.double().norm()) for k in icl.keys], rel=1e-4)
    ctx.save(tmp_path / "c")
    assert deepthink.TunedContext.load(tmp_path / "c", lm).config.rule == rule
