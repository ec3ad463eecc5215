"""Contextual calibration (NAME_cc): what it subtracts, when it changes nothing, and where it is refused."""
import pytest

import deepthink
from deepthink import TuningConfig
from deepthink.methods import METHODS, NotApplicable, Setup, make_method
from deepthink.methods.calibration import CalibratedScorer, calibrated, content_free_queries
from deepthink.scoring import Scores
from deepthink.tasks import Example, get_task
from conftest import CHOICES, QUERIES, approx, tiny_lm

SST2 = get_task("sst2")
DEV = [Example(query=q, continuations=tuple(CHOICES), label=i % 2, split="train", index=i)
       for i, q in enumerate(QUERIES)]
DEMO_ITEMS = [Example("Review: a gorgeous, witty, seductive movie.\nSentiment:", tuple(CHOICES), 1, 10, "train"),
              Example("Review: the plot is nothing but boilerplate clichés.\nSentiment:", tuple(CHOICES), 0, 11,
                      "train")]
DEMOS = "".join(e.demo_text + "\n\n" for e in DEMO_ITEMS)


class Stub:
    """A scorer with fixed scores: content-free queries get `free`, others `rows[query]`; n tokens per choice."""

    def __init__(self, rows, free, n):
        self.rows, self.free, self.n = rows, free, n

    def score(self, queries, choices, batch_size=16):
        lp = [list(self.free[q]) if q in self.free else list(self.rows[q]) for q in queries]
        return Scores(lp, [list(self.n) for _ in queries])


def test_content_free_queries_fill_the_query_template():
    assert content_free_queries(SST2, ["N/A", "", "[MASK]"]) == [
        "Review: N/A\nSentiment:", "Review: \nSentiment:", "Review: [MASK]\nSentiment:"]


def test_equal_content_free_scores_change_nothing():
    """A context whose choices score equally on every content-free input: each query's scores move by one
    constant, so both decisions (summed and per-token) are unchanged, in both modes."""
    free_q = content_free_queries(SST2, ["N/A", "", "[MASK]"])
    free = {q: [-3.0 - i, -3.0 - i] for i, q in enumerate(free_q)}
    rows = {"a": [-1.0, -2.0], "b": [-5.0, -4.5], "c": [-2.0, -2.0]}
    stub = Stub(rows, free, n=[2, 2])
    raw = stub.score(list(rows), [CHOICES] * 3)
    for mode in ("sum", "norm"):
        cal = CalibratedScorer(stub, free_q, mode).score(list(rows), CHOICES)
        assert cal.predictions() == raw.predictions() and cal.predictions(True) == raw.predictions(True)
        assert all(c - r == pytest.approx(4.0) for cr, rr in zip(cal.logprob, raw.logprob) for c, r in zip(cr, rr))
        assert cal.n_tokens == raw.n_tokens


def test_sum_and_norm_subtract_what_they_say():
    free_q = ["f1", "f2"]
    stub = Stub({"a": [-6.0, -3.0]}, {"f1": [-4.0, -1.0], "f2": [-2.0, -3.0]}, n=[2, 1])
    s = CalibratedScorer(stub, free_q, "sum").score(["a"], ["x", "y"])
    assert s.logprob == [[-6.0 + 3.0, -3.0 + 2.0]] and s.normalized == [[-1.5, -1.0]]
    # equal token counts for query and content-free inputs: per-token calibration is the same scores
    n = CalibratedScorer(stub, free_q, "norm").score(["a"], ["x", "y"])
    assert n.logprob == s.logprob and n.normalized == s.normalized


