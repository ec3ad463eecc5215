"""Data-parallel evaluation: 2 CPU processes (gloo) started by accelerate give the single-process files."""
import json
import os
import re
import subprocess
import sys
import time

import psutil
import pytest

from deepthink.cli import main
from conftest import assert_same_json, free_port, method_results

ARGS = ["--seeds", "0", "1", "--shots", "1", "--steps", "3", "--dev-size", "4", "--max-eval", "6", "--quiet",
        "--curve"]


def launch(model_dir, out, tasks, seeds=("0", "1"), log=None):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "deepthink", "eval", "--model", str(model_dir),
           "--task", *tasks, *ARGS, "--seeds", *seeds, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if log:                                    # in the background, into a file: an unread pipe could block it
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def kill_all(proc):
    """SIGKILL the launcher and every process it started. torch's elastic agent starts each worker in a session
    of its own, so a killpg of the launcher's group would leave the workers running (and finishing the units)."""
    launcher = psutil.Process(proc.pid)
    workers = launcher.children(recursive=True)
    for p in [launcher, *workers]:             # the launcher first: it must not see a worker die and restart it
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, alive


def single(model_dir, out, tasks, seeds=("0", "1")):
    assert main(["eval", "--model", str(model_dir), "--task", *tasks, *ARGS, "--seeds", *seeds,
                 "--out", str(out)]) == 0


def assert_same_runs(a, b, report=True):
    files_a = sorted(p.name for p in (a / "units").iterdir())
    assert files_a == sorted(p.name for p in (b / "units").iterdir()) and files_a
    for name in files_a:
        if name.endswith(".predictions.jsonl"):
            ra = [json.loads(l) for l in (a / "units" / name).read_text().splitlines()]
            rb = [json.loads(l) for l in (b / "units" / name).read_text().splitlines()]
            assert len(ra) == len(rb)
            for x, y in zip(ra, rb):
                for key, val in x.items():
                    if isinstance(val, dict):
                        assert val["pred"] == y[key]["pred"]
                        assert val["logprob"] == pytest.approx(y[key]["logprob"], abs=1e-5)
                    else:
                        assert val == y[key]
        else:
            ua, ub = (json.loads((d / "units" / name).read_text()) for d in (a, b))
            for u in (ua, ub):
                for timed in ("wall_s", "environment", "memory_mb", "scoring"):   # seconds and bytes held differ
                    u.pop(timed)
                u["methods"] = method_results(u)
            # floats within 1e-5 relative: two processes sum in another order; and within 1.5e-4 absolute, since a
            # unit writes its dev items' log-probabilities rounded to 4 decimals, where that noise at a rounding
            # boundary moves one by 1e-4 (-6.4363 on one process against -6.4364 on two, seen on a fresh clone)
            assert_same_json(ua, ub, abs=1.5e-4, where=name)
    assert (b / "results.json").exists() or not report


def test_units_divided_among_two_processes(tiny_model_dir, tmp_path):
    single(tiny_model_dir, tmp_path / "one", ["sentiment-demo", "sst2"])
    launch(tiny_model_dir, tmp_path / "two", ["sentiment-demo", "sst2"])
    assert_same_runs(tmp_path / "one", tmp_path / "two")


def test_items_divided_when_units_are_fewer_than_processes(tiny_model_dir, tmp_path):
    single(tiny_model_dir, tmp_path / "one", ["sentiment-demo"], seeds=("0",))
    launch(tiny_model_dir, tmp_path / "two", ["sentiment-demo"], seeds=("0",))
    assert_same_runs(tmp_path / "one", tmp_path / "two")


def test_interrupted_launch_resumes_to_the_same_files(tiny_model_dir, tmp_path):
    tasks, seeds = ["sentiment-demo", "sst2", "mr"], ("0", "1", "2")
    out = tmp_path / "two"
    with open(tmp_path / "first.log", "w") as log:
        proc = launch(tiny_model_dir, out, tasks, seeds, log=log)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not list((out / "units").glob("*seed?.json")):
            time.sleep(0.05)
        kill_all(proc)                                 # every process, mid-run
    partial = list((out / "units").glob("*seed?.json"))
    assert 1 <= len(partial) < 9, (tmp_path / "first.log").read_text()[-3000:]  # after some units, before the last
    launch(tiny_model_dir, out, tasks, seeds)          # resume
    single(tiny_model_dir, tmp_path / "one", tasks, seeds)
    assert_same_runs(tmp_path / "one", out)
    again = launch(tiny_model_dir, out, tasks, seeds)  # nothing left: every process exits cleanly
    assert "all 9 units already done" in again.stdout + again.stderr


UNITS_SCRIPT = """
import json, sys
from deepthink.evaluation import EvalConfig, run_units
from deepthink.evaluation.distributed import Processes
model, out = sys.argv[1:3]
methods = {"icl": {}, "dt_fixed": {"steps": 2}, "dt_dev": {"steps": 2}}
cfg = {"sentiment-demo": EvalConfig(shots=1, dev_size=4, max_eval=6, methods=methods),
       "sst2": EvalConfig(shots=2, dev_size=4, max_eval=5, methods=methods)}      # a config per task
jobs = [(model, t, s, cfg[t]) for s in (0, 1) for t in cfg]
with Processes() as procs:      # leaves the process group cleanly at the end
    ran = run_units(jobs, out, progress=False, log=lambda *a: None, procs=procs)
sys.stdout.write("RAN " + json.dumps(sorted(map(list, ran))) + "\\n")   # one write: the processes share stdout
"""


def test_benchmark_units_with_their_own_configs_are_divided_whole(tiny_model_dir, tmp_path):
    """run_units (what reproduce.py and ablations.py run on): under a 2-process launch each unit runs whole on
    one process, every unit once, and the files equal a single-process run's."""
    script = tmp_path / "units.py"
    script.write_text(UNITS_SCRIPT)
    one = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(script), str(tiny_model_dir), str(tmp_path / "two")]
    two = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    ran = [json.loads(r) for r in re.findall(r"RAN (\[.*?\]\])", two.stdout)]
    assert len(ran) == 2 and all(ran)                                  # both processes had work
    units = [tuple(u) for r in ran for u in r]
    assert len(units) == len(set(units)) == 4                          # each unit on exactly one process
    assert_same_runs(tmp_path / "one", tmp_path / "two", report=False)
    again = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=600)                                # nothing left: both exit cleanly
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.findall(r"RAN \[.*?\]", again.stdout) == ["RAN []"] * 2
