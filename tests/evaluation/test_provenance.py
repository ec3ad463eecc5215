"""The provenance a result carries: the git of the code that ran, and the sittings log of resumable benchmarks."""
import json

from deepthink.evaluation.provenance import Sitting, git_hash, sitting_lines


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