def test_norm_differs_from_sum_only_when_token_counts_differ():
    class Uneven(Stub):     # the query's choices tokenise to other counts than after the content-free inputs
        def score(self, queries, choices, batch_size=16):
            s = super().score(queries, choices)
            return Scores(s.logprob, [[4, 1] if q == "a" else [2, 1] for q in queries])

    stub = Uneven({"a": [-8.0, -3.0]}, {"f": [-4.0, -1.0]}, n=[2, 1])
    s = CalibratedScorer(stub, ["f"], "sum").score(["a"], ["x", "y"])
    n = CalibratedScorer(stub, ["f"], "norm").score(["a"], ["x", "y"])
    assert s.logprob == [[-4.0, -2.0]]                       # s - b
    assert n.normalized == [[-8.0 / 4 + 2.0, -3.0 + 1.0]]    # s / n - b / n_cf
    assert n.logprob == [[4 * (-8.0 / 4 + 2.0), -2.0]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_calibrated_icl_is_icl_minus_the_mean_content_free_scores(arch):
    lm = tiny_lm(arch)
    setup = Setup(lm, DEMOS, DEV, task=SST2, demos=DEMO_ITEMS)
    p = make_method("icl_cc").prepare(setup)
    icl = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    raw = icl.score(QUERIES, CHOICES)
    free = icl.score(content_free_queries(SST2, ["N/A", "", "[MASK]"]), CHOICES)
    b = [sum(r[j] for r in free.logprob) / 3 for j in range(2)]
    cal = p.scorer.score(QUERIES, CHOICES)
    assert cal.logprob == approx([[x - bj for x, bj in zip(row, b)] for row in raw.logprob], abs=1e-6)
    assert p.info["calibration"]["baseline_sum"] == pytest.approx(b, abs=1e-6)
    assert p.info["calibration"]["choices"] == CHOICES
    # the workspace's path (reusing ICL's own scores of the items) gives the same scores
    ws = setup.workspace.score(p.scorer, DEV)
    assert ws.logprob == approx(cal.logprob, abs=1e-9)
    # per-token mode: equal token counts here, so the same scores
    n = make_method("icl_cc", {"scores": "norm"}).prepare(setup).scorer.score(QUERIES, CHOICES)
    assert n.logprob == approx(cal.logprob, abs=1e-5)


def test_every_builtin_method_has_a_calibrated_variant_with_its_options():
    for name in ("zero_shot", "icl", "dt_fixed", "dt_dev", "icl_repeat", "dt_ensemble"):
        cc = METHODS[f"{name}_cc"]
        assert issubclass(cc, METHODS[name])
        base_opts = set(make_method(name).options())
        assert set(make_method(f"{name}_cc").options()) == base_opts | {"content_free", "scores"}
    assert make_method("dt_fixed_cc", {"steps": 3}).options()["steps"] == 3


def test_dt_dev_cc_chooses_T_on_calibrated_dev_accuracy():
    lm = tiny_lm("llama")
    setup = Setup(lm, DEMOS, DEV, task=SST2, demos=DEMO_ITEMS)
    m = make_method("dt_dev_cc", {"steps": 3, "step_size": 0.3})
    p = m.prepare(setup)
    ctxs = setup.contexts(TuningConfig(steps=3, step_size=0.3))
    free_q = content_free_queries(SST2, ["N/A", "", "[MASK]"])
    expected = []
    for c in ctxs:
        raw, free = c.score([e.query for e in DEV], CHOICES), c.score(free_q, CHOICES)
        b = [sum(r[j] for r in free.logprob) / 3 for j in range(2)]
        preds = [max(range(2), key=lambda j: (row[j] - b[j], -j)) for row in raw.logprob]
        expected.append(round(100 * sum(p_ == e.label for p_, e in zip(preds, DEV)) / len(DEV), 4))
    assert [c["sum"] for c in p.info["dev_curve"]] == expected
    assert p.info["chosen_steps"] == expected.index(max(expected)) + 1
    assert p.scorer.inner is ctxs[p.info["chosen_steps"] - 1]
    assert [c.inner for c in p.curve] == ctxs


def test_calibration_is_refused_where_it_is_undefined():
    lm = tiny_lm("gpt2")
    with pytest.raises(ValueError, match="needs the task"):
        make_method("icl_cc").prepare(Setup(lm, DEMOS, DEV))
    for task in ("copa", "hellaswag"):
        with pytest.raises(ValueError, match=f"task '{task}' has per-item choices"):
            make_method("icl_cc").prepare(Setup(lm, DEMOS, DEV, task=get_task(task)))
        # not a setting to fix but the task's nature: `check` says so, and an evaluation run goes on without it
        with pytest.raises(NotApplicable, match=f"task '{task}' has per-item choices"):
            make_method("icl_cc").check(Setup(lm, DEMOS, DEV, task=get_task(task)))
    make_method("icl_cc").check(Setup(lm, DEMOS, DEV, task=get_task("sst2")))
    with pytest.raises(ValueError, match="scores='mean'.*sum, norm"):
        make_method("icl_cc", {"scores": "mean"})
    with pytest.raises(ValueError, match="content_free"):
        make_method("icl_cc", {"content_free": 3})
    with pytest.raises(ValueError, match="method 'dt_fixed_cc'.*momentum"):
        make_method("dt_fixed_cc", {"momentum": 2.0})


def test_a_plugin_method_can_be_calibrated():
    from dataclasses import dataclass, field

    from deepthink.methods import Method, Prepared, register_method

    @dataclass(frozen=True)
    class Opts:
        steps: int = field(default=2, metadata={"help": "T"})

    @register_method
    class Mine(Method):
        name, label, Config = "test_mine", "mine", Opts

        def prepare(self, setup):
            return Prepared(setup.contexts(TuningConfig(steps=self.config.steps))[-1], info={"x": 1})

    try:
        cls = calibrated(Mine)
        assert cls.name == "test_mine_cc" and METHODS["test_mine_cc"] is cls
        setup = Setup(tiny_lm("qwen2"), DEMOS, DEV, task=SST2)
        p = make_method("test_mine_cc", {"steps": 2, "content_free": "N/A"}).prepare(setup)
        assert p.info["x"] == 1 and p.info["calibration"]["content_free"] == ["N/A"]
        assert isinstance(p.scorer, CalibratedScorer)
    finally:
        METHODS.pop("test_mine", None)
        METHODS.pop("test_mine_cc", None)


def test_workspace_scores_parts_once():
    lm = tiny_lm("gpt2")
    setup = Setup(lm, DEMOS, DEV, task=SST2)
    icl = setup.icl()
    raw = setup.workspace.score(icl, DEV)
    calls = []
    real = icl.score

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    icl.score = counting
    try:
        s = setup.workspace.score(make_method("icl_cc").prepare(setup).scorer, DEV)
    finally:
        del icl.score
    # the items' ICL scores were reused: only the content-free queries were scored, once
    assert calls == [content_free_queries(SST2, ["N/A", "", "[MASK]"])]
    assert len(s.logprob) == len(raw.logprob) and s.logprob != raw.logprob
