"""Careless input on the command line: nothing a user has is overwritten or half-written, every message says what
the path really is, a failed run leaves no empty folder, and Ctrl-C while the libraries load is a clean exit."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepthink import io as dio
from deepthink.cli import main
from conftest import REPO

TUNE = ["--method", "forward", "--task", "sentiment-demo", "--seed", "0", "--shots", "1", "--steps", "2"]


@pytest.fixture(scope="module")
def ctx_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ctx") / "sentiment"
    assert main(["tune", "--model", str(tiny_model_dir), *TUNE, "--out", str(out)]) == 0
    return out


def error(capsys, *argv) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"deepthink {argv[0]}: error: ") and "Traceback" not in err, err
    return last


@pytest.mark.parametrize("spelling", ["same", "dot", "link"])
def test_predict_refuses_to_write_over_its_input(ctx_dir, tmp_path, capsys, spelling):
    queries = tmp_path / "a.txt"
    queries.write_text("a gorgeous movie\nboilerplate\n")
    out = {"same": queries, "dot": tmp_path / "." / "a.txt", "link": tmp_path / "link.txt"}[spelling]
    if spelling == "link":
        out.symlink_to(queries)
    msg = error(capsys, "predict", "--context", ctx_dir, "--input", queries, "--output", out)
    assert "is the --input file" in msg
    assert queries.read_text() == "a gorgeous movie\nboilerplate\n"          # the queries are untouched


def test_predict_output_is_whole_or_absent_when_the_disk_fills(ctx_dir, tmp_path, capsys, monkeypatch):
    queries = tmp_path / "q.txt"
    queries.write_text("a gorgeous movie\nboilerplate\n")
    out = tmp_path / "preds.jsonl"
    out.write_text("what the user had\n")
    real = os.fdopen

    class Full:
        """A file that takes a few bytes and then reports a full disk, as a real one would."""
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dio.os, "fdopen", lambda fd, mode: Full(real(fd, mode)))
    msg = error(capsys, "predict", "--context", ctx_dir, "--input", queries, "--output", out)
    assert "No space left" in msg
    assert out.read_text() == "what the user had\n"                          # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl", "q.txt"]   # no temporary left
    monkeypatch.setattr(dio.os, "fdopen", real)
    assert main(["predict", "--context", str(ctx_dir), "--input", str(queries), "--output", str(out)]) == 0
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1]


def test_paths_that_are_not_files_are_named_for_what_they_are(ctx_dir, tiny_model_dir, tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert "is a folder: give a file" in error(capsys, "predict", "--context", ctx_dir, "--input", tmp_path)
    assert "not a regular file" in error(capsys, "predict", "--context", ctx_dir, "--input", fifo)
    assert "does not exist" in error(capsys, "predict", "--context", ctx_dir, "--input", tmp_path / "nope.txt")
    tune = ["tune", "--model", tiny_model_dir, "--method", "forward", "--steps", "2"]
    assert "is a folder: give a file" in error(capsys, *tune, "--demos", tmp_path, "--out", tmp_path / "c1")
    assert "not a regular file" in error(capsys, *tune, "--demos", fifo, "--out", tmp_path / "c2")
    assert "is a folder" in error(capsys, "predict", "--context", ctx_dir, "--input", fifo, "--output", tmp_path)


def test_a_failed_eval_leaves_no_empty_output_folder(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    msg = error(capsys, "eval", "--model", tmp_path / "no-such-model", "--task", "sentiment-demo", "--out", out)
    assert "unknown model" in msg
    assert not (tmp_path / "new").exists()                  # neither the folder nor the parent it had to create
    kept = tmp_path / "mine"
    (kept / "units").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    error(capsys, "eval", "--model", tmp_path / "no-such-model", "--task", "sentiment-demo", "--out", kept)
    assert (kept / "notes.txt").read_text() == "mine" and (kept / "units").is_dir()   # a folder the user had


def test_ctrl_c_while_the_libraries_load_exits_cleanly(tiny_model_dir, tmp_path):
    """SIGINT while torch is being imported (seen in -X importtime's log): exit 130 and one line, no traceback."""
    log = tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "deepthink", "predict", "--context",
                                 str(tmp_path), "--input", "-"], stdin=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.time() + 120
        while time.time() < deadline and "torch." not in log.read_text():     # torch's own modules are loading
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    text = "\n".join(line for line in log.read_text().splitlines() if not line.startswith("import time:"))
    assert code == 130 and "Traceback" not in text, text
    assert text.strip().splitlines()[-1].startswith("deepthink"), text


def test_a_lone_surrogate_in_the_input_is_named_by_line_and_field(ctx_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n')
    msg = error(capsys, "predict", "--context", ctx_dir, "--input", rows, "--choices", "a,b")
    assert "line 2, field 'text'" in msg and "lone surrogate U+D800" in msg
    assert "lone surrogate" in error(capsys, "predict", "--context", ctx_dir, "--input", rows)


def test_tune_checks_the_model_record_before_tuning(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A model record the save would refuse stops tune before any tuning step, not after all of them."""
    from deepthink import api, context

    real = context.model_record
    monkeypatch.setattr(context, "model_record", lambda lm: {**real(lm), "fingerprint": "not-a-fingerprint"})
    monkeypatch.setattr(api, "run", lambda *a, **k: pytest.fail("tuning ran"))
    msg = error(capsys, "tune", "--model", tiny_model_dir, *TUNE, "--out", tmp_path / "c")
    assert "model.fingerprint" in msg and not (tmp_path / "c").exists()


def test_a_dev_size_larger_than_the_data_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    """--dev-size 100000000 on sst2 used all 67k training rows as dev items, scored at each of the 15 steps."""
    msg = error(capsys, "tune", "--model", tmp_path / "never-loaded", "--task", "sst2", "--dev-size", "100000000",
                "--out", tmp_path / "c")
    assert "--dev-size 100000000: only 67347 rows are left" in msg and "give at most 67347" in msg
