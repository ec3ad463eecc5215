"""The provenance a result carries: the git of the code that ran, and the sittings log of resumable benchmarks."""
import json
import os
import signal

import pytest

from deepthink.evaluation.provenance import Sitting, git_hash, interrupt_on_sigterm, sitting_lines, stopped_by


def test_git_hash_names_this_checkout():
    h = git_hash()
    assert h is None or len(h.removesuffix("+dirty")) == 40


def test_sittings_are_appended_and_listed_in_order(tmp_path):
    log = tmp_path / "results" / "sittings.jsonl"
    assert sitting_lines(log) == []                        # nothing run yet: no lines, no error
    first = Sitting("python bench.py --seeds 0").record(log, ["b__seed0", "a__seed0"], processes=2)
    Sitting("python bench.py --seeds 0").record(log, [])   # a resumed run that found everything done
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries[0] == first and first["done"] == ["a__seed0", "b__seed0"] and first["processes"] == 2
    assert entries[1]["units"] == 0 and entries[1]["git"] == git_hash()
    lines = sitting_lines(log)
    assert len(lines) == 2 and "2 unit(s) finished (a__seed0, b__seed0)" in lines[0]
    assert "0 unit(s) finished (none)" in lines[1] and lines[0].startswith(f"- {first['start']} – {first['end']}:")


def test_a_sitting_that_only_moved_long_units_on_says_how_far(tmp_path):
    log = tmp_path / "sittings.jsonl"
    Sitting("python bench.py").record(log, ["a__seed0"], parts=["b__seed0: zero_shot"], prompts={"c__seed0": 614})
    entry = json.loads(log.read_text())
    assert entry["units"] == 1 and entry["parts"] == ["b__seed0: zero_shot"] and entry["prompts"] == {"c__seed0": 614}
    line = sitting_lines(log)[0]
    assert "1 unit(s) finished (a__seed0), 1 part(s) of unfinished units kept (b__seed0: zero_shot), " in line
    assert "614 prompt(s) of c__seed0 answered and kept, " in line


def test_a_failed_sitting_says_what_stopped_it(tmp_path):
    log = tmp_path / "sittings.jsonl"
    err = stopped_by(ValueError("463 prefix + 78 query tokens exceed the window\nsecond line"))
    assert err == "ValueError: 463 prefix + 78 query tokens exceed the window"
    assert stopped_by(KeyboardInterrupt()) == "KeyboardInterrupt"
    Sitting("python bench.py").record(log, [], error=err)
    assert json.loads(log.read_text())["error"] == err
    assert sitting_lines(log)[0].endswith(f"; stopped by {err}")


def test_ablations_records_a_sitting_that_failed(tmp_path, monkeypatch):
    from conftest import load_benchmark

    ab = load_benchmark("ablations")
    monkeypatch.setattr(ab, "RESULTS", tmp_path / "ablations")
    (tmp_path / "ablations" / "screen" / "units").mkdir(parents=True)
    (tmp_path / "ablations" / "screen" / "units" / "earlier.json").write_text("{}")   # a resumed stage

    def fail(*a, **k):
        raise ValueError("the demonstrations do not fit")
    monkeypatch.setattr(ab, "run_units", fail)
    with pytest.raises(ValueError, match="do not fit"):
        ab.main(["--stage", "screen", "--quiet"])
    entry = json.loads((tmp_path / "ablations" / "screen" / "sittings.jsonl").read_text())
    assert entry["units"] == 0 and entry["error"] == "ValueError: the demonstrations do not fit"


def test_a_sitting_takes_the_git_hash_when_it_starts():
    # a long sitting records the code it started with, not a commit made while it ran
    git_hash.cache_clear()
    Sitting("python bench.py")
    assert git_hash.cache_info().currsize == 1


def test_a_kill_ends_a_sitting_as_an_interrupt_does():
    before = signal.getsignal(signal.SIGTERM)
    try:
        interrupt_on_sigterm()
        with pytest.raises(KeyboardInterrupt) as e:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stopped_by(e.value) == "KeyboardInterrupt: SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, before)


def test_until_reads_a_utc_time_still_to_come():
    import datetime as dt

    from deepthink.evaluation.provenance import stop_time

    now = dt.datetime(2026, 12, 8, 1, 0, tzinfo=dt.timezone.utc).timestamp()
    assert stop_time("03:05", now) - now == 2 * 3600 + 5 * 60        # later today
    assert stop_time("00:30", now) - now == 23 * 3600 + 30 * 60      # already past today: tomorrow's
    assert stop_time("2026-12-09 01:00", now) - now == 24 * 3600
    with pytest.raises(ValueError, match="already past"):
        stop_time("2026-12-08 00:59", now)
    for bad in ("3pm", "25:00", "2026-12-09T01:00", ""):
        with pytest.raises(ValueError, match="HH:MM"):
            stop_time(bad, now)


def test_a_sitting_ends_itself_at_its_until_time_and_the_timer_goes_with_it():
    import time

    from deepthink.evaluation.provenance import interrupt_at

    before = signal.getsignal(signal.SIGALRM)
    with pytest.raises(KeyboardInterrupt) as e:
        with interrupt_at(time.time() + 0.2):
            time.sleep(30)                          # the interrupt comes long before this ends
    assert stopped_by(e.value).startswith("KeyboardInterrupt: --until ") and str(e.value).endswith(" UTC reached")
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and signal.getsignal(signal.SIGALRM) == before
    with interrupt_at(time.time() + 60):            # left in time: nothing fires later
        pass
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with interrupt_at(None):                        # no --until: no timer at all
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
