"""benchmarks/ablations.py end to end on a tiny model: units, the screen tables with paired intervals,
the confirmation's pick made from the screen alone, sittings recorded."""
import importlib.util
import json

from conftest import REPO, SHARED_DATA


def load_script():
    spec = importlib.util.spec_from_file_location("ablations", REPO / "benchmarks" / "ablations.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_screen_then_confirm_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    ab = load_script()
    model = str(tiny_model_dir)
    monkeypatch.setattr(ab, "RESULTS", tmp_path / "ablations")
    monkeypatch.setattr(ab, "MARKDOWN", tmp_path / "ABLATIONS.md")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{ab.README_MARK[0]}\nold\n{ab.README_MARK[1]}\nrest\n")
    monkeypatch.setattr(ab, "README", readme)
    monkeypatch.setattr(ab, "TASKS", ["sst2"])
    monkeypatch.setattr(ab, "SHOTS", {"sst2": 1})
    monkeypatch.setattr(ab, "GRID", {"zero_shot": {}, "icl": {}, "icl_cc": {}, "dt_fixed": {"steps": 2},
                                     "dt_dev": {"steps": 2}, "dt_dev@loo": {"steps": 2, "selection": "loo"},
                                     "icl_repeat@r2": {"times": 2}, "dt_ensemble": {"steps": 2}})
    monkeypatch.setattr(ab, "STAGES", {"screen": dict(models=[model], seeds=[0, 1], max_eval=6, dev_size=4),
                                       "confirm": dict(models=[model], seeds=[3], max_eval=6, dev_size=4)})
    ab.main(["--stage", "screen", "--quiet", "--data-dir", str(SHARED_DATA)])
    text = (tmp_path / "ABLATIONS.md").read_text()
    assert "## Screen (2 of 2 units)" in text and "Δ vs ICL" in text and "W/T/L" in text
    assert [l for l in text.splitlines() if l.startswith("| ICL + CC | ") and " / " in l]     # summed / per-token
    rows = [l for l in text.splitlines() if l.startswith("| DT dev-T |")]
    assert len(rows) == 1 and "[" in rows[0]                          # a paired interval
    sel = json.loads((tmp_path / "ablations" / "confirm" / "selection.json").read_text())
    assert len(sel["picked"]) == 3 and not set(sel["picked"]) & {"zero_shot", "icl", "icl_cc"}
    assert "Picked from the screen alone" in text
    sittings = [json.loads(l) for l in (tmp_path / "ablations" / "screen" / "sittings.jsonl").read_text().splitlines()]
    assert sittings[0]["units"] == 2
    summary = ab.readme_summary(ab.units_of("screen"), 2)          # the README's short form, written there
    assert readme.read_text() == f"intro\n{ab.README_MARK[0]}\n{summary}\n{ab.README_MARK[1]}\nrest\n"
    assert summary.startswith("Screen, 2 of 2 units finished") and "| DT dev-T | " in summary
    assert ab.readme_summary([], 2) == "No ablation unit has finished yet."
    # REPRODUCTION.md's paper-settings rows come from these units
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    rep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rep)
    section = rep.paper_settings(tmp_path / "ablations")
    row = [l for l in section if "| sst2 | 0,1 | 6 |" in l]
    assert len(row) == 1, section
    assert row[0].count("|") == 11 and "T in 1..2" in "\n".join(section)
    assert rep.paper_settings(tmp_path / "nothing") == []
    ab.main(["--stage", "confirm", "--quiet", "--data-dir", str(SHARED_DATA)])
    unit = json.loads(next((tmp_path / "ablations" / "confirm" / "units").glob("*.json")).read_text())
    assert set(unit["accuracy"]) == {"zero_shot", "icl", "icl_cc", *sel["picked"]}
    assert "## Confirmation" in (tmp_path / "ABLATIONS.md").read_text()
