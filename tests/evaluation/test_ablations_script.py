"""benchmarks/ablations.py end to end on a tiny model: units, the screen tables with paired intervals,
the confirmation's pick made from the screen alone, sittings recorded."""
import json

from conftest import SHARED_DATA, load_benchmark


def test_screen_then_confirm_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    ab = load_benchmark("ablations")
    model = str(tiny_model_dir)
    monkeypatch.setattr(ab, "RESULTS", tmp_path / "ablations")
    monkeypatch.setattr(ab, "MARKDOWN", tmp_path / "ABLATIONS.md")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{ab.README_MARK[0]}\nold\n{ab.README_MARK[1]}\nrest\n")
    monkeypatch.setattr(ab, "README", readme)
    doc = tmp_path / "gradient.md"
    doc.write_text(f"{ab.GRADIENT_MARK[0]}\n{ab.GRADIENT_MARK[1]}\n")
    monkeypatch.setattr(ab, "GRADIENT_DOC", doc)
    rep = load_benchmark("reproduce")
    assert rep.PAPER_SHOTS_MARK == ab.PAPER_SHOTS_MARK            # reproduce.py keeps the section ablations.py writes
    reproduction = tmp_path / "REPRODUCTION.md"                   # beside MARKDOWN, as in benchmarks/results
    reproduction.write_text(f"top\n{ab.PAPER_SHOTS_MARK[0]}\n{ab.PAPER_SHOTS_MARK[1]}\n")
    monkeypatch.setattr(ab, "TASKS", ["sst2"])
    monkeypatch.setattr(ab, "SHOTS", {"sst2": 1})
    monkeypatch.setattr(ab, "GRID", {"zero_shot": {}, "icl": {}, "icl_cc": {}, "dt_fixed": {"steps": 2},
                                     "dt_dev": {"steps": 2}, "dt_dev@loo": {"steps": 2, "selection": "loo"},
                                     "icl_repeat@r2": {"times": 2}, "dt_ensemble": {"steps": 2}})
    monkeypatch.setattr(ab, "STAGES", {"screen": dict(models=[model], seeds=[0, 1], max_eval=6, dev_size=4),
                                       "confirm": dict(models=[model], seeds=[3], max_eval=6, dev_size=4)})
    monkeypatch.setattr(ab, "CURVE_UNITS", {("screen", model, "sst2", 0)})
    ab.main(["--stage", "screen", "--quiet", "--data-dir", str(SHARED_DATA)])
    text = (tmp_path / "ABLATIONS.md").read_text()
    oracle = text.split("#### Oracle: an upper bound, labelled (T chosen on eval)")[1].split("\n\n")[2].splitlines()
    goals = text.split("#### Goals (screen: 1 of 1 models)")[1].split("\n\n")[2].splitlines()
    row = [l for l in goals if l.startswith("| DT dev-T |")][0].split(" | ")
    assert row[2] in ("0 of 1", "1 of 1") and row[4] in ("yes", "no") and row[5] == " |"   # issue 10: grad KV only
    dt_dev = [l for l in oracle if "| DT dev-T |" in l]
    assert len(dt_dev) == 1 and dt_dev[0].startswith("| tiny-llama") and "/0 |" in dt_dev[0]   # the curve unit only
    cells = [c.strip() for c in dt_dev[0].split("|")[1:-1]]
    assert float(cells[5]) >= float(cells[3]) and abs(float(cells[6]) - (float(cells[5]) - float(cells[3]))) < 0.11
    assert "## Screen (2 of 2 units)" in text and "Δ vs ICL" in text and "W/T/L" in text
    assert "Units so fitted: none." in text and all(u["config"]["fit_shots"] for u in ab.units_of("screen"))
    assert [l for l in text.splitlines() if l.startswith("| ICL + CC | ") and " / " in l]     # summed / per-token
    rows = [l for l in text.splitlines() if l.startswith("| DT dev-T |")]
    assert len(rows) == 2 and "[" in rows[0] and "±" in rows[0]      # the table with a paired interval; the goals
    sel = json.loads((tmp_path / "ablations" / "confirm" / "selection.json").read_text())
    assert len(sel["picked"]) == 3 and not set(sel["picked"]) & {"zero_shot", "icl", "icl_cc"}
    assert "Picked from the screen alone" in text
    sittings = [json.loads(l) for l in (tmp_path / "ablations" / "screen" / "sittings.jsonl").read_text().splitlines()]
    assert sittings[0]["units"] == 2
    summary = ab.readme_summary(ab.units_of("screen"), 2)          # the README's short form, written there
    default = ab.default_line([], 1, [])
    assert default.startswith("Recommended default: pending (0 of 1 confirmation units)")
    assert readme.read_text() == f"intro\n{ab.README_MARK[0]}\n{summary}\n\n{default}\n{ab.README_MARK[1]}\nrest\n"
    assert "## Recommended default" in text and ab.RULE in text
    assert "Δ vs best" in text and "Δ vs best" in summary
    per_unit = [l for l in doc.read_text().splitlines() if l.startswith("| tiny-llama")]
    assert len(per_unit) == 2 and per_unit[0].split(" | ")[1] == "sst2/0"     # one row per unit, T beside
    assert summary.startswith("Screen, 2 of 2 units finished") and "| DT dev-T | " in summary
    assert ab.readme_summary([], 2) == "No ablation unit has finished yet."
    # REPRODUCTION.md's paper-settings rows come from these units, grad KV's columns "–" where a stage lacks it
    section = reproduction.read_text().split(ab.PAPER_SHOTS_MARK[0])[1]
    row = [l for l in section.splitlines() if "| sst2 | screen | 0,1 | 6 |" in l]
    assert len(row) == 1, section
    cells = [c.strip() for c in row[0].split("|")[1:-1]]
    assert len(cells) == 5 + len(ab.PAPER_SHOTS) + 4 and cells[10:12] == ["–", "–"] and cells[13] == "–"
    assert [int(t) in (1, 2) for t in cells[12].split(",")] == [True, True]     # dt_dev's T, per seed
    assert cells[14].startswith(("+", "-")) and "[" in cells[14] and "T in 1..2" in section
    assert "Units so fitted: none." in section                          # shots below the paper's are stated
    assert ab.paper_shots_section({"screen": [], "confirm": []}) == ""
    ab.main(["--stage", "confirm", "--quiet", "--data-dir", str(SHARED_DATA)])
    unit = json.loads(next((tmp_path / "ablations" / "confirm" / "units").glob("*.json")).read_text())
    assert set(unit["accuracy"]) == {"zero_shot", "icl", "icl_cc", "dt_fixed", "dt_dev", *sel["picked"]}
    text = (tmp_path / "ABLATIONS.md").read_text()
    assert "## Confirmation" in text and "## Recommended default" in text
    region = readme.read_text().split(ab.README_MARK[0] + "\n")[1]        # the confirmation first, then the screen
    assert region.startswith("Confirmation, 1 of 1 units finished (") and f"\n\n{summary}\n\n" in region
    assert ": sst2; seeds 3), 6 eval items each." in region and ": sst2; seeds 0, 1), 6 eval items each." in summary
    rec = text.split("## Recommended default")[1]
    assert "**`" in rec and "Pending" not in rec                       # the confirmation is complete: a verdict
    assert "Recommended default (by the rule in" in readme.read_text()
    assert "| sst2 | confirm | 3 | 6 |" in reproduction.read_text()     # the confirmation's rows beside the screen's


