"""Compare the per-request log-likelihoods that lm-evaluation-harness logged (--log_samples) in several runs.

    python examples/lm_eval/compare_samples.py runs/lm-eval/hf runs/lm-eval/deepthink-steps1 ...

The first folder is the reference: for every run it prints the accuracy, the largest absolute difference of any
request's log-likelihood from the reference, on how many items the prediction differs, how many items turned from
right to wrong and from wrong to right, and the exact McNemar p-value of those two counts.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def load(folder: str) -> dict[tuple[str, int], tuple[list[float], int]]:
    """(task, doc id) -> (log-likelihood of each choice, gold index), from a multiple-choice task's samples."""
    files = sorted(Path(folder).rglob("samples_*.jsonl"))
    if not files:
        sys.exit(f"no samples_*.jsonl under {folder}: run the harness with --log_samples --output_path {folder}")
    out = {}
    for f in files:
        task = f.name.removeprefix("samples_").rsplit("_", 1)[0]
        for line in f.read_text().splitlines():
            s = json.loads(line)
            target = s["target"]                        # the gold choice's index (a string in the harness's files)
            out[(task, s["doc_id"])] = ([float(r[0][0]) for r in s["resps"]], int(target))
    return out


def main(folders: list[str]) -> None:
    if len(folders) < 2:
        sys.exit(__doc__)
    ref = load(folders[0])
    print(f"{'run':<24} {'items':>5} {'acc %':>6} {'max |dLL| vs ' + Path(folders[0]).name:>22} {'changed':>7} "
          f"{'right>wrong':>11} {'wrong>right':>11} {'McNemar p':>9}")
    for folder in folders:
        run = load(folder)
        keys = sorted(ref.keys() & run.keys())
        argmax = lambda lls: max(range(len(lls)), key=lambda j: (lls[j], -j))   # noqa: E731  first wins a tie
        acc = sum(argmax(run[k][0]) == run[k][1] for k in keys) / len(keys)
        diff = max(abs(a - b) for k in keys for a, b in zip(run[k][0], ref[k][0]))
        changed = sum(argmax(run[k][0]) != argmax(ref[k][0]) for k in keys)
        ok_ref = {k: argmax(ref[k][0]) == ref[k][1] for k in keys}
        ok_run = {k: argmax(run[k][0]) == run[k][1] for k in keys}
        worse = sum(ok_ref[k] and not ok_run[k] for k in keys)
        better = sum(ok_run[k] and not ok_ref[k] for k in keys)
        print(f"{Path(folder).name:<24} {len(keys):>5} {100 * acc:>6.1f} {diff:>22.2e} {changed:>7} {worse:>11} "
              f"{better:>11} {mcnemar(worse, better):>9.3f}")


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for b and c discordant pairs (binomial, p = 1/2)."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n) if n else 1.0


if __name__ == "__main__":
    main(sys.argv[1:])
