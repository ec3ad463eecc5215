"""Issue 31: the guarded selection rules (dev-mcnemar, dev-bootstrap) through `deepthink.tune` and `deepthink tune`:
T = 1 (plain ICL) kept unless a T > 1 beats it on the dev items at --level; the evidence in context.json; the
warning without dev items; --level's checks. dev-acc stays the default."""
import json

import pytest

import deepthink
from deepthink import TunedContext, api
from deepthink.cli import main
from deepthink.methods import Setup
from deepthink.methods.gradient import GradKVConfig
from deepthink.methods.selection import sign_test
from deepthink.scoring import Scores
from deepthink.tasks import Example
from conftest import CHOICES, tiny_lm

ITEMS = [Example("Review: a gorgeous, witty, seductive movie.\nSentiment:", tuple(CHOICES), 1, 0, "train"),
         Example("Review: the plot is nothing but boilerplate clichés.\nSentiment:", tuple(CHOICES), 0, 1, "train"),
         Example("Review: witty and gorgeous\nSentiment:", tuple(CHOICES), 1, 2, "train")]
WORDS = ["dull", "witty", "slow", "gorgeous", "flat", "moving", "tedious", "sharp", "bland", "warm", "stale",
         "bright", "clumsy", "tender", "lifeless", "funny"]
DEV = [Example(f"Review: {w}\nSentiment:", tuple(CHOICES), i % 2, 10 + i, "train") for i, w in enumerate(WORDS)]
GAIN = 2                 # dev items every T > 1 gets right that T = 1 gets wrong (the seed 4: 2 of 64)


@pytest.fixture
def small_gain(monkeypatch):
    """Every T > 1 answers the first GAIN dev items that T = 1 gets wrong correctly, and the rest as it would: a
    dev gain of GAIN items, which dev-acc follows and a guarded rule at level 0.1 must not."""
    score_dev = Setup.score_dev

    def rigged(self, scorer):
        s = score_dev(self, scorer)
        if scorer is self.icl():
            return s
        first = score_dev(self, self.icl()).predictions()
        rows = [list(r) for r in s.logprob]
        for i in [i for i, (p, e) in enumerate(zip(first, self.dev)) if p != e.label][:GAIN]:
            rows[i][self.dev[i].label] = max(rows[i]) + 1.0
        return Scores(rows, s.n_tokens)

    monkeypatch.setattr(Setup, "score_dev", rigged)


def net(sel: dict) -> list[int]:
    return [w - l for w, l in zip(sel["wins"], sel["losses"])]


def test_guarded_rule_keeps_icl_where_dev_acc_follows_a_small_gain(small_gain, tmp_path):
    lm = tiny_lm("llama")
    acc = deepthink.tune(lm, ITEMS, dev=DEV, steps=3)                   # the default rule, unchanged
    assert acc.method["selection"]["rule"] == "dev-acc" and acc.steps_done > 1
    ctx = deepthink.tune(lm, ITEMS, dev=DEV, steps=3, selection="dev-mcnemar", level=0.1)
    sel = ctx.method["selection"]
    assert ctx.steps_done == sel["chosen_steps"] == 1 and sel["rule"] == "dev-mcnemar" and sel["level"] == 0.1
    assert sel["dev_items"] == 16 and sel["passed"] == []
    assert sel["accuracy_curve"] == acc.method["selection"]["accuracy_curve"]
    assert max(net(sel)) == GAIN and sel["wins"][0] == sel["losses"][0] == 0 and sel["p_value"][0] is None
    assert sel["p_value"][1:] == pytest.approx([sign_test(w, l) for w, l in zip(sel["wins"][1:], sel["losses"][1:])])
    assert api.selection_summary(sel) == ("T = 1 kept: no T beat it on the 16 dev items at level 0.1 "
                                          "(best T = 2: +2 items, p = 0.25)")
    # saved and loaded back: the schema takes the record, unchanged
    back = TunedContext.load(ctx.save(tmp_path / "c"), lm)
    assert back.method == ctx.method and back.steps_done == 1
    # a looser level lets the same evidence through (p = 0.25 <= 0.3)
    loose = deepthink.tune(lm, ITEMS, dev=DEV, steps=3, selection="dev-mcnemar", level=0.3)
    s = loose.method["selection"]
    assert loose.steps_done > 1 and loose.steps_done in s["passed"] and s["level"] == 0.3
    assert api.selection_summary(s) == (f"T = {loose.steps_done} chosen: it beat T = 1 on the 16 dev items at "
                                        "level 0.3 (+2 items, p = 0.25)")


