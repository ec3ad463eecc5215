"""dt_dev's selection rules: dev-acc (unchanged), dev-acc-guarded, dev-loglik and loo (no dev, no eval items)."""
import json
import math

import pytest

import deepthink
from deepthink import TuningConfig
from deepthink.cli import main
from deepthink.methods import Setup, make_method
from deepthink.methods.selection import SELECTIONS, gold_loglik, sign_test
from deepthink.scoring import Scores
from deepthink.tasks import Example, get_task
from conftest import CHOICES, QUERIES, tiny_lm

DEV = [Example(query=q, continuations=tuple(CHOICES), label=i % 2, split="train", index=i)
       for i, q in enumerate(QUERIES * 3)]
DEMO_ITEMS = [Example("Review: a gorgeous, witty, seductive movie.\nSentiment:", tuple(CHOICES), 1, 10, "train"),
              Example("Review: the plot is nothing but boilerplate clichés.\nSentiment:", tuple(CHOICES), 0, 11,
                      "train"),
              Example("Review: witty lines.\nSentiment:", tuple(CHOICES), 1, 12, "train")]
DEMOS = "".join(e.demo_text + "\n\n" for e in DEMO_ITEMS)
OPTS = {"steps": 4, "step_size": 0.3}


class Poison(list):
    """Dev items that fail the test if anything reads them."""

    def __bool__(self):
        raise AssertionError("dev items were read")

    def __iter__(self):
        raise AssertionError("dev items were read")

    def __len__(self):
        raise AssertionError("dev items were read")


def test_sign_test_is_the_exact_binomial_tail():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == pytest.approx(1 / 32)
    assert sign_test(3, 1) == pytest.approx((math.comb(4, 3) + 1) / 16)
    assert sign_test(0, 4) == 1.0


def test_gold_loglik_is_the_log_softmax_over_choices():
    s = Scores([[-1.0, -2.0], [-3.0, -3.0]], [[1, 1], [1, 1]])
    want = ((-1.0 - math.log(math.exp(-1) + math.exp(-2))) + math.log(0.5)) / 2
    assert gold_loglik(s, [0, 1]) == pytest.approx(want)


def test_dev_acc_is_unchanged():
    lm = tiny_lm("llama")
    setup = Setup(lm, DEMOS, DEV)
    p = make_method("dt_dev", OPTS).prepare(setup)
    curve = [setup.dev_accuracy(c) for c in setup.contexts(TuningConfig(**OPTS))]
    assert p.info["dev_curve"] == curve
    assert p.info["chosen_steps"] == max(range(4), key=lambda t: (curve[t]["sum"], -t)) + 1
    assert p.info["selection"] == "dev-acc" and p.info["selection_curve"] == [c["sum"] for c in curve]


def test_guarded_leaves_icl_only_on_a_significant_dev_gain():
    lm = tiny_lm("llama")
    setup = Setup(lm, DEMOS, DEV)
    plain = make_method("dt_dev", OPTS).prepare(setup)
    for level in (0.05, 0.99):
        p = make_method("dt_dev", {**OPTS, "selection": "dev-acc-guarded", "guard_level": level}).prepare(setup)
        g = p.info["guard"]
        assert g["best_steps"] == plain.info["chosen_steps"] and g["level"] == level
        assert g["p_value"] == pytest.approx(sign_test(g["wins"], g["losses"]))
        expect = g["best_steps"] if g["best_steps"] > 1 and g["p_value"] <= level else 1
        assert p.info["chosen_steps"] == expect
    # the items where the best T and T = 1 disagree are the ones counted
    ctxs = setup.contexts(TuningConfig(**OPTS))
    a = setup.score_dev(ctxs[0]).predictions()
    b = setup.score_dev(ctxs[g["best_steps"] - 1]).predictions()
    assert g["wins"] == sum(y == e.label != x for x, y, e in zip(a, b, DEV))
    assert make_method("dt_dev", {**OPTS, "selection": "dev-acc-guarded"}).prepare(Setup(lm, DEMOS)).info[
        "chosen_steps"] == 1                                                # no dev items: stay with ICL


def test_dev_loglik_picks_the_best_mean_gold_log_probability():
    lm = tiny_lm("qwen2")
    setup = Setup(lm, DEMOS, DEV)
    p = make_method("dt_dev", {**OPTS, "selection": "dev-loglik"}).prepare(setup)
    curve = [gold_loglik(setup.score_dev(c), [e.label for e in DEV]) for c in setup.contexts(TuningConfig(**OPTS))]
    assert p.info["selection_curve"] == pytest.approx(curve)
    assert p.info["chosen_steps"] == curve.index(max(curve)) + 1


