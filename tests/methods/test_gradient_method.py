"""grad_kv as a method (step count chosen on dev or leave-one-out) and as `deepthink tune --method grad_kv`."""
import json
from pathlib import Path

import pytest
import deepthink
from deepthink import TunedContext
from deepthink.cli import main
from deepthink.methods import METHODS, Setup, make_method
from deepthink.tasks import Example
from conftest import CHOICES, QUERIES, approx, assert_same_json, tiny_lm

DEMO_TEST = Path(deepthink.__file__).parent / "demo_data" / "sentiment_test.jsonl"

ITEMS = [Example("Review: a gorgeous, witty, seductive movie.\nSentiment:", tuple(CHOICES), 1, 0, "train"),
         Example("Review: the plot is nothing but boilerplate clichés.\nSentiment:", tuple(CHOICES), 0, 1, "train"),
         Example("Review: witty and gorgeous\nSentiment:", tuple(CHOICES), 1, 2, "train")]
TEXT = "".join(e.demo_text + "\n\n" for e in ITEMS)
DEV = [Example(q, tuple(CHOICES), i % 2, 10 + i, "train") for i, q in enumerate(QUERIES)]


def setup(dev=DEV, demos=ITEMS):
    return Setup(tiny_lm("llama"), TEXT, dev, demos=demos)


def test_registered_with_validated_options():
    assert "grad_kv" in METHODS
    with pytest.raises(ValueError, match="method 'grad_kv'.*lr"):
        make_method("grad_kv", {"lr": -0.1})
    with pytest.raises(ValueError, match="method 'grad_kv'.*selection"):
        make_method("grad_kv", {"selection": "eval-acc"})


def test_dev_selection_picks_a_step_of_its_curve():
    s = setup()
    p = make_method("grad_kv", {"steps": 4, "lr": 0.02}).prepare(s)
    assert len(p.curve) == 4 and p.curve[0] is s.icl()
    dev = p.info["dev_curve"]
    assert len(dev) == 4 and p.info["selection_used"] == "dev-acc"
    chosen = p.info["chosen_steps"]
    assert dev[chosen - 1]["sum"] == max(c["sum"] for c in dev)
    assert all(c["sum"] < dev[chosen - 1]["sum"] for c in dev[:chosen - 1])          # ties go to the smaller T
    assert p.scorer is p.curve[chosen - 1]
    assert p.info["tuning_seconds"] > 0 and len(p.info["train_loss"]) == 4
    json.dumps(p.info)


def test_lr_zero_chooses_step_one_and_answers_like_icl():
    s = setup()
    p = make_method("grad_kv", {"steps": 3, "lr": 0.0}).prepare(s)
    assert p.info["chosen_steps"] == 1 and p.scorer is s.icl()


def test_loo_selection_uses_no_dev_items():
    s = setup(dev=())
    p = make_method("grad_kv", {"steps": 3, "lr": 0.02, "selection": "loo"}).prepare(s)
    loo = p.info["loo_curve"]
    assert p.info["dev_curve"] == [] and len(loo) == 3
    chosen = p.info["chosen_steps"]
    assert loo[chosen - 1]["acc"] == max(c["acc"] for c in loo)
    # dev-acc without dev items falls back to leave-one-out
    q = make_method("grad_kv", {"steps": 3, "lr": 0.02}).prepare(setup(dev=()))
    assert q.info["selection_used"] == "loo" and q.info["chosen_steps"] == chosen


