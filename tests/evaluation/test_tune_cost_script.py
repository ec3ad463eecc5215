"""benchmarks/tune_cost.py on the tests' tiny random Llama (CPU, few updates): a row per method with its cost, a
method that raises reported as "fails: ..." while the others run, and --time-limit stopping a method with the
updates it did."""
from __future__ import annotations

import json

import pytest

from conftest import load_benchmark


def _run(tmp_path, capsys, *extra):
    tc = load_benchmark("tune_cost")
    summary = tc.main(["--threads", "1", "--shots", "1", "--dev-size", "2", "--steps", "3", "--epochs", "2",
                       "--out", str(tmp_path), *extra])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == summary
    return summary, out, json.loads((tmp_path / "tune_cost.json").read_text())


def test_a_row_per_method_with_its_cost(tmp_path, capsys):
    summary, out, stored = _run(tmp_path, capsys, "--methods", "grad_kv", "ct_kv", "lora")
    (entry,) = stored.values()
    assert list(entry["methods"]) == ["grad_kv", "ct_kv", "lora"]
    updates = {"grad_kv": 2, "ct_kv": 2, "lora": 3}          # T - 1, E, steps
    for m, row in entry["methods"].items():
        assert row["status"] == "ok" and row["seconds"] > 0 and row["s_per_update"] > 0
        assert row["updates"] == updates[m]
        assert row["memory"]["peak_mb"] > 0 and row["memory"]["growth_mb"] >= 0
        assert row["artifact_bytes"] > 0
    assert entry["methods"]["grad_kv"]["artifact_bytes"] == entry["methods"]["ct_kv"]["artifact_bytes"]  # one cache
    assert entry["methods"]["lora"]["artifact_bytes"] < entry["methods"]["grad_kv"]["artifact_bytes"]
    assert sum(line.startswith(("grad_kv:", "ct_kv:", "lora:")) for line in out) == 3
    assert "| ct_kv | epochs=2 |" in (tmp_path / "tune_cost.md").read_text()
    # a second run of the same settings replaces its methods' rows and keeps the others
    _run(tmp_path, capsys, "--methods", "grad_kv")
    (entry,) = json.loads((tmp_path / "tune_cost.json").read_text()).values()
    assert list(entry["methods"]) == ["grad_kv", "ct_kv", "lora"]
    # another draw size sits beside it (the GPU record holds 4 and 8 per class of one shape)
    tc = load_benchmark("tune_cost")
    tc.main(["--threads", "1", "--shots", "2", "--dev-size", "2", "--steps", "3", "--methods", "grad_kv",
             "--out", str(tmp_path)])
    stored = json.loads((tmp_path / "tune_cost.json").read_text())
    assert sorted(e["shots"] for e in stored.values()) == [1, 2]
    assert list(stored[next(k for k in stored if k.endswith("1 per class"))]["methods"]) == ["grad_kv", "ct_kv", "lora"]


def test_a_failing_method_is_reported_and_the_next_runs(tmp_path, capsys, monkeypatch):
    from deepthink.methods.ctkv import CTKV

    def broken(self, setup):
        raise RuntimeError("CUDA error: something broke\nsecond line")

    monkeypatch.setattr(CTKV, "prepare", broken)
    summary, out, _ = _run(tmp_path, capsys, "--methods", "ct_kv", "grad_kv")
    failed = summary["methods"]["ct_kv"]
    assert (failed["status"], failed["updates"]) == ("fails", 0) and "artifact_bytes" not in failed
    assert failed["reason"] == "RuntimeError: CUDA error: something broke"
    assert summary["methods"]["grad_kv"]["status"] == "ok" and summary["methods"]["grad_kv"]["updates"] == 2
    assert any(line.startswith("ct_kv: fails: RuntimeError: CUDA error: something broke") for line in out)
    assert "| ct_kv | epochs=2 | fails: RuntimeError: CUDA error: something broke |" in \
        (tmp_path / "tune_cost.md").read_text()


def test_time_limit_stops_a_method_with_the_updates_done(tmp_path, capsys):
    # lora reports no progress before its first update: the first check is after it, whatever the machine's speed
    summary, out, stored = _run(tmp_path, capsys, "--methods", "lora", "--time-limit", "0.000001")
    row = summary["methods"]["lora"]
    assert row["status"] == "over time" and row["updates"] == 1 and row["s_per_update"] > 0
    assert "lora: > 1e-06 s (1 updates done)" in "\n".join(out)
    assert "> 1e-06 s (1 updates done) | 1 |" in (tmp_path / "tune_cost.md").read_text()


def test_bad_options_are_refused_with_one_line(tmp_path, capsys):
    import pytest

    tc = load_benchmark("tune_cost")
    for argv, says in ((["--methods", "nope"], "unknown method 'nope'"), (["--time-limit", "0"], "must be > 0"),
                       (["--steps", "0"], "must be >= 1"), (["--task", "nope"], "nope")):
        with pytest.raises(SystemExit) as e:
            tc.main([*argv, "--out", str(tmp_path)])
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_options_per_method_and_variant(tmp_path, capsys):
    summary, out, stored = _run(tmp_path, capsys, "--methods", "grad_kv", "grad_kv@ckpt",
                                "-o", "grad_kv@ckpt.checkpointing=true")
    (entry,) = stored.values()
    assert entry["methods"]["grad_kv@ckpt"]["options"] == {"steps": 3, "checkpointing": True}
    assert entry["methods"]["grad_kv"]["options"] == {"steps": 3}
    assert all(r["status"] == "ok" for r in entry["methods"].values())


def test_bad_option_is_refused(tmp_path, capsys):
    tc = load_benchmark("tune_cost")
    for bad, says in ((["-o", "grad_kv.nonsense=1"], "nonsense"), (["-o", "lora.steps=2"], "not among --methods"),
                      (["-o", "grad_kv"], "METHOD.OPTION=VALUE")):
        with pytest.raises(SystemExit) as e:
            tc.main(["--methods", "grad_kv", "--out", str(tmp_path), *bad])
        assert e.value.code == 2 and says in capsys.readouterr().err