def test_bootstrap_rule_records_its_lower_bounds(small_gain, tmp_path):
    """2 wins of 16 dev items: a resample holds neither with probability (14/16)^16 = 0.118, so the lower bound of
    the gain is 0 at level 0.05 (T = 1 kept) and above 0 at level 0.3 (a T > 1 chosen)."""
    lm = tiny_lm("llama")
    for level, kept in ((0.05, True), (0.3, False)):
        ctx = deepthink.tune(lm, ITEMS, dev=DEV, steps=3, selection="dev-bootstrap", level=level)
        sel = ctx.method["selection"]
        assert sel["rule"] == "dev-bootstrap" and sel["level"] == level and "p_value" not in sel
        bounds = sel["gain_lower_bound"]
        assert len(bounds) == 3 and bounds[0] is None and max(net(sel)) == GAIN
        assert sel["passed"] == [t for t in (2, 3) if bounds[t - 1] is not None and bounds[t - 1] > 0]
        assert (ctx.steps_done == 1) is kept and (sel["passed"] == []) is kept
        summary = api.selection_summary(sel)
        if kept:
            assert bounds[1] == pytest.approx(0.0, abs=1e-9)
            assert summary == ("T = 1 kept: no T beat it on the 16 dev items at level 0.05 (best T = 2: +2 items, "
                               "lower bound +0 points)")
        else:
            assert bounds[ctx.steps_done - 1] > 0
            assert summary.startswith(f"T = {ctx.steps_done} chosen: it beat T = 1 on the 16 dev items at level "
                                      "0.3 (+2 items, lower bound +")
        assert TunedContext.load(ctx.save(tmp_path / str(level)), lm).method == ctx.method


def test_guarded_rule_without_dev_items_warns_and_is_plain_icl():
    lm = tiny_lm("llama")
    text = "".join(e.demo_text + "\n\n" for e in ITEMS)
    task = deepthink.get_task("sentiment-demo")
    for kwargs, why in (({"dev_size": 0}, "--dev-size 0"), ({"dev": []}, "dev= is empty")):
        with pytest.warns(UserWarning, match="no dev items") as caught:
            ctx = deepthink.tune(lm, text, task=task, steps=2, selection="dev-mcnemar", **kwargs)
        msg = str(caught[0].message)
        assert why in msg and "keeps T = 1 (plain ICL)" in msg and "--selection loo" in msg
        sel = ctx.method["selection"]
        assert ctx.steps_done == 1 and sel["rule"] == "dev-mcnemar" and sel["dev_items"] == 0
        assert "without dev items" in sel["note"] and sel["train_loss"] == []     # no Adam step was run for it
        assert api.selection_summary(sel) == "T = 1 kept: dev-mcnemar needs dev items and had none (plain ICL)"


def test_library_level_belongs_to_the_guarded_rules():
    lm = tiny_lm("llama")
    with pytest.raises(ValueError, match="level is the threshold of the guarded rules.*selection 'dev-acc'"):
        deepthink.tune(lm, ITEMS, dev=DEV, level=0.2)
    with pytest.raises(ValueError, match="level is the threshold of the guarded rules.*selection 'dev-acc'"):
        deepthink.tune(lm, ITEMS, dev=DEV, config=GradKVConfig(level=0.05))           # not silently ignored
    with pytest.raises(ValueError, match="selection 'loo'"):
        deepthink.tune(lm, ITEMS, dev=DEV, config=GradKVConfig(selection="dev-mcnemar", level=0.05), selection="loo")
    with pytest.raises(ValueError, match="level"):
        deepthink.tune(lm, ITEMS, dev=DEV, selection="dev-mcnemar", level=1.0)
    assert "dev-mcnemar" in api.SELECTIONS and "dev-bootstrap" in api.SELECTIONS