def test_loo_reads_no_dev_items_and_scores_each_held_out_demonstration():
    lm = tiny_lm("llama")
    p = make_method("dt_dev", {**OPTS, "selection": "loo"}).prepare(
        Setup(lm, DEMOS, Poison(), task=get_task("sst2"), demos=DEMO_ITEMS))
    again = make_method("dt_dev", {**OPTS, "selection": "loo"}).prepare(Setup(lm, DEMOS, [], demos=DEMO_ITEMS))
    assert p.info["selection_curve"] == again.info["selection_curve"] and p.info["dev_curve"] == []
    # by hand: tune on the other two, score the held-out query, at every T
    cfg = TuningConfig(**OPTS)
    hits = [0] * 4
    for i, held in enumerate(DEMO_ITEMS):
        rest = "".join(e.demo_text + "\n\n" for j, e in enumerate(DEMO_ITEMS) if j != i)
        for t in range(4):
            ctx = deepthink.tune(lm, rest, TuningConfig(**{**cfg.to_dict(), "steps": t + 1}))
            hits[t] += ctx.score([held.query], CHOICES).predictions()[0] == held.label
    curve = [round(100 * h / 3, 4) for h in hits]
    assert p.info["selection_curve"] == curve and p.info["loo_items"] == 3
    assert p.info["chosen_steps"] == curve.index(max(curve)) + 1


def test_loo_needs_the_demonstrations_as_items():
    lm = tiny_lm("gpt2")
    m = make_method("dt_dev", {**OPTS, "selection": "loo"})
    with pytest.raises(ValueError, match="at least 2 demonstrations.*got 1"):
        m.prepare(Setup(lm, DEMO_ITEMS[0].demo_text + "\n\n", demos=DEMO_ITEMS[:1]))
    with pytest.raises(ValueError, match="spell out Setup.demonstrations"):
        m.prepare(Setup(lm, "some other text", demos=DEMO_ITEMS))


def test_bad_selection_options_are_clear_errors():
    with pytest.raises(ValueError, match="selection='eval-acc'.*dev-acc, dev-acc-guarded, dev-loglik, loo"):
        make_method("dt_dev", {"selection": "eval-acc"})
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="guard_level.*in \\(0, 1\\)"):
            make_method("dt_dev", {"guard_level": bad})
    assert set(SELECTIONS) == {"dev-acc", "dev-acc-guarded", "dev-loglik", "loo"}


def test_every_rule_and_method_runs_through_deepthink_eval(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    methods = ["icl", "dt_dev", "dt_dev@loo", "dt_dev@guarded", "dt_dev@loglik", "dt_dev_cc", "icl_repeat",
               "dt_ensemble", "dt_fixed@rot", "dt_fixed@norm", "dt_fixed@nest"]
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--seeds", "0", "--shots", "2",
                 "--dev-size", "4", "--max-eval", "4", "--quiet", "--methods", *methods,
                 *[a for m in methods if m.startswith("dt_dev") for a in ("-o", f"{m}.steps=3")],
                 "-o", "dt_dev@loo.selection=loo", "-o", "dt_dev@guarded.selection=dev-acc-guarded",
                 "-o", "dt_dev@guarded.guard_level=0.2", "-o", "dt_dev@loglik.selection=dev-loglik",
                 "-o", "dt_dev_cc.scores=norm", "-o", "icl_repeat.times=3", "-o", "dt_ensemble.steps=3",
                 "-o", "dt_fixed@rot.target=rotation", "-o", "dt_fixed@norm.rule=normalized",
                 "-o", "dt_fixed@nest.rule=nesterov", "-o", "dt_fixed@nest.momentum=0.5",
                 "--out", str(out)]) == 0
    unit = json.loads(next((out / "units").glob("*.json")).read_text())
    assert set(unit["accuracy"]) == set(methods)
    info, cfg = unit["methods"], unit["config"]["methods"]
    assert info["dt_dev@loo"]["selection"] == "loo" and info["dt_dev@loo"]["loo_items"] == 4
    assert info["dt_dev@guarded"]["guard"]["level"] == 0.2 and len(info["dt_dev@loglik"]["selection_curve"]) == 3
    assert info["dt_dev_cc"]["calibration"]["scores"] == "norm" and info["icl_repeat"]["times"] == 3
    assert cfg["dt_fixed@rot"]["target"] == "rotation" and cfg["dt_fixed@nest"]["rule"] == "nesterov"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["dt_dev@loo"]["logprob"]) == 2 for r in rows)


