"""The README's "your own data" commands, run exactly as written (bash, in an empty folder) on a tiny model:
DEEPTHINK_MODEL points the commands' default model at it, and nothing else is changed."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

MARK = re.compile(r"<!-- own-data:.*?-->\n```bash\n(.*?)```\n<!-- /own-data -->", re.S)


def readme_commands() -> str:
    found = MARK.findall((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(found) == 1, "the README must hold one own-data block between its markers"
    return found[0]


def test_your_own_data_runs_as_written(tiny_model_dir, tmp_path):
    script = readme_commands()
    assert "--model" not in script                    # the block is what a user types: the default model
    bin_dir = Path(sys.executable).parent             # the venv's `deepthink` command
    env = {**os.environ, "DEEPTHINK_MODEL": str(tiny_model_dir), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("saved ctx/tickets: ")       # tune's one line, then predict's JSON
    rows = [json.loads(line) for line in lines[1:]]
    # predict on new.jsonl (2 tickets), then from another folder on stdin (1 ticket): the task came from the context
    assert [r["index"] for r in rows] == [0, 1, 0]
    assert all(r["choices"] == [" low", " medium", " high"] and r["answer"] in r["choices"] for r in rows)
    assert rows[2]["query"] == rows[0]["query"] == "Ticket: Payments are failing for everyone\nUrgency:"
    assert "step 15/15" in done.stderr                 # tune's progress, every step
    assert (tmp_path / "elsewhere" / "tickets" / "context.json").is_file()
