"""The evaluation runner end to end on a tiny model folder: outputs, honesty, resume, reproducibility."""
import json
import re

import pytest

from deepthink import cli
from deepthink.evaluation import ORACLE, EvalConfig, runner
from deepthink.methods import DEFAULT_METHODS as SETTINGS
from conftest import assert_same_json, method_results

ARGS = ["--task", "sentiment-demo", "sst2", "--seeds", "0", "1", "--shots", "1", "--steps", "3",
        "--dev-size", "6", "--max-eval", "8", "--quiet"]


def run_cli(tmp, model_dir, out, *extra):
    return cli.main(["eval", "--model", str(model_dir), *ARGS, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert run_cli(None, tiny_model_dir, out, "--curve") == 0
    return out


def test_outputs_are_complete(finished):
    res = json.loads((finished / "results.json").read_text())
    assert {"deepthink", "torch", "transformers", "git"} <= set(res["environment"])
    assert len(res["units"]) == 4
    for u in res["units"]:
        assert set(u["accuracy"]) == set(SETTINGS)
        assert all(set(a) == {"sum", "norm"} for a in u["accuracy"].values())
        dev = u["methods"]["dt_dev"]
        assert 1 <= dev["chosen_steps"] <= 3 and len(dev["dev_curve"]) == 3
        assert dev["eval_curve"]["label"] == ORACLE      # the per-step eval curve is marked
        assert u["n_eval"] == 8 and u["n_dev"] == 6
        assert u["model_fingerprint"] and u["config"]["methods"]["dt_dev"]["steps"] == 3
        assert u["demonstrations"]["tokens"] > 0
        assert len(dev["norms"]) == 3 and len(dev["norms"][1]["dk"]) == 2
        assert u["methods"]["dt_fixed"]["steps"] == 5 and len(u["methods"]["dt_fixed"]["norms"]) == 5
        assert {"zero_shot", "icl", "dt_fixed", "total"} <= set(u["wall_s"])
        # demonstrations, dev and scored items never overlap
        demo = {(d["split"], d["index"]) for d in u["demonstrations"]["items"]}
        dev = {("train", i) for i in u["dev_indices"]}
        ev = {("eval", i) for i in u["eval_indices"]}
        assert not (demo & dev) and not (demo & ev) and not (dev & ev)
    preds = [json.loads(l) for l in (finished / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 * 8
    for p in preds:
        for s in SETTINGS:
            assert len(p[s]["logprob"]) == 2 and p[s]["pred"] in (0, 1)
    assert len(list((finished / "plots").glob("*.png"))) == 2
    for row in res["summary"]["sum"] + res["summary"]["norm"]:     # labelled, not bare [mean, std] pairs
        assert all(set(row[m]) == {"mean", "std"} and row[m]["std"] is not None for m in SETTINGS)
    assert [(v["model"], v["task"]) for v in res["verdict"]] == [("tiny-llama0", "sentiment-demo"),
                                                                  ("tiny-llama0", "sst2")]
    report = (finished / "report.txt").read_text()
    assert all(v["line"] in report for v in res["verdict"])


def test_dev_choice_is_argmax_with_ties_to_smaller_T(finished):
    for u in json.loads((finished / "results.json").read_text())["units"]:
        accs = [p["sum"] for p in u["methods"]["dt_dev"]["dev_curve"]]
        assert u["methods"]["dt_dev"]["chosen_steps"] == accs.index(max(accs)) + 1


def test_reported_numbers_come_from_predictions(finished):
    preds = [json.loads(l) for l in (finished / "predictions.jsonl").read_text().splitlines()]
    for u in json.loads((finished / "results.json").read_text())["units"]:
        rows = [p for p in preds if (p["model"], p["task"], p["seed"]) == (u["model"], u["task"], u["seed"])]
        for s in SETTINGS:
            acc = 100 * sum(r[s]["pred"] == r["gold"] for r in rows) / len(rows)
            assert u["accuracy"][s]["sum"] == pytest.approx(acc)


def test_rerun_skips_and_reproduces(finished, tiny_model_dir, tmp_path, capsys):
    before = (finished / "results.json").read_text()
    assert run_cli(None, tiny_model_dir, finished, "--curve") == 0
    assert "already done" in capsys.readouterr().out
    fresh = tmp_path / "again"
    assert run_cli(None, tiny_model_dir, fresh, "--curve") == 0
    a = json.loads(before)["units"]
    b = json.loads((fresh / "results.json").read_text())["units"]
    key = lambda u: (u["task"], u["seed"])
    for x, y in zip(sorted(a, key=key), sorted(b, key=key)):
        assert x["accuracy"] == y["accuracy"]
        assert_same_json(method_results(x), method_results(y))


def test_interrupt_loses_only_the_unit_in_flight(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = runner.run_unit
    calls = []

    def flaky(lm, task, seed, cfg, **kw):
        calls.append((task.name, seed))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(lm, task, seed, cfg, **kw)

    monkeypatch.setattr(runner, "run_unit", flaky)
    assert run_cli(None, tiny_model_dir, out) == 130
    done = sorted(p.name for p in (out / "units").iterdir())
    assert len([d for d in done if d.endswith("seed0.json")]) == 1 and not any(d.startswith(".") for d in done)
    monkeypatch.setattr(runner, "run_unit", real)
    assert run_cli(None, tiny_model_dir, out) == 0
    assert len(list((out / "units").glob("*seed?.json"))) == 4


def test_changed_settings_refuse_to_mix(finished, tiny_model_dir, capsys):
    assert run_cli(None, tiny_model_dir, finished, "--step-size", "0.5") == 2
    assert "other settings" in capsys.readouterr().err


def test_report_merges_runs(finished, tmp_path, capsys):
    assert cli.main(["report", str(finished), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "DT dev-T" in out and "sentiment-demo" in out and "sst2" in out
    # the verdict: one line per task naming the best method with its interval against ICL, or zero-shot's win
    verdict = out.split("verdict (", 1)[1].splitlines()[1:3]
    for line, task in zip(verdict, ("sentiment-demo", "sst2")):
        assert line.startswith(f"tiny-llama0 {task}: ")
        assert "zero-shot wins" in line or "best method" in line
        assert re.search(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]", line)
    assert (tmp_path / "results.json").exists()
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize("argv, match", [
    (["--task", "nope"], "unknown task"),
    (["--task", "sst2", "--shots", "0"], "shots"),
    (["--task", "sst2", "--momentum", "1.5"], "momentum"),
    (["--task", "sst2", "--data-dir", "/nonexistent"], "does not exist"),
])
def test_bad_eval_arguments(tiny_model_dir, tmp_path, capsys, argv, match):
    assert cli.main(["eval", "--model", str(tiny_model_dir), *argv, "--out", str(tmp_path), "--quiet"]) == 2
    assert match in capsys.readouterr().err


def test_unwritable_out(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--task", "sst2", "--out", str(blocker / "sub")]) == 2
    assert "--out" in capsys.readouterr().err


def test_eval_config_validation():
    with pytest.raises(ValueError, match="max-eval"):
        EvalConfig(max_eval=0)
    with pytest.raises(ValueError, match="dt_dev.*steps"):
        EvalConfig(methods={"dt_dev": {"steps": 0}})
    with pytest.raises(ValueError, match="unknown method 'nope'; valid: zero_shot, icl"):
        EvalConfig(methods={"nope": {}})
    with pytest.raises(ValueError, match="no option"):
        EvalConfig(methods={"icl": {"steps": 3}})


def test_reproduction_markdown_from_finished_units(finished, tmp_path):
    """benchmarks/reproduce.py's REPRODUCTION.md: status of the profile, per-task sizes, a mean ± std row per
    task, the plain "does it help" lines and links to the plots."""
    from conftest import load_benchmark

    reproduce = load_benchmark("reproduce")
    assert reproduce.task_config("default", "hellaswag").max_eval == 50
    assert reproduce.task_config("default", "sst2") == reproduce.PROFILES["default"]["config"]
    dest = tmp_path / "R.md"                    # the ablation benchmark's section is kept as it stands
    dest.write_text(f"old\n{reproduce.PAPER_SHOTS_MARK[0]}\n## written by ablations.py\n{reproduce.PAPER_SHOTS_MARK[1]}\n")
    text = reproduce.write_markdown("default", finished, "cmd", dest=dest).read_text()
    assert f"{reproduce.PAPER_SHOTS_MARK[0]}\n## written by ablations.py\n{reproduce.PAPER_SHOTS_MARK[1]}" in text
    assert not text.startswith("old")
    assert "**Status: 0 of 30 units of the profile finished.**" in text      # the tiny model is not in the profile
    assert "hellaswag alone uses max eval 50, dev size 16" in text
    rows = [l for l in text.splitlines() if l.startswith("| ") and "| sst2 | 2 | 8 |" in l]
    assert len(rows) == 1 and rows[0].count("±") == len(SETTINGS)            # 2 seeds: mean ± std per setting
    assert "DT dev-T vs ICL**: mean change" in text and "plots/" in text
    readme = tmp_path / "README.md"                       # the README's short table, between its markers
    readme.write_text(f"top\n{reproduce.README_MARK[0]}\nold\n{reproduce.README_MARK[1]}\nbottom\n")
    assert reproduce.update_readme("default", finished, readme)
    short = readme.read_text()
    assert "old" not in short and short.startswith("top\n") and short.endswith("bottom\n")
    assert sum(l.startswith("| tiny-llama0 | ") for l in short.splitlines()) == 2 and "mean change" in short


PER_ITEM_CHOICES = {"copa", "hellaswag", "obqa", "qasc", "winogrande"}     # no content-free query: no icl_cc


def test_all_ten_tasks_run_end_to_end_from_the_cli(tiny_model_dir, tmp_path, capsys):
    """`deepthink eval` on every paper task from the local data: a unit per task with every default method (grad_kv
    too where a task at --shots 1 gives one demonstration: plain ICL, said so); calibrated ICL where it applies,
    elsewhere "–" in the tables and the reason in the unit, and the run goes on."""
    from conftest import PAPER_TASKS, SHARED_DATA

    out = tmp_path / "all"
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--task", *PAPER_TASKS, "--seeds", "0", "--steps", "2",
                     "--dev-size", "2", "--max-eval", "3", "--data-dir", str(SHARED_DATA),
                     "--quiet", "--out", str(out)]) == 0
    units = json.loads((out / "results.json").read_text())["units"]
    assert sorted(u["task"] for u in units) == sorted(PAPER_TASKS)
    assert "icl_cc" in SETTINGS
    printed = capsys.readouterr().out
    table = printed.split("summed log-prob\n", 1)[1].split("\n\n")[0].splitlines()
    column = table[0].index("ICL + CC")
    for u in units:
        ran = set(SETTINGS) - ({"icl_cc"} if u["task"] in PER_ITEM_CHOICES else set())
        assert set(u["accuracy"]) == ran and u["n_eval"] == 3 and u["n_dev"] == 2
        if u["task"] in PER_ITEM_CHOICES:
            assert "per-item choices" in u["methods"]["icl_cc"]["not_applicable"]
        (row,) = [l for l in table if l.split()[1:2] == [u["task"]]]
        assert (row[column] == "–") == (u["task"] in PER_ITEM_CHOICES)
        one = len(u["demonstrations"]["items"]) == 1
        assert (u["methods"]["grad_kv"].get("note") is not None) == one
        assert not one or u["accuracy"]["grad_kv"] == u["accuracy"]["icl"]
    assert any(len(u["demonstrations"]["items"]) == 1 for u in units)


@pytest.mark.parametrize("refused", ["dt_dev", "grad_kv", "grad_kv_cc"])
def test_a_method_that_cannot_run_is_refused_before_any_method_computes(monkeypatch, refused):
    """Demonstrations longer than a sliding window: the tuning methods say so at once, not after the methods
    before them in the run have done their work (an ablation unit lost 24 minutes that way)."""
    from conftest import SHARED_DATA, tiny_lm
    from deepthink.methods.base import Workspace

    lm = tiny_lm("mistral", sliding_window=40)
    monkeypatch.setattr(Workspace, "score", lambda *a, **k: pytest.fail("a method computed before the refusal"))
    cfg = EvalConfig(shots=2, dev_size=2, max_eval=3, methods={"zero_shot": {}, "icl": {}, refused: {"steps": 2}})
    with pytest.raises(ValueError, match="sliding-window layers see only the last 40"):
        runner.run_unit(lm, "sst2", 0, cfg, data_dir=SHARED_DATA, progress=False)


def test_repeated_demonstrations_past_the_positions_are_refused_first(monkeypatch):
    from conftest import SHARED_DATA, tiny_lm
    from deepthink.methods.base import Workspace

    lm = tiny_lm("gpt2")                        # 256 positions; two sst2 demonstrations x 5 need more
    monkeypatch.setattr(Workspace, "score", lambda *a, **k: pytest.fail("a method computed before the refusal"))
    cfg = EvalConfig(shots=1, dev_size=2, max_eval=3, methods={"icl": {}, "icl_repeat": {"times": 5}})
    with pytest.raises(ValueError, match="model supports 256"):
        runner.run_unit(lm, "sst2", 0, cfg, data_dir=SHARED_DATA, progress=False)


def fit_setting():
    """A tiny sliding-window model whose window takes sst2/seed 0's one-per-class demonstrations for forward
    tuning but not its two-per-class ones."""
    from conftest import SHARED_DATA, tiny_lm
    from deepthink.data import make_plan

    tok = tiny_lm("mistral").tokenizer
    one, two = (len(tok(make_plan("sst2", 0, shots=k, data_dir=SHARED_DATA).demonstrations).input_ids) for k in (1, 2))
    assert two > one + 1                        # the window below takes one per class, not two
    return tiny_lm("mistral", sliding_window=one + 2), SHARED_DATA


def test_fit_shots_draws_the_largest_count_every_method_accepts(tmp_path):
    """Two per class are refused by forward tuning: without fit_shots the run stops with a message that names
    the unit and the flag; with it the unit is exactly the one-per-class unit, and says so."""
    from deepthink.kv import DemonstrationsTooLong

    lm, data = fit_setting()
    methods = {"icl": {}, "dt_fixed": {"steps": 2}}
    with pytest.raises(DemonstrationsTooLong, match=r"tiny-mistral sst2 seed 0, 2 shots: .*fit_shots=True.*--fit-shots"):
        runner.run_unit(lm, "sst2", 0, EvalConfig(shots=2, dev_size=2, max_eval=4, methods=methods), data_dir=data,
                        progress=False)
    unit, preds = runner.run_unit(lm, "sst2", 0, EvalConfig(shots=2, dev_size=2, max_eval=4, methods=methods,
                                                            fit_shots=True), data_dir=data, progress=False)
    one, one_preds = runner.run_unit(lm, "sst2", 0, EvalConfig(shots=1, dev_size=2, max_eval=4, methods=methods),
                                     data_dir=data, progress=False)
    assert unit["demonstrations"]["shots"] == 1 and one["demonstrations"]["shots"] == 1
    (note,) = [n for n in unit["notes"] if "fitted" in n]
    assert note.startswith("shots fitted to the model: shots=2 refused by dt_fixed (demonstrations are ")
    assert note.endswith("; shots=1 used") and not [n for n in one["notes"] if "fitted" in n]
    assert unit["accuracy"] == one["accuracy"] and preds == one_preds
    assert unit["demonstrations"]["text"] == one["demonstrations"]["text"]


def test_fit_shots_resumes_units_made_without_it_only_when_they_used_every_shot(tmp_path):
    """fit_shots changes nothing for a unit whose demonstrations fitted, so such a unit counts as finished
    under either setting; a unit that had to draw fewer does not count for a run that would have stopped."""
    lm, data = fit_setting()
    methods = {"icl": {}, "dt_fixed": {"steps": 2}}
    cache = {(lm.name, "cpu", "float32", None): lm}
    fits, fitted = EvalConfig(shots=1, dev_size=2, max_eval=3, methods=methods), \
        EvalConfig(shots=2, dev_size=2, max_eval=3, methods=methods, fit_shots=True)
    for cfg, out in ((fits, tmp_path / "a"), (fitted, tmp_path / "b")):
        runner.run([lm.name], ["sst2"], [0], cfg, out, data_dir=data, progress=False, log=lambda *a: None,
                   lm_cache=cache, write=False)
    assert runner.finished(tmp_path / "a", lm.name, "sst2", 0, EvalConfig(**{**fits.to_dict(), "fit_shots": True}))
    assert runner.finished(tmp_path / "b", lm.name, "sst2", 0, fitted)
    with pytest.raises(ValueError, match="other settings.*fit_shots"):
        runner.finished(tmp_path / "b", lm.name, "sst2", 0, EvalConfig(**{**fitted.to_dict(), "fit_shots": False}))


def test_fit_shots_flag_reaches_the_units(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--seeds", "0", "--shots", "1",
                     "--dev-size", "2", "--max-eval", "3", "--methods", "icl", "--quiet", "--fit-shots",
                     "--out", str(out)]) == 0
    (unit,) = (json.loads(p.read_text()) for p in (out / "units").glob("*seed0.json"))
    assert unit["config"]["fit_shots"] is True and unit["demonstrations"]["shots"] == 1
    with pytest.raises(ValueError, match="fit_shots must be True or False"):
        EvalConfig(fit_shots="yes")


def test_a_run_whose_methods_all_do_not_apply_says_so(tiny_model_dir, tmp_path, capsys):
    from conftest import SHARED_DATA

    assert cli.main(["eval", "--model", str(tiny_model_dir), "--task", "copa", "--methods", "icl_cc", "--max-eval",
                     "2", "--dev-size", "0", "--data-dir", str(SHARED_DATA), "--quiet", "--out", str(tmp_path)]) == 2
    assert "no selected method applies to copa: icl_cc: calibration needs one set of choices" in capsys.readouterr().err


class RecordingBar:
    def __init__(self, **kw):
        self.kw, self.n, self.postfixes = kw, 0, []

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, text, refresh=True):
        self.postfixes.append(text)

    def close(self):
        pass


def test_progress_moves_with_every_tuning_step_not_only_every_method(monkeypatch):
    """The bar sat still for minutes while a method tuned: now it moves after every tuning step and scoring pass
    and names the method and its step."""
    from conftest import SHARED_DATA, tiny_lm

    bars = []
    monkeypatch.setattr(runner, "_bar", lambda progress, **kw: bars.append(RecordingBar(**kw)) or bars[-1])
    cfg = EvalConfig(shots=1, dev_size=2, max_eval=3, methods={"icl": {}, "dt_fixed": {"steps": 3},
                                                               "grad_kv": {"steps": 4}})
    runner.run_unit(tiny_lm("llama"), "sst2", 0, cfg, data_dir=SHARED_DATA)
    (bar,) = bars
    assert bar.n == len(bar.postfixes) > 3 * 2                   # far more moves than methods
    assert [p for p in bar.postfixes if p.endswith(": done")] == ["icl (1/3): done", "dt_fixed (2/3): done",
                                                                  "grad_kv (3/3): done"]
    assert [p for p in bar.postfixes if "dt_fixed" in p and "forward step" in p] == [
        f"dt_fixed (2/3): forward step {t}" for t in range(1, 4)]
    assert [p for p in bar.postfixes if "gradient step" in p] == [f"grad_kv (3/3): gradient step {t}"
                                                                  for t in range(1, 5)]


def test_units_resume_across_memory_knobs_but_not_across_results(tmp_path):
    """grad_kv's micro_batch changes memory, not results: a unit made with it counts as finished for a run without
    it (and one made before the option existed, whose saved options lack it, too); lr still refuses to mix."""
    from conftest import SHARED_DATA, tiny_lm

    lm = tiny_lm("llama")
    grad = {"steps": 2, "selection": "loo", "micro_batch": 1}
    cfg = EvalConfig(shots=1, dev_size=0, max_eval=3, methods={"icl": {}, "grad_kv": grad})
    runner.run([lm.name], ["sst2"], [0], cfg, tmp_path, data_dir=SHARED_DATA, progress=False, log=lambda *a: None,
               lm_cache={(lm.name, "cpu", "float32", None): lm}, write=False)
    (path,) = (tmp_path / "units").glob("*.json")
    assert json.loads(path.read_text())["config"]["methods"]["grad_kv"]["micro_batch"] == 1
    for m in (0, 4):
        assert runner.finished(tmp_path, lm.name, "sst2", 0, EvalConfig(**{**cfg.to_dict(), "methods": {
            "icl": {}, "grad_kv": {**grad, "micro_batch": m}}}))
    unit = json.loads(path.read_text())
    del unit["config"]["methods"]["grad_kv"]["micro_batch"]             # saved before the option existed
    path.write_text(json.dumps(unit))
    assert runner.finished(tmp_path, lm.name, "sst2", 0, cfg)
    with pytest.raises(ValueError, match="other settings.*grad_kv"):
        runner.finished(tmp_path, lm.name, "sst2", 0, EvalConfig(**{**cfg.to_dict(), "methods": {
            "icl": {}, "grad_kv": {**grad, "lr": 0.5}}}))
