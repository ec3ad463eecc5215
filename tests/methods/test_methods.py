"""The method contract and registry: built-in methods, shared work, user methods from a file."""
import json
import textwrap

import pytest

import deepthink
from deepthink import TuningConfig
from deepthink.cli import main
from deepthink.methods import (DEFAULT_METHODS, METHODS, Prepared, Setup, Workspace, get_method, make_method)
from deepthink.tasks import Example
from conftest import CHOICES, DEMOS, QUERIES, tiny_lm

DEV = [Example(query=q, continuations=tuple(CHOICES), label=i % 2, split="train", index=i)
       for i, q in enumerate(QUERIES)]


def test_default_methods_are_the_baselines_the_bar_the_paper_and_the_recommended_method():
    assert list(DEFAULT_METHODS) == ["zero_shot", "icl", "icl_cc", "dt_fixed", "dt_dev", "grad_kv"]
    assert set(DEFAULT_METHODS) <= set(METHODS)


def test_unknown_method_and_option_are_clear_errors():
    with pytest.raises(ValueError, match="unknown method 'nope'; valid: zero_shot, icl, dt_fixed, dt_dev"):
        get_method("nope")
    with pytest.raises(ValueError, match="method 'icl' has no option"):
        make_method("icl", {"steps": 2})
    with pytest.raises(ValueError, match="method 'dt_dev'.*momentum"):
        make_method("dt_dev", {"momentum": 1.5})
    with pytest.raises(ValueError, match="selection"):
        make_method("dt_dev", {"selection": "eval-acc"})


def test_builtin_methods_equal_the_engine():
    lm = tiny_lm("llama")
    setup = Setup(lm, DEMOS, DEV)
    icl = make_method("icl").prepare(setup).scorer
    assert icl.score(QUERIES, CHOICES).logprob == deepthink.tune(lm, DEMOS, TuningConfig(steps=1)).score(
        QUERIES, CHOICES).logprob
    fixed = make_method("dt_fixed", {"steps": 3}).prepare(setup)
    ref = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, momentum=0.0))
    assert fixed.scorer.score(QUERIES, CHOICES).logprob == ref.score(QUERIES, CHOICES).logprob
    assert fixed.info["steps"] == 3 and len(fixed.info["norms"]) == 3
    zs = make_method("zero_shot").prepare(setup).scorer
    assert zs.score(QUERIES, CHOICES).logprob == deepthink.zero_shot(lm).score(QUERIES, CHOICES).logprob


def test_dt_dev_chooses_on_dev_with_ties_to_the_smaller_T():
    lm = tiny_lm("llama")
    setup = Setup(lm, DEMOS, DEV)
    p = make_method("dt_dev", {"steps": 4, "step_size": 0.3}).prepare(setup)
    accs = [c["sum"] for c in p.info["dev_curve"]]
    assert len(accs) == 4 and p.info["chosen_steps"] == accs.index(max(accs)) + 1
    assert p.scorer is p.curve[p.info["chosen_steps"] - 1]
    no_dev = make_method("dt_dev", {"steps": 2}).prepare(Setup(lm, DEMOS))
    assert no_dev.info["chosen_steps"] == 2 and no_dev.info["dev_curve"] == []


def test_workspace_computes_shared_work_once(monkeypatch):
    """ICL is step 1 of every tuning run (one object); a run is extended, not redone, for a larger T; equal
    (scorer, items) pairs are scored once."""
    from deepthink.methods import base

    lm = tiny_lm("gpt2")
    made = []
    real = base.ForwardTuner

    def counting(*a, **k):
        made.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(base, "ForwardTuner", counting)
    ws = Workspace(lm, DEMOS)
    three = ws.contexts(TuningConfig(steps=3))
    five = ws.contexts(TuningConfig(steps=5))
    assert len(made) == 1 and five[:3] == three and ws.icl() is three[0]
    other = ws.contexts(TuningConfig(steps=2, momentum=0.0))
    assert len(made) == 2 and other[0] is three[0]
    s1 = ws.score(three[0], DEV)
    assert ws.score(three[0], DEV) is s1 and ws.score(other[0], DEV) is s1


