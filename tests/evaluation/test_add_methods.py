"""Adding methods to finished units: only the lacking methods are computed, on the unit's own items, and merged
without touching what the unit holds."""
import json
import re

import pytest

from deepthink import cli
from deepthink.evaluation import EvalConfig, runner
from deepthink.methods import METHODS
from conftest import assert_same_json, tiny_lm

SIZES = {"shots": 1, "dev_size": 4, "max_eval": 5}
ICL = {"icl": {}}
BOTH = {"icl": {}, "dt_fixed": {"steps": 2}}


def run(out, methods, **kw):
    lm = tiny_lm("llama")
    logged = []
    runner.run([lm.name], ["sentiment-demo"], [0], EvalConfig(**SIZES, methods=methods), out, progress=False,
               log=logged.append, lm_cache={(lm.name, "cpu", "float32", None): lm}, write=False, **kw)
    return logged


def files(out):
    (path,) = (out / "units").glob("*seed0.json")
    return path, path.read_text(), path.with_suffix(".predictions.jsonl").read_text()


@pytest.fixture
def counted(monkeypatch):
    """{method name: prepare calls}."""
    calls = {}
    for name in ("icl", "dt_fixed"):
        cls = METHODS[name]
        real = cls.prepare

        def prepare(self, setup, _real=real, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(self, setup)

        monkeypatch.setattr(cls, "prepare", prepare)
    return calls


def test_a_rerun_with_more_methods_computes_only_those_and_keeps_the_rest(tmp_path, counted):
    out = tmp_path / "run"
    run(out, ICL)
    path, unit_text, pred_text = files(out)
    assert counted == {"icl": 1}
    logged = run(out, BOTH)
    assert counted == {"icl": 1, "dt_fixed": 1}                      # icl not recomputed
    assert re.search(r"\(added dt_fixed in \d+s\)$", logged[-1])   # the added method's own time, not the unit's
    _, merged_text, merged_preds = files(out)
    old, new = json.loads(unit_text), json.loads(merged_text)
    assert new["accuracy"]["icl"] == old["accuracy"]["icl"] and new["methods"]["icl"] == old["methods"]["icl"]
    assert new["wall_s"]["icl"] == old["wall_s"]["icl"] and list(new["accuracy"]) == ["icl", "dt_fixed"]
    for k in ("demonstrations", "eval_indices", "dev_indices", "model_fingerprint", "environment", "notes"):
        assert new[k] == old[k]
    assert list(new["config"]["methods"]) == ["icl", "dt_fixed"] and new["config"]["methods"]["dt_fixed"]["steps"] == 2
    (added,) = new["added"]
    assert added["methods"] == ["dt_fixed"] and added["model_fingerprint"] == old["model_fingerprint"]
    old_lines, new_lines = pred_text.splitlines(), merged_preds.splitlines()
    assert len(old_lines) == len(new_lines) == 5
    for a, b in zip(old_lines, new_lines):
        assert b.startswith(a[:-1] + ", ")                               # every old byte kept, the new entry after
        assert set(json.loads(b)) == set(json.loads(a)) | {"dt_fixed"}
    # what was added equals what a run with both methods from the start gives
    fresh = tmp_path / "fresh"
    run(fresh, BOTH)
    _, fresh_text, fresh_preds = files(fresh)
    assert json.loads(fresh_text)["accuracy"] == new["accuracy"]
    for a, b in zip(fresh_preds.splitlines(), new_lines):
        assert_same_json(json.loads(a)["dt_fixed"], json.loads(b)["dt_fixed"])
    # the unit now counts as finished for both sets: nothing runs, nothing changes
    counted.clear()
    assert "already done" in run(out, BOTH)[-1] and "already done" in run(out, ICL)[-1]
    assert counted == {} and files(out)[1:] == (merged_text, merged_preds)


def test_the_ablation_benchmarks_units_gain_methods_the_same_way(tmp_path, counted):
    lm = tiny_lm("llama")
    cache = {(lm.name, "cpu", "float32", None): lm}
    out = tmp_path / "abl"
    for methods in (ICL, BOTH):
        runner.run_units([(lm.name, "sentiment-demo", 0, EvalConfig(**SIZES, methods=methods))], out, progress=False,
                         log=lambda *a: None, lm_cache=cache)
    assert counted == {"icl": 1, "dt_fixed": 1}
    assert list(json.loads(files(out)[1])["accuracy"]) == ["icl", "dt_fixed"]


def test_a_unit_whose_items_differ_from_the_draw_is_refused_before_anything_runs(tmp_path, counted):
    out = tmp_path / "run"
    run(out, ICL)
    path, text, preds = files(out)
    unit = json.loads(text)
    unit["eval_indices"] = unit["eval_indices"][::-1]
    path.write_text(json.dumps(unit))
    counted.clear()
    with pytest.raises(ValueError, match="other eval items than the finished unit holds.*new --out"):
        run(out, BOTH)
    assert counted == {} and files(out)[2] == preds


def test_other_options_or_another_model_are_refused(tmp_path, counted, capsys, tiny_model_dir):
    out = tmp_path / "run"
    run(out, BOTH)
    with pytest.raises(ValueError, match=r"other settings \{'dt_fixed'"):
        run(out, {"icl": {}, "dt_fixed": {"steps": 3}, "zero_shot": {}})
    path, text, _ = files(out)
    unit = json.loads(text)
    path.write_text(json.dumps({**unit, "model_fingerprint": "another"}))
    with pytest.raises(ValueError, match="fingerprint, dtype, quantize.*another"):
        run(out, {**BOTH, "zero_shot": {}})
    assert counted == {"icl": 1, "dt_fixed": 1}


def test_eval_cli_adds_methods_to_a_finished_run(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["eval", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--seeds", "0", "--shots", "1",
            "--dev-size", "4", "--max-eval", "4", "--quiet", "--out", str(out), "--methods"]
    assert cli.main([*base, "icl"]) == 0
    before = json.loads(next((out / "units").glob("*seed0.json")).read_text())
    assert cli.main([*base, "icl", "zero_shot"]) == 0
    after = json.loads(next((out / "units").glob("*seed0.json")).read_text())
    assert after["accuracy"]["icl"] == before["accuracy"]["icl"] and "zero_shot" in after["accuracy"]
    assert {"icl", "zero_shot"} <= set(json.loads((out / "results.json").read_text())["units"][0]["accuracy"])


def test_an_added_method_that_fails_is_recorded_once_and_not_retried(tmp_path):
    from deepthink.methods import Method, register_method
    from deepthink.methods.base import MethodFailed

    @register_method
    class Failing(Method):
        name, label = "test_failing", "failing"
        calls = 0

        def prepare(self, setup):
            type(self).calls += 1
            raise MethodFailed("no such architecture here")

    try:
        out = tmp_path / "run"
        run(out, ICL)
        _, _, preds = files(out)
        run(out, {**ICL, "test_failing": {}})
        _, text, merged_preds = files(out)
        unit = json.loads(text)
        assert unit["methods"]["test_failing"] == {"fails": "no such architecture here"}
        assert "test_failing" in unit["config"]["methods"] and "test_failing" not in unit["accuracy"]
        assert merged_preds == preds                                   # nothing to add per item
        assert "already done" in run(out, {**ICL, "test_failing": {}})[-1] and Failing.calls == 1
    finally:
        METHODS.pop("test_failing", None)


def test_each_method_records_its_cost_and_an_added_method_adds_its_own(tmp_path):
    out = tmp_path / "run"
    run(out, {"zero_shot": {}, "icl": {}, "dt_fixed": {"steps": 1}, "icl_cc": {}})
    unit = json.loads(files(out)[1])
    assert "icl_cc" not in unit["scoring"]                  # combined from ICL's scores: no speed of its own
    per_token = unit["kv_bytes_per_token"]
    assert per_token > 0 and unit["cache_bytes"]["icl"] == per_token * unit["demonstrations"]["tokens"]
    assert unit["memory_how"].startswith("peak_mb: the process's resident set high-water mark")
    for k in ("zero_shot", "icl"):
        m = unit["memory_mb"][k]
        assert 0 < m["start_mb"] <= m["peak_mb"]
        assert unit["scoring"][k]["items"] == 5 and unit["scoring"][k]["seconds"] >= 0
    # dt_fixed at one step is ICL's own context: its eval scores are shared, so no scoring speed is claimed for it
    assert "dt_fixed" not in unit["scoring"] and unit["cache_bytes"]["dt_fixed"] == unit["cache_bytes"]["icl"]
    # a unit from before costs were recorded gains the added method's, and says nothing about the old ones
    path = files(out)[0]
    old = {k: v for k, v in unit.items() if k not in ("memory_mb", "memory_how", "scoring", "cache_bytes",
                                                       "kv_bytes_per_token")}
    old["config"]["methods"].pop("dt_fixed")
    path.write_text(json.dumps(old))
    run(out, {"zero_shot": {}, "icl": {}, "dt_fixed": {"steps": 2}, "icl_cc": {}})
    merged = json.loads(files(out)[1])
    assert set(merged["memory_mb"]) == set(merged["cache_bytes"]) == {"dt_fixed"}
    assert merged["kv_bytes_per_token"] == per_token and merged["memory_how"] == unit["memory_how"]


def test_a_memory_peak_that_cannot_be_reset_is_said_not_guessed(tmp_path, monkeypatch):
    from deepthink.evaluation import cost

    monkeypatch.setattr(cost, "CLEAR_REFS", tmp_path / "no" / "clear_refs")
    out = tmp_path / "run"
    run(out, ICL)
    unit = json.loads(files(out)[1])
    assert unit["memory_mb"] == {} and unit["memory_how"].startswith("the peak resident set cannot be reset here")


def test_a_unit_from_before_shots_were_recorded_gains_methods(tmp_path, counted):
    out = tmp_path / "run"
    run(out, ICL)
    path, text, preds = files(out)
    unit = json.loads(text)
    del unit["demonstrations"]["shots"]                  # the ablation screen's units predate the field
    del unit["config"]["fit_shots"]
    path.write_text(json.dumps(unit, indent=1))
    run(out, BOTH)
    merged = json.loads(files(out)[1])
    assert counted == {"icl": 1, "dt_fixed": 1} and merged["accuracy"]["icl"] == unit["accuracy"]["icl"]