def test_variants_of_one_run_share_it_and_get_what_they_would_alone():
    """grad_kv variants that differ only in how T is chosen tune once per workspace (the run is keyed by the
    gradient options; grad_kv_cc prepares through grad_kv, so it shares too) and answer exactly as each would
    in a workspace of its own."""
    from deepthink.tuning import gradient

    runs = []
    real = gradient.GradientTuner.__init__

    def counting(self, *a, **k):
        runs.append(1)
        real(self, *a, **k)

    opts = {"steps": 3, "lr": 0.02}
    keys = [("grad_kv", opts), ("grad_kv", {**opts, "selection": "loo"}), ("grad_kv", {**opts, "lr": 0.01})]
    s = setup()
    import unittest.mock as mock
    with mock.patch.object(gradient.GradientTuner, "__init__", counting):
        together = [make_method(k, o).prepare(s) for k, o in keys]
    assert len(runs) == 2                                       # lr 0.02 once, lr 0.01 once
    assert together[1].curve[2] is together[0].curve[2]
    for (k, o), p in zip(keys, together):
        alone = make_method(k, o).prepare(setup())
        assert p.info["chosen_steps"] == alone.info["chosen_steps"]
        assert_same_json(p.info["train_loss"], alone.info["train_loss"])     # floats within 1e-5, not bit for bit
        assert s.workspace.score(p.scorer, DEV).logprob == approx(
            alone.scorer.score(QUERIES, [list(CHOICES)] * len(QUERIES)).logprob, abs=1e-5)


def test_one_demonstration_is_plain_icl_and_says_so():
    """Leave-one-out needs a second demonstration: with one (copa at --shots 1) grad_kv is ICL, recorded as such,
    so that the default method set runs on every task; the bare tuner still refuses (tests/tuning)."""
    one = Setup(tiny_lm("llama"), ITEMS[0].demo_text + "\n\n", DEV, demos=ITEMS[:1])
    method = make_method("grad_kv", {"steps": 3})
    method.check(one)
    prepared = method.prepare(one)
    assert prepared.scorer is one.icl() and prepared.info["chosen_steps"] == 1
    assert prepared.info["selection_used"] == "none" and "nothing to leave out" in method.describe(prepared.info)


def test_needs_the_demonstrations_as_items():
    with pytest.raises(ValueError, match="grad_kv needs the demonstrations as items"):
        make_method("grad_kv", {"steps": 2}).prepare(setup(demos=()))


