"""benchmarks/selection.py's replay (issue 31) on constructed oracle files: each rule's T read from per-item dev
outcomes, its eval outcome from the oracle, paired with the unit's ICL and calibrated ICL; the screen's choice made
by the written rule before the confirmation is read."""
import json

import pytest

from conftest import load_benchmark


def bits(n_right: int, n: int, first: int = 0) -> str:
    """n items, those in [first, first + n_right) right."""
    return "".join("1" if first <= i < first + n_right else "0" for i in range(n))


def write_unit(sel, stage, task, seed, dev, ev, icl, icl_cc, chosen):
    """An ablation unit (ICL, calibrated ICL and grad_kv's per-item outcomes) and its oracle file."""
    unit = sel.ABLATIONS / stage / "units" / f"m__{task}__seed{seed}.json"
    unit.parent.mkdir(parents=True, exist_ok=True)
    n = len(ev[0])
    unit.write_text(json.dumps({"model": "m", "task": task, "seed": seed, "eval_indices": list(range(100, 100 + n))}))
    rows = [{"index": 100 + i, "gold": 1, "icl": {"pred": int(icl[i])}, "icl_cc": {"pred": int(icl_cc[i])},
             sel.METHOD: {"pred": int(ev[chosen - 1][i])}} for i in range(n)]
    unit.with_suffix(".predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    step = lambda c: {"correct": c, "gold_logp": [-0.5] * len(c), "margin": [0.1] * len(c)}
    curve = [100 * d.count("1") / len(d) for d in dev]
    oracle = sel.oracle_path(stage, "m", task, seed)
    oracle.parent.mkdir(parents=True, exist_ok=True)
    oracle.write_text(json.dumps({
        "label": sel.LABEL, "model": "m", "task": task, "seed": seed, "dev": [step(d) for d in dev],
        "pool": [step(d) for d in dev], "eval": ev,
        "check": {"dev_match": True, "chosen_stored": chosen, "chosen_recomputed": chosen, "dev_curve_stored": curve,
                  "dev_curve_recomputed": curve, "eval_items_off_at_T1_vs_icl": 0}}))


@pytest.fixture
def sel(tmp_path, monkeypatch):
    sel = load_benchmark("selection")
    monkeypatch.setattr(sel, "ABLATIONS", tmp_path / "ablations")
    monkeypatch.setattr(sel, "RESULTS", tmp_path / "selection")
    monkeypatch.setattr(sel, "MARKDOWN", tmp_path / "SELECTION.md")
    monkeypatch.setattr(sel, "TASKS", ["sst2", "mr"])
    monkeypatch.setattr(sel, "STAGES", {"screen": dict(models=["m"], seeds=[0]),
                                        "confirm": dict(models=["m"], seeds=[3])})
    return sel


def fill(sel, stage, seed):
    # sst2: dev-acc leaves T = 1 for two dev items (wins 2, losses 0: p = 0.25) and loses 4 of 20 eval items
    write_unit(sel, stage, "sst2", seed, dev=[bits(5, 10), bits(7, 10), bits(5, 10)],
               ev=[bits(10, 20), bits(6, 20), bits(10, 20)], icl=bits(10, 20), icl_cc=bits(0, 20), chosen=2)
    # mr: a clear dev gain (wins 8, losses 0: p = 2**-8) that holds on eval (+6 of 20); calibrated ICL 12 of 20
    write_unit(sel, stage, "mr", seed, dev=[bits(2, 10), bits(10, 10), bits(2, 10)],
               ev=[bits(10, 20), bits(16, 20), bits(10, 20)], icl=bits(10, 20), icl_cc=bits(12, 20), chosen=2)


def row(text: str, section: str, name: str) -> list[str]:
    part = text.split(section)[1].split("\n## ")[0]
    line = next(l for l in part.splitlines() if l.startswith(f"| {name} |"))
    return [c.strip() for c in line.split("|")[1:-1]]


def test_replay_pairs_each_rule_with_icl_and_the_bar_and_chooses_on_the_screen(sel):
    fill(sel, "screen", 0)
    sel.main(["--write-only"])
    text = sel.MARKDOWN.read_text()
    assert "No rule is chosen until the screen is complete" not in text and sel.LABEL in text
    acc = row(text, "## Screen", "dev-acc")
    # dev-acc: sst2 -20, mr +30 -> +5 vs ICL; vs the bar (ICL on sst2, calibrated ICL on mr: +20) -> 0
    assert acc[1].startswith("+5.0 [") and acc[2].startswith("+0.0 [")
    assert acc[5].startswith("-20.0 (m sst2)") and acc[6].startswith("-20.0 (m sst2/0 (T=2))") and acc[7] == "0 of 2"
    guarded = row(text, "## Screen", "dev-mcnemar@0.1")
    assert guarded[1].startswith("+15.0 [") and guarded[2].startswith("+10.0 [") and guarded[7] == "1 of 2"
    assert guarded[5].startswith("+0.0")
    assert "Chosen on the screen: **dev-mcnemar@0.05**." in text            # safe, best vs bar, first of the ties
    assert "matches the unit's stored one within one dev item at every step in 2 of 2 units" in text
    assert row(text, "## Screen", "dev-acc/128")                             # the larger dev split is replayed too
    assert "Read only once the screen has chosen a rule." not in text
    assert "No confirm oracle unit has been recorded yet." in text


def test_the_confirmation_is_read_only_after_the_screen_and_checked_against_the_goal(sel):
    fill(sel, "confirm", 3)
    sel.main(["--write-only"])
    text = sel.MARKDOWN.read_text()
    assert "No rule is chosen until the screen is complete" in text and "Read only once the screen" in text
    assert "dev-mcnemar" not in text.split("## Confirmation")[1]
    fill(sel, "screen", 0)
    sel.main(["--write-only"])
    text = sel.MARKDOWN.read_text()
    assert row(text, "## Confirmation", "dev-mcnemar@0.05")[1].startswith("+15.0 [")
    assert "worst (model, task) mean of dev-mcnemar@0.05 vs ICL +0.0" in text and "**met**" in text
    # against today's default on the same items: sst2 +20 (T = 1 against dev-acc's T = 2), mr 0 (both T = 2)
    product = next(l for l in text.splitlines() if l.startswith("Product"))
    assert "dev-mcnemar@0.05 − dev-acc, paired: m +10.0 [" in product and "against -20.0" in product
    assert product.endswith("**the default becomes dev-mcnemar@0.05**.") and "provisional" not in product


def test_the_default_stays_when_the_chosen_rule_loses_to_it_on_the_confirmation(sel):
    fill(sel, "screen", 0)
    # sst2 on the confirmation: dev-acc's T = 2 now wins 4 eval items that the guarded rule's T = 1 loses
    write_unit(sel, "confirm", "sst2", 3, dev=[bits(5, 10), bits(7, 10), bits(5, 10)],
               ev=[bits(10, 20), bits(14, 20), bits(10, 20)], icl=bits(10, 20), icl_cc=bits(0, 20), chosen=2)
    sel.main(["--write-only"])
    product = next(l for l in sel.MARKDOWN.read_text().splitlines() if l.startswith("Product"))
    assert "(provisional: the confirmation is not complete)" in product        # mr of seed 3 is missing
    assert "m -20.0 [" in product and product.endswith("**the default stays dev-acc**.")


def test_replay_refuses_a_larger_dev_split_that_was_not_recorded(sel):
    fill(sel, "screen", 0)
    case = next(c for c in sel.load_cases("screen") if c["task"] == "sst2")
    case["pool"] = ([], [])
    with pytest.raises(ValueError, match="no pool items were recorded"):
        sel.replay(case, "dev-acc", 0.1, "dev+pool")
    assert sel.replay(case, "dev-mcnemar", 0.1, "dev") == 1


def test_recorder_reproduces_an_ablation_unit_on_a_tiny_model(sel, tiny_model_dir, tmp_path, monkeypatch):
    """The oracle of a unit made by benchmarks/ablations.py: the same draw, the same dev curve, step 1's eval
    outcomes those of the unit's ICL; labelled an oracle; a second run finds it done (resumable)."""
    from conftest import SHARED_DATA

    ab = load_benchmark("ablations")
    model = str(tiny_model_dir)
    monkeypatch.setattr(ab, "RESULTS", sel.ABLATIONS)
    monkeypatch.setattr(ab, "MARKDOWN", tmp_path / "ABLATIONS.md")
    for name in ("README", "GRADIENT_DOC"):
        monkeypatch.setattr(ab, name, tmp_path / f"{name}.md")
    monkeypatch.setattr(ab, "TASKS", ["sst2"])
    monkeypatch.setattr(ab, "SHOTS", {"sst2": 1})
    monkeypatch.setattr(ab, "GRID", {"icl": {}, "icl_cc": {}, sel.METHOD: {"lr": 0.05, "steps": 3}})
    monkeypatch.setattr(ab, "STAGES", {"screen": dict(models=[model], seeds=[0], max_eval=6, dev_size=4),
                                       "confirm": dict(models=[model], seeds=[3], max_eval=6, dev_size=4)})
    monkeypatch.setattr(ab, "CURVE_UNITS", set())
    ab.main(["--stage", "screen", "--quiet", "--data-dir", str(SHARED_DATA)])
    monkeypatch.setattr(sel, "TASKS", ["sst2"])
    monkeypatch.setattr(sel, "STAGES", {"screen": dict(models=[model], seeds=[0]),
                                        "confirm": dict(models=[model], seeds=[])})
    monkeypatch.setattr(sel, "POOL", 5)
    lines = []
    done = sel.record(sel.jobs_of(["screen"]), data_dir=str(SHARED_DATA), pool_size=5, log=lines.append)
    rec = json.loads(sel.oracle_path("screen", model, "sst2", 0).read_text())
    assert len(done) == 1 and rec["label"] == sel.LABEL and rec["steps"] == 3 and rec["n_pool"] == 5
    assert rec["check"]["dev_match"] and rec["check"]["dev_items_off"] == [0, 0, 0]
    assert rec["check"]["eval_items_off_at_T1_vs_icl"] == 0 and rec["check"]["eval_items_off_at_chosen_vs_unit"] == 0
    assert [len(e) for e in rec["eval"]] == [6] * 3 and [len(d["correct"]) for d in rec["pool"]] == [5] * 3
    unit = json.loads((sel.ABLATIONS / "screen" / "units").glob("*.json").__next__().read_text())
    taken = set(unit["dev_indices"]) | {e["index"] for e in unit["demonstrations"]["items"]}
    assert not set(rec["pool_indices"]) & taken
    assert sel.record(sel.jobs_of(["screen"]), data_dir=str(SHARED_DATA), pool_size=5, log=lines.append) == []
    assert "1 of 1 oracle units already recorded" in lines[-1]


def test_a_larger_pool_draw_begins_with_the_smaller_one(sel):
    """The first unit recorded 192 pool items, the rest 64: the replay reads the first 64 of each, which must be the
    64-item draw."""
    from conftest import SHARED_DATA
    from deepthink.data import make_plan

    plan = make_plan("sst5", 3, shots=2, dev_size=64, max_eval=10, data_dir=SHARED_DATA)
    big, small = sel.pool_items(plan, 3, 192, SHARED_DATA), sel.pool_items(plan, 3, 64, SHARED_DATA)
    assert [e.index for e in big[:64]] == [e.index for e in small] and len(big) == 192
    assert not {e.index for e in big} & ({e.index for e in plan.dev} | {e.index for e in plan.demos})
