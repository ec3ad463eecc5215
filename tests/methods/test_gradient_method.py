"""grad_kv as a method (step count chosen on dev or leave-one-out) and as `deepthink tune --method grad_kv`."""
import json
from pathlib import Path

import pytest
import deepthink
from deepthink import TunedContext
from deepthink.cli import main
from deepthink.methods import METHODS, Setup, make_method
from deepthink.tasks import Example
from conftest import CHOICES, QUERIES, approx, tiny_lm

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
        assert p.info["train_loss"] == alone.info["train_loss"]
        assert s.workspace.score(p.scorer, DEV).logprob == approx(
            alone.scorer.score(QUERIES, [list(CHOICES)] * len(QUERIES)).logprob, abs=1e-5)


def test_needs_the_demonstrations_as_items():
    with pytest.raises(ValueError, match="grad_kv needs the demonstrations as items"):
        make_method("grad_kv", {"steps": 2}).prepare(setup(demos=()))


def test_tune_cli_saves_a_gradient_tuned_context(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ctx"
    argv = ["tune", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--seed", "0", "--shots", "2",
            "--method", "grad_kv", "--steps", "3", "--lr", "0.01", "--update", "v", "--checkpointing",
            "--out", str(out)]
    assert main(argv) == 0
    meta = json.loads((out / "context.json").read_text())
    assert meta["tuning"] is None and meta["steps_done"] == 3
    assert meta["method"]["name"] == "grad_kv"
    opts = meta["method"]["options"]
    assert (opts["lr"], opts["update"], opts["checkpointing"], opts["steps"]) == (0.01, "v", True, 3)
    capsys.readouterr()
    assert main(["predict", "--context", str(out), "--task", "sentiment-demo", "--input", str(DEMO_TEST)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ctx = TunedContext.load(out, tiny_lm("llama"))
    assert ctx.method == meta["method"]
    api = ctx.predict([r["query"] for r in rows], [" negative", " positive"])
    assert [r["logprob"] for r in rows] == approx([a["logprob"] for a in api], abs=1e-5)


def test_tune_cli_refuses_mixed_options(tiny_model_dir, tmp_path, capsys):
    base = ["tune", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--out", str(tmp_path / "x")]
    assert main([*base, "--lr", "0.01"]) == 2
    assert "--lr set(s) gradient KV tuning: add --method grad_kv" in capsys.readouterr().err
    assert main([*base, "--method", "grad_kv", "--step-size", "0.1"]) == 2
    assert "--step-size set(s) forward tuning" in capsys.readouterr().err
    demos = tmp_path / "demos.txt"
    demos.write_text(TEXT)
    assert main(["tune", "--model", str(tiny_model_dir), "--demos", str(demos), "--method", "grad_kv",
                 "--out", str(tmp_path / "y")]) == 2
    assert "needs each demonstration's query and answer" in capsys.readouterr().err