# ---------------------------------------------------------------- the CLI

def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_tune_cli_guarded_selection_end_to_end(tiny_model_dir, small_gain, tmp_path, capsys):
    base = ["tune", "--model", tiny_model_dir, "--task", "sentiment-demo", "--shots", 2, "--steps", 3,
            "--dev-size", 8]
    code, out, err = run(capsys, *base, "--selection", "dev-mcnemar", "--out", tmp_path / "m")
    assert code == 0, err
    assert "dev-mcnemar: T = 1 kept: no T beat it on the 8 dev items at level 0.1 (best T = 2: +2 items, " \
           "p = 0.25)" in out
    meta = json.loads((tmp_path / "m" / "context.json").read_text())
    sel = meta["method"]["selection"]
    assert meta["steps_done"] == sel["chosen_steps"] == 1 and sel["level"] == 0.1 and sel["dev_items"] == 8
    assert TunedContext.load(tmp_path / "m", deepthink.load_model(str(tiny_model_dir))).method == meta["method"]
    code, out, err = run(capsys, *base, "--selection", "dev-bootstrap", "--level", 0.4, "--out", tmp_path / "b")
    assert code == 0, err
    sel = json.loads((tmp_path / "b" / "context.json").read_text())["method"]["selection"]
    assert sel["rule"] == "dev-bootstrap" and sel["level"] == 0.4 and "dev-bootstrap: T = " in out
    assert "step 1/3" in err and "T = 1 unless a T in 2..3 beats it on 8 dev items (dev-bootstrap, level 0.4)" in err


def test_tune_cli_level_is_checked(tiny_model_dir, tmp_path, capsys):
    base = ["tune", "--model", tmp_path / "never-loaded", "--task", "sentiment-demo", "--out", tmp_path / "x"]
    for level in ("0", "1", "1.5", "-0.1", "nan"):
        code, _, err = run(capsys, *base, "--selection", "dev-mcnemar", "--level", level)
        assert code == 2 and err.strip().splitlines()[-1].startswith(
            "deepthink tune: error: --level must be between 0 and 1 (exclusive)"), err
    for selection in ([], ["--selection", "dev-acc"], ["--selection", "loo"], ["--selection", "last"]):
        code, _, err = run(capsys, *base, *selection, "--level", "0.1")
        assert code == 2 and "--level is the threshold of --selection dev-mcnemar or dev-bootstrap" in err, err
    code, _, err = run(capsys, *base, "--method", "forward", "--level", "0.1")
    assert code == 2 and "--level set(s) gradient KV tuning, not --method forward: drop it" in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    help_text = capsys.readouterr().out
    assert "--level" in help_text and "dev-mcnemar" in help_text and "dev-bootstrap" in help_text


def test_tune_cli_guarded_rule_without_dev_rows_warns(tiny_model_dir, tmp_path, capsys):
    rows = tmp_path / "three.jsonl"
    rows.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in
                            (("Site down", "high"), ("Typo", "low"), ("Slow export", "medium"))))
    code, out, err = run(capsys, "tune", "--model", tiny_model_dir, "--train", rows, "--template",
                         "Ticket: {text}\\nUrgency:", "--choices", "low,medium,high", "--steps", 2,
                         "--selection", "dev-mcnemar", "--quiet", "--out", tmp_path / "c")
    assert code == 0, err
    assert "warning: no dev items (training rows left after the demonstrations, 3 demonstrations): " \
           "--selection dev-mcnemar keeps T = 1 (plain ICL)" in err
    assert "T = 1 kept: dev-mcnemar needs dev items and had none" in out
    assert json.loads((tmp_path / "c" / "context.json").read_text())["steps_done"] == 1
