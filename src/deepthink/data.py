"""Loading task splits and planning one (task, seed) evaluation: demos, dev items, scored items.

Randomness follows the reference (DAMO-ConvAI deep-thinking, v1): one private
`random.Random(seed)` stream per task draws, in order, the scored subset (agnews, hellaswag)
and then the demonstrations. Everything we add draws from its own seed-derived RNG so that the
reference draws stay intact:
- dev items: `random.Random(f"dev:{seed}").sample(...)` over the demonstration pool minus the
  demos (plain random, not stratified), in drawn order;
- `max_eval`: `random.Random(f"max_eval:{seed}")` picks which scored items to keep; they stay
  in scoring order.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from deepthink.io import readable_file
from deepthink.tasks import Example, Task, get_task

DATA_ENV = "DEEPTHINK_DATA_DIR"


def default_data_dir() -> Path | None:
    """$DEEPTHINK_DATA_DIR, else ../shared/data beside the repo checkout if it exists, else None."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    beside_repo = Path(__file__).resolve().parents[3] / "shared" / "data"
    return beside_repo if beside_repo.is_dir() else None


def read_jsonl(path: Path) -> list[dict]:
    """All rows of a JSON Lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_rows(task: Task, split: str, data_dir: str | Path | None = None) -> list[dict]:
    """Rows of `split` ("train" / "eval") in file order.

    Looks in order at the task's own `data_files`, then `<data_dir>/<task>/<split>.jsonl`
    (`data_dir` defaults to `default_data_dir()`), then, only when neither `data_dir` nor
    $DEEPTHINK_DATA_DIR was given and the default folder has no such task, the HuggingFace hub
    (needs the optional `datasets` package).
    """
    if task.data_files and split in task.data_files:
        return read_jsonl(Path(task.data_files[split]))
    explicit = data_dir is not None or bool(os.environ.get(DATA_ENV))
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if root is not None and (explicit or (root / task.name).is_dir()):
        path = root / task.name / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"task {task.name!r}: split file {path} does not exist "
                                    f"(expected <data-dir>/{task.name}/{split}.jsonl)")
        return read_jsonl(path)
    return _load_hub(task, split, root)


def _load_hub(task: Task, split: str, root: Path | None) -> list[dict]:
    looked = f"{root / task.name / f'{split}.jsonl'} does not exist" if root else "no data folder found"
    fix = (f"pass --data-dir DIR holding {task.name}/{split}.jsonl, set ${DATA_ENV}, "
           "or install the optional hub support: pip install 'deepthink[hub]'")
    if task.hf_dataset is None or split not in task.hf_splits:
        raise FileNotFoundError(f"task {task.name!r}: no local {split!r} data ({looked}) and no HuggingFace "
                                f"source declared; pass --data-dir DIR holding {task.name}/{split}.jsonl")
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(f"task {task.name!r}: no local {split!r} data ({looked}) and the "
                                f"`datasets` package is not installed; {fix}") from None
    ds = datasets.load_dataset(task.hf_dataset, task.hf_config, split=task.hf_splits[split])
    return [dict(row) for row in ds]


def read_demos_file(path: str | Path, task: Task) -> list[Example]:
    """User demonstrations: a JSONL file of rows in the task's own field layout (like its
    train.jsonl), used in file order. Examples get split = the file's stem, index = line."""
    path = readable_file(path, "demonstrations file")
    try:
        rows = read_jsonl(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON Lines: {e}") from None
    try:
        return [task.example(row, i, path.stem) for i, row in enumerate(rows)]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def sample_demonstrations(task: Task, rows: Sequence[dict], k: int, rng: random.Random,
                          split: str = "train") -> list[int]:
    """The reference's demonstration draw: positions into `rows`, in prompt order.

    Stratified (fixed label words): group rows by label in order of first appearance,
    `rng.sample(group, k)` per group, join, one `rng.shuffle`. Otherwise `rng.sample` of k rows.
    """
    if not task.stratified:
        if k > len(rows):
            raise ValueError(f"task {task.name!r}: cannot draw {k} demonstrations from {len(rows)} rows")
        return rng.sample(range(len(rows)), k)
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        try:
            label = task.label(row)
        except ValueError as e:
            raise ValueError(f"task {task.name!r}, {split} row {i}: {e}") from None
        groups.setdefault(label, []).append(i)
    picked = []
    for label, ids in groups.items():
        if k > len(ids):
            name = f" ({task.choices[label]})" if 0 <= label < len(task.choices) else ""
            raise ValueError(f"task {task.name!r}: label {label}{name} has {len(ids)} {split} rows, cannot draw {k} "
                             f"demonstrations of it: lower --shots or add rows")
        picked.extend(rng.sample(ids, k))
    rng.shuffle(picked)
    return picked


@dataclass
class Plan:
    """Everything one (task, seed) evaluation unit needs."""

    task: Task
    seed: int
    shots: int                # k: per label for stratified tasks, in total otherwise
    demos: list[Example]      # in prompt order
    dev: list[Example]        # for choosing the step count; from the demo pool, disjoint from demos
    eval: list[Example]       # scored items, in scoring order
    notes: list[str]          # deviations from the reference

    @property
    def demonstrations(self) -> str:
        """The demonstration string: each gold-filled template followed by a blank line."""
        return "".join(e.block for e in self.demos)


def make_plan(task: Task | str, seed: int, shots: int = 1, dev_size: int = 128,
              max_eval: int | None = None, data_dir: str | Path | None = None,
              demos_file: str | Path | None = None, score: bool = True) -> Plan:
    """Draw demonstrations, dev items and scored items for one (task, seed).

    `demos_file` replaces the drawn demonstrations (then `shots` is unused). With score=False (tuning,
    predicting) no items are scored and the eval split is not read, unless the task's draw needs it (a
    scored subset drawn first from the seed's stream, or demonstrations from eval rows). Tasks with
    `demo_pool: eval` take demos and dev items from eval rows that are not scored: with a
    scored subset (hellaswag) from the rows outside it; without one (qasc) demos and dev
    items are removed from the scored rows.
    """
    task = get_task(task) if isinstance(task, str) else task
    if shots < 0 or dev_size < 0 or (max_eval is not None and max_eval < 1):
        raise ValueError(f"need shots >= 0, dev_size >= 0, max_eval >= 1; "
                         f"got {shots}, {dev_size}, {max_eval}")
    rng = random.Random(seed)  # the reference's single continuing stream
    notes = list(task.deviations)

    needs_eval = score or task.scored_subset is not None or task.demo_pool == "eval"
    eval_rows = load_rows(task, "eval", data_dir) if needs_eval else []
    scored = list(range(len(eval_rows)))
    if task.scored_subset is not None:
        if task.scored_subset > len(eval_rows):
            raise ValueError(f"task {task.name!r}: scored_subset {task.scored_subset} "
                             f"> {len(eval_rows)} eval rows")
        scored = rng.sample(scored, task.scored_subset)

    if task.demo_pool == "train":
        pool_split, pool_rows = "train", load_rows(task, "train", data_dir)
        pool = list(range(len(pool_rows)))
    else:
        pool_split, pool_rows = "eval", eval_rows
        taken = set(scored) if task.scored_subset is not None else set()
        pool = [i for i in range(len(eval_rows)) if i not in taken]

    if demos_file is not None:
        demos = read_demos_file(demos_file, task)
        notes.append(f"demonstrations read from {demos_file} ({len(demos)} items, file order)")
        used: set[int] = set()
    else:
        picked = sample_demonstrations(task, [pool_rows[i] for i in pool], shots, rng, pool_split)
        demos = [task.example(pool_rows[pool[p]], pool[p], pool_split) for p in picked]
        used = {pool[p] for p in picked}

    rest = [i for i in pool if i not in used]
    dev_ids = random.Random(f"dev:{seed}").sample(rest, min(dev_size, len(rest)))
    if len(dev_ids) < dev_size:
        notes.append(f"dev_size {dev_size} > {len(rest)} available {pool_split} rows: using all {len(rest)}")

    if not score:
        scored = []
    elif pool_split == "eval":
        held_out = used | set(dev_ids)
        scored = [i for i in scored if i not in held_out]
        notes.append(f"{task.name}: demonstrations and dev items come from {pool_split} rows; "
                     f"{len(scored)} of {len(eval_rows)} eval rows are scored")
    if max_eval is not None and max_eval < len(scored):
        keep = sorted(random.Random(f"max_eval:{seed}").sample(range(len(scored)), max_eval))
        notes.append(f"max_eval: scoring a seeded random {max_eval} of {len(scored)} items "
                     "(scoring order kept)")
        scored = [scored[i] for i in keep]

    return Plan(
        task=task, seed=seed, shots=shots, demos=demos,
        dev=[task.example(pool_rows[i], i, pool_split) for i in dev_ids],
        eval=[task.example(eval_rows[i], i, "eval") for i in scored],
        notes=notes,
    )