def test_tune_cli_saves_a_gradient_tuned_context(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ctx"
    argv = ["tune", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--seed", "0", "--shots", "2",
            "--method", "grad_kv", "--steps", "3", "--lr", "0.01", "--update", "v", "--checkpointing",
            "--micro-batch", "1", "--selection", "last", "--out", str(out)]
    assert main(argv) == 0
    meta = json.loads((out / "context.json").read_text())
    assert meta["tuning"] is None and meta["steps_done"] == 3
    assert meta["method"]["name"] == "grad_kv"
    assert meta["method"]["selection"] == {"rule": "last", "chosen_steps": 3}
    opts = meta["method"]["options"]
    assert (opts["lr"], opts["update"], opts["checkpointing"], opts["steps"], opts["micro_batch"]) == \
        (0.01, "v", True, 3, 1)
    capsys.readouterr()
    assert main(["predict", "--context", str(out), "--task", "sentiment-demo", "--input", str(DEMO_TEST)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ctx = TunedContext.load(out, tiny_lm("llama"))
    assert ctx.method == meta["method"]
    api = ctx.predict([r["query"] for r in rows], [" negative", " positive"])
    assert [r["logprob"] for r in rows] == approx([a["logprob"] for a in api], abs=1e-5)


def test_tune_cli_default_is_the_recommended_method_and_chooses_t_like_eval(tiny_model_dir, tmp_path, capsys):
    """Without --method, tune runs grad_kv at lr 0.01 and keeps the T with the best accuracy on dev items drawn
    as `deepthink eval` draws them (disjoint from the demonstrations): the same T and the same cache."""
    from deepthink.evaluation import EvalConfig, run_unit

    argv = ["tune", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--seed", "1", "--shots", "2",
            "--steps", "4", "--dev-size", "6", "--out", str(tmp_path / "c")]
    assert main(argv) == 0
    said = capsys.readouterr().out
    meta = json.loads((tmp_path / "c" / "context.json").read_text())
    sel = meta["method"]["selection"]
    assert meta["method"]["name"] == "grad_kv" and meta["method"]["options"]["lr"] == 0.01
    assert sel["rule"] == "dev-acc" and sel["dev_items"] == 6 and len(sel["accuracy_curve"]) == 4
    assert meta["steps_done"] == sel["chosen_steps"] and f"T chosen on 6 dev items" in said
    lm = deepthink.load_model(str(tiny_model_dir))
    cfg = EvalConfig(shots=2, dev_size=6, max_eval=4, methods={"grad_kv": {"steps": 4}})
    unit, _ = run_unit(lm, "sentiment-demo", 1, cfg, progress=False)
    info = unit["methods"]["grad_kv"]
    assert sel["chosen_steps"] == info["chosen_steps"]
    assert sel["accuracy_curve"] == approx([c["sum"] for c in info["dev_curve"]], abs=1e-3)
    assert not set(unit["dev_indices"]) & {d["index"] for d in unit["demonstrations"]["items"]}
    assert meta["demonstrations"] == unit["demonstrations"]["text"]
    # no dev items: leave-one-out, said so
    assert main([*argv[:-2], "--dev-size", "0", "--out", str(tmp_path / "d")]) == 0
    assert "leave-one-out over the demonstrations, no dev items" in capsys.readouterr().out
    assert json.loads((tmp_path / "d" / "context.json").read_text())["method"]["selection"]["rule"] == "loo"


def test_tune_cli_refuses_mixed_options(tiny_model_dir, tmp_path, capsys):
    base = ["tune", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--out", str(tmp_path / "x")]
    for extra, flag in ((["--lr", "0.02"], "--lr"), (["--selection", "loo"], "--selection"),
                        (["--dev-size", "8"], "--dev-size"), (["--grad-seed", "1"], "--grad-seed")):
        assert main([*base, "--method", "forward", *extra]) == 2
        assert f"{flag} set(s) gradient KV tuning, not --method forward: drop it" in capsys.readouterr().err
    assert main([*base, "--step-size", "0.1"]) == 2
    assert "--step-size set(s) forward tuning, which is not the default method: add --method forward" \
        in capsys.readouterr().err
    assert main([*base, "--dev-size", "-1"]) == 2
    assert "--dev-size must be an integer >= 0" in capsys.readouterr().err
    demos = tmp_path / "demos.txt"
    demos.write_text(TEXT)
    for method in ([], ["--method", "grad_kv"]):
        assert main(["tune", "--model", str(tiny_model_dir), "--demos", str(demos), *method,
                     "--out", str(tmp_path / "y")]) == 2
        err = capsys.readouterr().err
        assert "needs each demonstration's query and answer" in err and "--method forward" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_guarded_selection_keeps_per_item_dev_outcomes_that_replay_its_choice():
    """Issue 31: grad_kv stores per step each dev item's outcome and gold log-probability, and the rule read back
    from them chooses the same T (what benchmarks/selection.py replays); dev-acc's choice is unchanged by it."""
    from deepthink.methods.selection import choose

    s = setup()
    acc = make_method("grad_kv", {"steps": 4, "lr": 0.02}).prepare(s)
    for rule in ("dev-mcnemar", "dev-bootstrap"):
        p = make_method("grad_kv", {"steps": 4, "lr": 0.02, "selection": rule, "level": 0.2}).prepare(s)
        items = p.info["dev_items"]
        assert len(items["correct"]) == 4 and all(len(c) == len(DEV) for c in items["correct"])
        correct = [[int(c) for c in row] for row in items["correct"]]
        assert [100 * sum(c) / len(DEV) for c in correct] == approx([c["sum"] for c in p.info["dev_curve"]])
        assert choose(rule, correct, items["gold_logp"], 0.2)[0] == p.info["chosen_steps"]
        assert p.scorer is p.curve[p.info["chosen_steps"] - 1] and p.info["selection_used"] == rule
        json.dumps(p.info)
    items = acc.info["dev_items"]
    assert acc.info["chosen_steps"] == choose("dev-acc", [[int(c) for c in r] for r in items["correct"]],
                                              items["gold_logp"], 0.1)[0]


def test_guarded_selection_without_dev_items_is_plain_icl():
    s = setup(dev=())
    p = make_method("grad_kv", {"steps": 3, "lr": 0.02, "selection": "dev-mcnemar"}).prepare(s)
    assert p.info["chosen_steps"] == 1 and p.scorer is s.icl() and p.info["selection_used"] == "none"
    assert "without dev items" in p.info["note"]


def test_level_is_validated():
    with pytest.raises(ValueError, match="level"):
        make_method("grad_kv", {"selection": "dev-mcnemar", "level": 1.5})
