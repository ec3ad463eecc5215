"""Data loading and evaluation plans: reference check vectors, honest splits, reproducibility."""

import dataclasses
import functools
import json
import os
import random
import sys
from pathlib import Path

import pytest

import deepthink.data
from deepthink.data import default_data_dir, load_rows, make_plan, read_demos_file
from deepthink.tasks import get_task, list_tasks

DATA = Path(os.environ.get("DEEPTHINK_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"task data not found at {DATA}")


@pytest.fixture(scope="module", autouse=True)
def cached_reads():
    """Read each JSONL file once per module (sst2/agnews train files are large)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deepthink.data, "read_jsonl", functools.lru_cache(maxsize=None)(deepthink.data.read_jsonl))
        yield


@functools.lru_cache(maxsize=None)
def plan(task: str, seed: int, shots: int = 1, dev_size: int = 128, max_eval: int | None = None):
    return make_plan(task, seed, shots=shots, dev_size=dev_size, max_eval=max_eval, data_dir=DATA)


def ids(examples) -> list[int]:
    return [e.index for e in examples]


# --- reference check vectors (TASKS.md §1: k=1, v1 stream) ------------------------------

@pytest.mark.parametrize("task, seed, expected", [
    ("sst2", 0, [62556, 45213]),
    ("sst5", 0, [5453, 441, 6647, 8170, 3842]),
    ("mr", 0, [7710, 3155]),
    ("trec", 0, [3293, 3677, 3694, 3229, 294, 2422]),
    ("copa", 0, [197]),
    ("obqa", 0, [3155]),
    ("winogrande", 0, [98]),
    ("sst2", 42, [13189, 47448]),
])
def test_demonstration_check_vectors(task, seed, expected):
    p = plan(task, seed)
    assert ids(p.demos) == expected and {e.split for e in p.demos} == {"train"}


@pytest.mark.parametrize("task, expected", [
    ("agnews", [6917, 3155, 6209, 7292, 3445]),
    ("hellaswag", [6311, 6890, 663, 4242, 8376]),
])
def test_scored_subset_check_vectors(task, expected):
    p = plan(task, 0)
    assert len(p.eval) == 2000 and ids(p.eval)[:5] == expected


def test_sst2_seed42_demonstration_string():
    assert plan("sst2", 42).demonstrations == (
        "Review: at every opportunity to do something clever\nSentiment: positive\n\n"
        "Review: been discovered , indulged in and rejected as boring before i see this piece of crap again\n"
        "Sentiment: negative\n\n"
    )


def test_stratified_label_groups_follow_first_appearance():
    # sst5's train labels first appear as 4, 1, 2, 3, 0: one draw per group in that order, then a shuffle
    rows = load_rows(get_task("sst5"), "train", DATA)
    rng = random.Random(0)
    groups = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["label"], []).append(i)
    assert list(groups) == [4, 1, 2, 3, 0]
    picked = [i for label in groups for i in rng.sample(groups[label], 1)]
    rng.shuffle(picked)
    assert picked == ids(plan("sst5", 0).demos)


# --- shots, pools and fallbacks -----------------------------------------------------------

def test_shots_per_label_for_stratified_and_total_for_random():
    sst2 = plan("sst2", 1, shots=3)
    assert len(sst2.demos) == 6 and sorted(e.label for e in sst2.demos) == [0, 0, 0, 1, 1, 1]
    assert len(plan("copa", 1, shots=3).demos) == 3
    assert plan("sst2", 1, shots=0).demonstrations == ""


def test_hellaswag_demos_come_from_unscored_eval_rows():
    p = plan("hellaswag", 0)
    scored = set(ids(p.eval))
    unscored = [i for i in range(10042) if i not in scored]
    rng = random.Random(0)
    rng.sample(range(10042), 2000)  # the scored draw comes first in the stream
    assert ids(p.demos) == [unscored[i] for i in rng.sample(range(len(unscored)), 1)]
    assert {e.split for e in p.demos + p.dev} == {"eval"}
    assert any("no local train split" in n for n in p.notes)


def test_qasc_fallback_a():
    p = plan("qasc", 0, dev_size=0)
    assert ids(p.demos) == random.Random(0).sample(range(926), 1)
    assert len(p.eval) == 925 and ids(p.eval) == [i for i in range(926) if i not in ids(p.demos)]
    p = plan("qasc", 0)  # dev items are carved out of the scored rows too
    assert len(p.dev) == 128 and len(p.eval) == 926 - 1 - 128
    assert any("797 of 926" in n for n in p.notes)


def test_agnews_notes_its_train_subset():
    assert any("19,995" in n for n in plan("agnews", 0).notes)
    assert plan("sst2", 0).notes == []


def test_dev_size_larger_than_pool_uses_all():
    p = plan("copa", 0, dev_size=1000)
    assert len(p.dev) == 399 and any("dev_size 1000" in n for n in p.notes)


def test_max_eval_is_seeded_subset_in_scoring_order():
    full, sub = plan("agnews", 0), plan("agnews", 0, max_eval=50)
    order = {e.index: pos for pos, e in enumerate(full.eval)}
    positions = [order[e.index] for e in sub.eval]
    assert len(sub.eval) == 50 and positions == sorted(positions)
    assert ids(sub.demos) == ids(full.demos) and ids(sub.dev) == ids(full.dev)
    assert ids(make_plan("agnews", 0, max_eval=50, data_dir=DATA).eval) == ids(sub.eval)
    assert ids(plan("agnews", 1, max_eval=50).eval) != ids(sub.eval)
    assert any("max_eval" in n for n in sub.notes)
    assert len(plan("copa", 0, max_eval=1000).eval) == 100  # larger than the split: no-op


# --- properties for every task ------------------------------------------------------------

@pytest.mark.parametrize("task", list_tasks())
@pytest.mark.parametrize("seed", [0, 3])
def test_demos_dev_and_scored_items_are_disjoint(task, seed):
    p = plan(task, seed, shots=2)
    parts = [{(e.split, e.index) for e in part} for part in (p.demos, p.dev, p.eval)]
    assert [len(s) for s in parts] == [len(p.demos), len(p.dev), len(p.eval)]  # no duplicates
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert p.dev and p.eval and p.demonstrations.endswith("\n\n")


@pytest.mark.parametrize("task", list_tasks())
def test_plans_are_reproducible_and_seed_dependent(task):
    a = make_plan(task, 5, shots=2, data_dir=DATA)
    assert a == plan(task, 5, shots=2)
    b = plan(task, 6, shots=2)
    assert ids(a.demos) != ids(b.demos) and ids(a.dev) != ids(b.dev)


# --- loading ----------------------------------------------------------------------------------

def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPTHINK_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("DEEPTHINK_DATA_DIR")
    beside_repo = Path(deepthink.data.__file__).resolve().parents[3] / "shared" / "data"
    assert default_data_dir() == (beside_repo if beside_repo.is_dir() else None)


def test_missing_split_file_names_the_path(tmp_path):
    (tmp_path / "sst2").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "sst2" / "train.jsonl")):
        load_rows(get_task("sst2"), "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="hellaswag/train.jsonl"):
        load_rows(get_task("hellaswag"), "train", DATA)


def test_env_data_dir_is_used_and_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPTHINK_DATA_DIR", str(DATA))
    assert len(load_rows(get_task("copa"), "train")) == 400
    monkeypatch.setenv("DEEPTHINK_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "copa" / "train.jsonl")):
        load_rows(get_task("copa"), "train")


def test_no_local_data_and_no_datasets_package(monkeypatch):
    monkeypatch.delenv("DEEPTHINK_DATA_DIR", raising=False)
    monkeypatch.setattr(deepthink.data, "default_data_dir", lambda: None)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(FileNotFoundError, match="--data-dir.*deepthink\\[hub\\]"):
        load_rows(get_task("sst2"), "eval")


def test_sentiment_demo_uses_package_data(tmp_path):
    task = get_task("sentiment-demo")
    train, test = load_rows(task, "train", tmp_path), load_rows(task, "eval", tmp_path)
    assert (len(train), len(test)) == (40, 20)
    assert sum(r["label"] for r in train) == 20 and sum(r["label"] for r in test) == 10
    assert all(set(r) == {"sentence", "label"} for r in train + test)
    p = make_plan(task, 0, data_dir=tmp_path)
    assert len(p.eval) == 20 and p.demonstrations.startswith("Review: ")


def test_demos_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"sentence": "great fun ", "label": 1}) + "\n"
                    + json.dumps({"sentence": "a bore", "label": 0}) + "\n")
    p = make_plan("sst2", 0, data_dir=DATA, demos_file=path)
    assert p.demonstrations == "Review: great fun\nSentiment: positive\n\nReview: a bore\nSentiment: negative\n\n"
    assert [(e.split, e.index) for e in p.demos] == [("mine", 0), ("mine", 1)]
    assert len(p.eval) == 872 and any("mine.jsonl" in n for n in p.notes)

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "wrong layout", "label": 1}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl.*row 0.*missing field 'sentence'"):
        read_demos_file(path, get_task("sst2"))


def test_a_plan_without_scoring_reads_no_eval_file_and_draws_the_same(tmp_path):
    """tune/predict plan with score=False: no eval.jsonl needed; demonstrations and dev items as eval draws them."""
    full = make_plan("sentiment-demo", 3, shots=2, dev_size=5)
    task = get_task("sentiment-demo")
    train_only = dataclasses.replace(task, data_files={"train": task.data_files["train"]})
    plan = make_plan(train_only, 3, shots=2, dev_size=5, data_dir=tmp_path, score=False)   # tmp_path: no eval file
    assert plan.eval == [] and plan.demos == full.demos and plan.dev == full.dev
    with pytest.raises(FileNotFoundError, match="eval.jsonl does not exist"):
        make_plan(train_only, 3, shots=2, data_dir=tmp_path)