# ---- grad_kv's rules on constructed per-item dev outcomes (issue 31) --------------------------------------------

def _steps(*rows: str):
    """Per step a 0/1 string over the dev items -> correct[t][i]."""
    return [[int(c) for c in r] for r in rows]


def _flat_logp(correct, value=-0.5):
    return [[value] * len(c) for c in correct]


def test_item_rules_keep_step_one_when_two_dev_items_are_the_whole_gain():
    from deepthink.methods.selection import choose

    base = "1" * 30 + "0" * 34                         # 64 dev items, T = 1 gets 30 right
    correct = _steps(base, base, "1" * 32 + "0" * 32)  # T = 3 gets two more: wins 2, losses 0, p = 0.25
    logp = _flat_logp(correct)
    assert choose("dev-acc", correct, logp, 0.1)[0] == 3
    t, info = choose("dev-mcnemar", correct, logp, 0.1)
    assert t == 1 and info["passed"] == [] and info["tests"][1]["wins"] == 2 and info["tests"][1]["losses"] == 0
    assert math.isclose(info["tests"][1]["stat"], 0.25)
    assert choose("dev-bootstrap", correct, logp, 0.1)[0] == 1


def test_item_rules_leave_step_one_for_a_clear_paired_gain():
    from deepthink.methods.selection import choose

    base = "1" * 30 + "0" * 34
    gain = "1" * 40 + "0" * 24                       # wins 10, losses 0: p = 2**-10
    mixed = "0" * 5 + "1" * 45 + "0" * 14            # wins 20, losses 5: more right than `gain` (45 vs 40)
    correct = _steps(base, gain, mixed)
    logp = _flat_logp(correct)
    for rule in ("dev-mcnemar", "dev-bootstrap"):
        t, info = choose(rule, correct, logp, 0.1)
        assert t == 3 and info["passed"] == [2, 3], rule      # both pass; the more accurate wins
    # a level between the two p-values (2**-10 for 10 vs 0, ~0.002 for 20 vs 5): only T = 2 passes, and is chosen
    level = (2 ** -10 + sign_test(20, 5)) / 2
    assert 2 ** -10 < level < sign_test(20, 5)
    t, info = choose("dev-mcnemar", correct, logp, level)
    assert t == 2 and info["passed"] == [2]


def test_item_rules_break_accuracy_ties_by_log_likelihood_then_the_smaller_t():
    from deepthink.methods.selection import choose

    base = "1" * 20 + "0" * 44
    gain = "1" * 40 + "0" * 24
    correct = _steps(base, gain, gain, gain)
    logp = [[-1.0] * 64, [-0.6] * 64, [-0.4] * 64, [-0.4] * 64]
    for rule in ("dev-mcnemar", "dev-bootstrap"):
        assert choose(rule, correct, logp, 0.1)[0] == 3, rule     # same accuracy: higher log-lik; then smaller T
    assert choose("dev-acc", correct, logp, 0.1)[0] == 2          # dev-acc ignores the log-likelihood


def test_item_rules_never_leave_step_one_for_a_loss():
    from deepthink.methods.selection import choose

    correct = _steps("1" * 40 + "0" * 24, "1" * 10 + "0" * 54)
    for rule in ("dev-mcnemar", "dev-bootstrap"):
        assert choose(rule, correct, _flat_logp(correct), 0.99)[0] == 1


def test_item_rules_refuse_missing_or_ragged_outcomes_and_unknown_names():
    from deepthink.methods.selection import choose

    with pytest.raises(ValueError, match="needs dev items"):
        choose("dev-mcnemar", [], [], 0.1)
    with pytest.raises(ValueError, match="one outcome per dev item"):
        choose("dev-mcnemar", _steps("10", "1"), [[0.0, 0.0], [0.0]], 0.1)
    with pytest.raises(ValueError, match="unknown grad_kv selection rule 'dev-best'; valid: dev-acc, dev-bootstrap"):
        choose("dev-best", _steps("1"), [[0.0]], 0.1)