TOY = '''
from deepthink.methods import Method, Prepared, register_method
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToyConfig:
    repeat: int = field(default=2, metadata={"help": "how many times the demonstrations are repeated"})


@register_method
class Toy(Method):
    """ICL with the demonstrations repeated (a toy method from a plugin file)."""
    name, label = "toy_repeat", "toy repeat"
    Config = ToyConfig

    def prepare(self, setup):
        import deepthink
        ctx = deepthink.tune(setup.lm, setup.demonstrations * self.config.repeat, deepthink.TuningConfig(steps=1))
        return Prepared(ctx, info={"repeat": self.config.repeat, "dev_items_seen": len(setup.dev)})
'''


def test_a_method_from_a_python_file_runs_through_deepthink_eval(tiny_model_dir, tmp_path, capsys):
    plugin = tmp_path / "toy_method.py"
    plugin.write_text(textwrap.dedent(TOY))
    out = tmp_path / "run"
    try:
        assert main(["eval", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--seeds", "0",
                     "--dev-size", "4", "--max-eval", "5", "--quiet", "--plugin", str(plugin),
                     "--methods", "icl", "toy_repeat", "-o", "toy_repeat.repeat=3", "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "toy repeat" in printed
        unit = json.loads(next((out / "units").glob("*.json")).read_text())
        assert set(unit["accuracy"]) == {"icl", "toy_repeat"}
        assert unit["methods"]["toy_repeat"] == {"repeat": 3, "dev_items_seen": 4}
        assert unit["config"]["methods"]["toy_repeat"] == {"repeat": 3}
        rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 5 and all(len(r["toy_repeat"]["logprob"]) == 2 for r in rows)
        assert main(["methods", "--plugin", str(plugin)]) == 0
        assert "toy_repeat" in capsys.readouterr().out
    finally:
        METHODS.pop("toy_repeat", None)


@pytest.mark.parametrize("argv, match", [
    (["--methods", "icl", "nope"], "unknown method 'nope'; valid"),
    (["--methods", "icl", "-o", "dt_dev.steps=3"], "not among --methods"),
    (["-o", "dt_dev.steps"], "METHOD.OPTION=VALUE"),
    (["-o", "dt_dev.stepz=3"], "no option"),
    (["--plugin", "/nonexistent/x.py"], "not a Python file"),
])
def test_bad_method_arguments(tiny_model_dir, tmp_path, capsys, argv, match):
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "sst2", "--out", str(tmp_path), "--quiet",
                 *argv]) == 2
    assert match in capsys.readouterr().err


def test_method_config_file_and_option_precedence(tmp_path):
    import argparse

    from deepthink.cli.evaluate import method_options

    f = tmp_path / "m.yaml"
    f.write_text("dt_dev: {steps: 4, momentum: 0.5}\ndt_fixed: {steps: 2}\n")
    args = argparse.Namespace(plugin=[], methods=["icl", "dt_fixed", "dt_dev"], method_config=str(f), steps=None,
                              momentum=0.7, fixed_steps=None, fixed_momentum=None, step_size=0.02, positions=None,
                              update=None, option=["dt_dev.steps=6"])
    opts = method_options(args)
    assert opts == {"icl": {}, "dt_fixed": {"steps": 2, "step_size": 0.02},
                    "dt_dev": {"steps": 6, "momentum": 0.7, "step_size": 0.02}}
    assert isinstance(opts["dt_dev"]["steps"], int)


def test_variants_of_one_method_run_side_by_side(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--seeds", "0",
                 "--dev-size", "3", "--max-eval", "4", "--quiet", "--methods", "icl", "dt_fixed", "dt_fixed@gate9",
                 "-o", "dt_fixed@gate9.momentum=0.9", "-o", "dt_fixed@gate9.steps=2", "--out", str(out)]) == 0
    assert "DT fixed-T @gate9" in capsys.readouterr().out
    unit = json.loads(next((out / "units").glob("*.json")).read_text())
    assert unit["config"]["methods"]["dt_fixed@gate9"]["momentum"] == 0.9
    assert unit["config"]["methods"]["dt_fixed"]["momentum"] == 0.0
    assert unit["methods"]["dt_fixed@gate9"]["steps"] == 2 and set(unit["accuracy"]) == {"icl", "dt_fixed",
                                                                                         "dt_fixed@gate9"}
