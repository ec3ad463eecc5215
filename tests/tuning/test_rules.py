"""The update-rule registry: the momentum rule is the paper's update, rules are selectable and recorded."""
import pytest
import torch

import deepthink
from deepthink import TuningConfig
from deepthink.tuning import RULES, get_rule, register_rule
from deepthink.tuning.tuner import ForwardTuner
from deepthink.context_schema import UnverifiedContextWarning
from conftest import DEMOS, as_format_1, tiny_lm


def test_momentum_rule_is_the_papers_update():
    s = [torch.tensor([1.0, 2.0])]
    n1, n2 = [torch.tensor([3.0, 2.0])], [torch.tensor([0.0, 0.0])]
    cfg = TuningConfig(step_size=0.5, momentum=0.5)
    s1, m1 = RULES["momentum"].fn(s, n1, None, cfg)             # m = g = (2, 0)
    assert torch.equal(m1[0], torch.tensor([2.0, 0.0])) and torch.equal(s1[0], torch.tensor([2.0, 2.0]))
    s2, m2 = RULES["momentum"].fn(s1, n2, m1, cfg)              # g = (-2, -2), m = g + 0.5 m = (-1, -2)
    assert torch.equal(m2[0], torch.tensor([-1.0, -2.0])) and torch.equal(s2[0], torch.tensor([1.5, 1.0]))
    assert torch.equal(s[0], torch.tensor([1.0, 2.0]))          # inputs untouched


def test_unknown_rule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown update rule; valid: .*momentum"):
        TuningConfig(rule="nope")
    with pytest.raises(ValueError, match="unknown update rule 'nope'; valid: .*momentum"):
        get_rule("nope")


def test_a_registered_rule_is_used_and_recorded(tmp_path):
    calls = []

    @register_rule("test_halfway", help="move halfway to the re-encoded cache (test rule)")
    def halfway(state, new, rule_state, config):
        calls.append(len(state))
        return [s + 0.5 * (n - s) for s, n in zip(state, new)], None

    try:
        lm = tiny_lm("llama")
        ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, rule="test_halfway"))
        assert len(calls) == 4                                    # 2 updates x (keys, values)
        ref = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.5, momentum=0.0))   # the same gate
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ctx.keys, ref.keys))
        ctx.save(tmp_path / "c")
        meta = deepthink.TunedContext.read_config(tmp_path / "c")
        assert meta["tuning"]["rule"] == "test_halfway"
        assert deepthink.TunedContext.load(tmp_path / "c", lm).config.rule == "test_halfway"
        with pytest.raises(ValueError, match="already registered"):
            register_rule("test_halfway", help="")(lambda *a: None)
    finally:
        RULES.pop("test_halfway", None)


def test_artifacts_saved_before_rules_existed_still_load(tmp_path):
    """A context.json without "rule" (format of the first release) loads with the momentum rule."""
    import json

    lm = tiny_lm("gpt2")
    deepthink.tune(lm, DEMOS, TuningConfig(steps=2)).save(tmp_path / "c")
    path = tmp_path / "c" / "context.json"
    meta = as_format_1(json.loads(path.read_text()))
    del meta["tuning"]["rule"]
    path.write_text(json.dumps(meta))
    with pytest.warns(UnverifiedContextWarning):
        assert deepthink.TunedContext.load(tmp_path / "c", lm).config == TuningConfig(steps=2)


def test_tuner_uses_the_configured_rule():
    assert ForwardTuner(tiny_lm("gpt2"), DEMOS, TuningConfig()).rule is RULES["momentum"]
