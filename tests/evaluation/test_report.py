"""The report from saved units: the verdict line per task, labelled summaries, methods that do not apply."""
import json

import pytest

from deepthink.evaluation.report import format_table, load_units, summarize, verdicts, write_report

N = 50


def save_unit(out, task, seed, correct: dict, not_applicable: dict | None = None):
    """A finished unit in OUT/units as the runner writes it, from per-method lists of 0/1 (right/wrong) per item."""
    units = out / "units"
    units.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(correct.values())))
    rows = [{"model": "m", "task": task, "seed": seed, "split": "eval", "index": i, "gold": 0,
             **{k: {"logprob": [0.0, 0.0], "pred": 0 if c[i] else 1} for k, c in correct.items()}} for i in range(n)]
    methods = {k: {} for k in correct}
    for k, why in (not_applicable or {}).items():
        methods[k] = {"not_applicable": why}
    unit = {"model": "m", "task": task, "seed": seed, "n_eval": n, "methods": methods,
            "accuracy": {k: {"sum": 100 * sum(c) / n, "norm": 100 * sum(c) / n} for k, c in correct.items()}}
    (units / f"m__{task}__seed{seed}.predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (units / f"m__{task}__seed{seed}.json").write_text(json.dumps(unit))


def right(k: int, n: int = N, start: int = 0) -> list[int]:
    """k right answers among n items, from item `start` on (wrapping)."""
    return [int((i - start) % n < k) for i in range(n)]


def test_verdict_says_when_zero_shot_beats_every_method(tmp_path):
    """The sst2 finding of issue 27: zero-shot 82, ICL 72, grad KV 78 and nothing said. Now one line says it."""
    for seed in (0, 1):
        save_unit(tmp_path, "sst2", seed, {"zero_shot": right(41), "icl": right(36), "grad_kv": right(39)})
    (v,) = verdicts(load_units([tmp_path]))
    assert v["zero_shot_wins"] and v["best"] == "grad_kv" and v["beats_reference"]      # it beats ICL, not zero-shot
    assert v["line"].startswith("m sst2: zero-shot wins (82.0): it beats every method, ICL (72.0) included; "
                                "best method grad KV 78.0, +6.0 [")
    iv = v["best_vs_reference"]
    assert iv["mean"] == pytest.approx(6.0) and iv["low"] <= 6.0 <= iv["high"]
    assert v["line"].endswith(f"[{iv['low']:+.1f}, {iv['high']:+.1f}] vs ICL")


def test_verdict_names_the_method_that_beats_icl_with_its_interval(tmp_path):
    # grad KV right wherever ICL is, and on 20 items more per seed: every paired difference is >= 0
    for seed in (0, 1):
        save_unit(tmp_path, "sst2", seed, {"zero_shot": right(10, start=30), "icl": right(25),
                                           "dt_dev": right(26, start=10), "grad_kv": right(45)})
    (v,) = verdicts(load_units([tmp_path]))
    iv = v["best_vs_reference"]
    assert v["best"] == "grad_kv" and v["beats_reference"] and not v["zero_shot_wins"]
    assert iv["mean"] == pytest.approx(40.0) and 0 < iv["low"] < 40 < iv["high"]
    assert v["line"] == f"m sst2: best method grad KV 90.0 beats ICL (50.0) by +40.0 [{iv['low']:+.1f}, " \
                        f"{iv['high']:+.1f}]"


def test_verdict_says_no_method_beats_icl_when_the_interval_includes_zero(tmp_path):
    # grad KV gets 3 items right that ICL misses and misses 1 that ICL gets: +2 points, not significant
    icl = right(30)
    grad = list(icl)
    grad[29], grad[30], grad[31], grad[32] = 0, 1, 1, 1
    save_unit(tmp_path, "mr", 0, {"zero_shot": right(20), "icl": icl, "grad_kv": grad})
    (v,) = verdicts(load_units([tmp_path]))
    iv = v["best_vs_reference"]
    assert v["best"] == "grad_kv" and not v["beats_reference"] and iv["low"] <= 0 <= iv["high"]
    assert v["line"].startswith("m mr: no method beats ICL (60.0): best method grad KV 64.0, +4.0 [")
    assert v["line"].endswith("vs ICL (the interval includes 0)")


def test_report_files_hold_the_verdict_labelled_summaries_and_dashes(tmp_path):
    """results.json's summary says which number is the mean and which the std (it held bare [82.0, null] pairs);
    a method not applicable to a task is "–" with a footnote; report.txt holds what was printed."""
    run = tmp_path / "run"
    save_unit(run, "sst2", 0, {"zero_shot": right(41), "icl": right(36), "icl_cc": right(40), "grad_kv": right(39)})
    save_unit(run, "copa", 0, {"zero_shot": right(20), "icl": right(25), "grad_kv": right(30)},
              not_applicable={"icl_cc": "calibration needs one set of choices shared by every item, but ..."})
    printed = []
    res = write_report([run], tmp_path / "out", log=printed.append)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    sst2 = [r for r in saved["summary"]["sum"] if r["task"] == "sst2"][0]
    assert sst2["zero_shot"] == {"mean": 82.0, "std": None} and sst2["icl_cc"] == {"mean": 80.0, "std": None}
    copa = [r for r in saved["summary"]["sum"] if r["task"] == "copa"][0]
    assert copa["icl_cc"] is None and copa["grad_kv"] == {"mean": 60.0, "std": None}
    assert [v["line"] for v in saved["verdict"]] == [v["line"] for v in res["verdict"]]
    text = (tmp_path / "out" / "report.txt").read_text()
    assert text.strip() == printed[0].strip()
    lines = text.splitlines()
    (head,) = [l for l in lines if l.startswith("model ")][:1]
    (copa_row,) = [l for l in lines if l.startswith("m      copa")][:1]
    assert copa_row[head.index("ICL + CC")] == "–"
    assert "– ICL + CC: not applicable to copa (calibration needs one set of choices shared by every item" in text
    assert "m sst2: zero-shot wins (82.0)" in text and "m copa: best method grad KV 60.0 beats ICL (50.0)" in text


def test_old_units_without_not_applicable_keep_their_tables(tmp_path):
    save_unit(tmp_path, "sst2", 0, {"zero_shot": right(41), "icl": right(36)})
    rows = summarize(load_units([tmp_path]))
    assert format_table(rows).splitlines()[1].split() == ["model", "task", "seeds", "n", "zero-shot", "ICL"]