def _correct(right: int, n: int = 200) -> list[int]:
    return [1] * right + [0] * (n - right)


ICL, CC, GOOD, WEAK, WORSE = _correct(100), _correct(130), _correct(150), _correct(125), _correct(80)


def _synthetic_confirm(tmp_path, monkeypatch, correct_by_model):
    """The script, and confirmation units with given per-method correctness (0/1 per item), one task, one seed."""
    ab = load_benchmark("ablations")
    monkeypatch.setattr(ab, "RESULTS", tmp_path / "ablations")
    units = tmp_path / "ablations" / "confirm" / "units"
    units.mkdir(parents=True)
    for model, by_method in correct_by_model.items():
        n = len(next(iter(by_method.values())))
        rows = [{"index": i, "gold": 1, **{k: {"pred": int(v[i])} for k, v in by_method.items()}} for i in range(n)]
        stem = f"{model}__sst2__seed3"
        (units / f"{stem}.predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        acc = {k: {"sum": 100 * sum(v) / n, "norm": 100 * sum(v) / n} for k, v in by_method.items()}
        (units / f"{stem}.json").write_text(json.dumps({"model": model, "task": "sst2", "seed": 3, "accuracy": acc,
                                                        "methods": {}}))
    return ab, ab.units_of("confirm")


def test_the_recommended_default_follows_the_rule_written_before_the_confirmation(tmp_path, monkeypatch):
    # "a" beats ICL clearly and calibrated ICL on both models; "b" beats ICL but falls below calibrated ICL
    ab, units = _synthetic_confirm(tmp_path, monkeypatch, {"m1": {"icl": ICL, "icl_cc": CC, "a": GOOD, "b": WEAK},
                                                           "m2": {"icl": ICL, "icl_cc": CC, "a": GOOD, "b": WEAK}})
    assert ab.best_of(units, ["icl", "icl_cc", "zero_shot"])("m1", "sst2") == "icl_cc"   # missing keys skipped
    assert ab.best_of(units, ["a", "icl_cc"])("m2", "sst2") == "a"
    best, evidence = ab.recommend(units, ["a", "b"])
    assert best == "a" and len(evidence) == 2 and evidence[0].endswith("qualifies")
    assert not evidence[1].endswith("qualifies")
    section = ab.recommendation_section(units, 2, ["a", "b"])
    assert "**`a`**" in "\n".join(section) and section[2] == ab.RULE
    assert ab.recommendation_section(units, 3, ["a", "b"])[-1] == "Pending: 2 of 3 confirmation units have finished."


def test_without_a_reliable_method_the_default_is_the_safest_rule(tmp_path, monkeypatch):
    # "a" beats ICL on m1 only: it does not qualify; calibrated ICL is at least ICL on both -> icl_cc
    ab, units = _synthetic_confirm(tmp_path, monkeypatch, {"m1": {"icl": ICL, "icl_cc": GOOD, "a": GOOD},
                                                           "m2": {"icl": ICL, "icl_cc": ICL, "a": WORSE}})
    best, evidence = ab.recommend(units, ["a"])
    assert best == "icl_cc" and evidence[-1].startswith("- `icl_cc`: m1: +25.0")
    assert "no confirmed method beats ICL reliably" in "\n".join(ab.recommendation_section(units, 2, ["a"]))


def test_calibration_below_icl_on_one_model_leaves_icl_the_default(tmp_path, monkeypatch):
    ab, units = _synthetic_confirm(tmp_path, monkeypatch, {"m1": {"icl": ICL, "icl_cc": GOOD, "a": ICL},
                                                           "m2": {"icl": ICL, "icl_cc": WORSE, "a": ICL}})
    assert ab.recommend(units, ["a"])[0] == "icl"


def test_the_goals_name_the_closest_method_and_why_each_one_fails(tmp_path, monkeypatch):
    # grad KV clears the bar (calibrated ICL, 65.0) on m1 only; Deep-Thinking loses 10 points to ICL on m1
    ab, units = _synthetic_confirm(tmp_path, monkeypatch, {
        "m1": {"icl": ICL, "icl_cc": CC, "grad_kv": GOOD, "dt_dev": WORSE},
        "m2": {"icl": ICL, "icl_cc": CC, "grad_kv": WEAK, "dt_dev": ICL}})
    text = "\n".join(ab.goals_section("confirm", units))
    verdicts = text.split("Against the goals")[1]
    assert "- Issue 11: not met so far. Closest: `grad_kv`, ≥ 3 with the interval above 0 on 1 of 2 models " \
           "(needs 2); what fails: m2: -2.5 [" in verdicts
    dt = [l for l in verdicts.splitlines() if l.startswith("  - `dt_dev`")][0]
    assert "m1: -25.0 [" in dt and "-10.0 below ICL on m1 sst2 (more than 1)" in dt
    assert "- Issue 10: not met so far. Closest: `grad_kv`, ≥ 3 with the interval above 0 on 1 of 2 models " \
           "(needs 3)" in verdicts and "1 model(s) without units yet" in verdicts
    rows = [l for l in verdicts.splitlines() if l.startswith("| m1 |") or l.startswith("| m2 |")]  # per task
    assert rows[0].startswith("| m1 | +10.0 (65.0 ICL + CC) | – |") and rows[1].startswith("| m2 | -2.5 (65.0")


def test_a_goal_met_is_said_so(tmp_path, monkeypatch):
    ab, units = _synthetic_confirm(tmp_path, monkeypatch, {m: {"icl": ICL, "icl_cc": CC, "grad_kv": GOOD}
                                                           for m in ("m1", "m2")})
    assert "- Issue 11: met so far by `grad_kv`." in ab.goals_section("confirm", units)


def test_a_method_passing_every_model_but_losing_to_icl_on_one_task_is_told_why(tmp_path, monkeypatch):
    # the per-model test passes on both models; only the "never more than 1 point below ICL" limit fails
    ab, units = _synthetic_confirm(tmp_path, monkeypatch, {m: {"icl": ICL, "icl_cc": CC, "grad_kv": GOOD}
                                                           for m in ("m1", "m2")})
    checks = [ab.GoalCheck("grad_kv", [None, None], 2, (-1.5, "m2 sst5"), "no", "")]   # intervals unused here
    lines = ab.closest_section(units, lambda m, t: "icl", ["m1", "m2"], 2, checks, provisional=False)
    assert lines[2] == ("- Issue 11: not met. Closest: `grad_kv`, ≥ 3 with the interval above 0 on 2 of 2 models "
                        "(needs 2); what fails: -1.5 below ICL on m2 sst5 (more than 1).")


def test_methods_another_benchmark_added_to_the_units_stay_off_this_page(tmp_path, monkeypatch):
    # benchmarks/field.py adds the field's methods (lora, ...) to the confirmation's units: FIELD.md shows them
    ab, units = _synthetic_confirm(tmp_path, monkeypatch, {m: {"icl": ICL, "icl_cc": CC, "grad_kv": GOOD, "lora": GOOD}
                                                           for m in ("m1", "m2")})
    assert ab.own_methods(units) == ["icl", "icl_cc", "grad_kv"]
    for u in units:
        u["n_eval"] = 200
    text = "\n".join(ab.stage_section("confirm", units)) + ab.readme_summary(units, 2, "confirm")
    assert "| grad KV |" in text and "LoRA" not in text and "lora" not in text
