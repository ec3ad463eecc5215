"""benchmarks/grad_oneshot.py end to end on a tiny model: both settings score the same items, the table pairs
them item by item against 8-shot ICL, and a pair that scored different items is refused."""
import json

import pytest

from conftest import SHARED_DATA, load_benchmark
from deepthink.evaluation.report import unit_correct


def test_one_per_class_against_paper_shots_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    go = load_benchmark("grad_oneshot")
    model = str(tiny_model_dir)
    monkeypatch.setattr(go, "RESULTS", tmp_path / "grad_oneshot")
    monkeypatch.setattr(go, "MARKDOWN", tmp_path / "GRAD_ONESHOT.md")
    monkeypatch.setattr(go, "MODELS", [model])
    monkeypatch.setattr(go, "TASKS", ["sst2"])
    monkeypatch.setattr(go, "SEEDS", [3, 4])
    monkeypatch.setattr(go, "SIZES", dict(max_eval=6, dev_size=4))
    one = {"icl": {}, "icl_cc": {}, "grad_kv": {"lr": 0.01, "steps": 2}}
    monkeypatch.setattr(go, "ONE", one)
    monkeypatch.setattr(go, "SETTINGS", {"one": (1, one), "paper": (2, go.PAPER)})
    go.main(["--models", model, "--tasks", "sst2", "--seeds", "3", "4", "--quiet", "--data-dir", str(SHARED_DATA)])
    one_units, paper_units = go.units("one"), go.units("paper")
    assert len(one_units) == len(paper_units) == 2
    for u, v in zip(sorted(one_units, key=lambda u: u["seed"]), sorted(paper_units, key=lambda u: u["seed"])):
        assert unit_correct(u)["icl"].keys() == unit_correct(v)["icl"].keys()      # the same scored items
        assert u["config"]["shots"] == 1 and v["config"]["shots"] == 2
    # the interval is the paired one over the 12 (seed, item) pairs
    iv = go.paired(one_units, "grad_kv", paper_units, "icl")
    diffs = [a - b for u in one_units for v in paper_units if v["seed"] == u["seed"]
             for a, b in zip(unit_correct(u)["grad_kv"].values(), unit_correct(v)["icl"].values())]
    assert iv.mean == pytest.approx(100 * sum(diffs) / len(diffs))
    text = (tmp_path / "GRAD_ONESHOT.md").read_text()
    rows = [l for l in text.splitlines() if l.startswith(f"| {one_units[0]['model']} | sst2 | 3,4 |")]
    assert len(rows) == 3 and "[" in rows[2] and rows[2].split("|")[-3].strip() in ("met", "met, reliably", "not met")
    assert rows[2].split("|")[-2].strip() == str(go.paired(one_units, "grad_kv", one_units, "icl_cc"))   # same unit
    assert rows[1].split("|")[-2].strip() == ""                                      # ICL + CC against itself: blank
    assert "Finished: 2 of 2 one-per-class units, 2 of 2 8-shot units." in text
    sitting = json.loads((tmp_path / "grad_oneshot" / "sittings.jsonl").read_text())
    assert sitting["units"] == 4 and sitting["done"] == sorted(sitting["done"])
    # resumable: a second run finds every unit and runs none
    go.main(["--models", model, "--tasks", "sst2", "--seeds", "3", "4", "--quiet", "--data-dir", str(SHARED_DATA)])
    assert json.loads((tmp_path / "grad_oneshot" / "sittings.jsonl").read_text().splitlines()[1])["units"] == 0
    # units that scored different items are not compared
    shifted = one_units[0] | {"seed": 4}
    with pytest.raises(ValueError, match="scored different items"):
        go.paired([shifted], "grad_kv", [u for u in paper_units if u["seed"] == 4], "icl")


def test_the_goal_reading():
    go = load_benchmark("grad_oneshot")
    from deepthink.evaluation.stats import Interval
    assert go.verdict(Interval(-1.0, -1.9, -0.1)) == "met, reliably"
    assert go.verdict(Interval(-1.5, -4.0, 1.0)) == "met"
    assert go.verdict(Interval(-2.5, -4.0, -1.0)) == "not met"
    assert go.verdict(None) == "–"
