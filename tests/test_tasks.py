"""Task declarations: registry, templates (reference quirks included) and task-file validation."""

import functools
import json
import os
from pathlib import Path

import pytest

import deepthink.data
from deepthink.data import load_rows
from deepthink.tasks import Example, Task, describe_tasks, get_task, list_tasks, load_task_file
from conftest import PAPER_TASKS

DATA = Path(os.environ.get("DEEPTHINK_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="module", autouse=True)
def cached_reads():
    """Read each JSONL file once per module (sst2/agnews train files are large)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deepthink.data, "read_jsonl", functools.lru_cache(maxsize=None)(deepthink.data.read_jsonl))
        yield


@pytest.fixture
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"task data not found at {DATA}")
    return DATA


def example(task: str, split: str, index: int) -> Example:
    t = get_task(task)
    return t.example(load_rows(t, split, DATA)[index], index, split)


def test_registry_lists_every_task():
    assert list_tasks() == PAPER_TASKS + ["sentiment-demo"]
    for name in list_tasks():
        assert get_task(name).name == name


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="unknown task 'sst3'") as e:
        get_task("sst3")
    assert all(name in str(e.value) for name in list_tasks())


def test_describe_tasks_shows_templates():
    text = describe_tasks()
    assert all(f"{name}:" in text for name in list_tasks())
    assert repr("Review: {query}\nSentiment: {choice}") in text


# (task, split, row) -> (Q, continuations, label), written out by hand from the data files.
EXPECTED = {
    ("sst2", "train", 0): ("Review: hide new secretions from the parental units\nSentiment:",
                           (" negative", " positive"), 0),
    ("sst5", "train", 0): ("Review: a stirring , funny and finally transporting re-imagining of beauty and the "
                           "beast and 1930s horror films\nSentiment:",
                           (" terrible", " negative", " neutral", " positive", " great"), 4),
    ("mr", "eval", 1): ("Review: the soundtrack alone is worth the price of admission .\nSentiment:",
                        (" negative", " positive"), 1),
    ("agnews", "eval", 0): ("Article: Fears for T N pension after talks Unions representing workers at Turner   "
                            "Newall say they are 'disappointed' after talks with stricken parent firm Federal "
                            "Mogul.\nCategory:", (" World", " Sports", " Business", " Technology"), 2),
    ("trec", "eval", 0): ("Question: How far is it from Denver to Aspen ?\nType:",
                          (" Abbreviation", " Entity", " Description", " Person", " Location", " Number"), 5),
    ("copa", "eval", 0): ("The man turned on the faucet therefore",
                          (" The toilet filled with water.", " Water flowed from the spout."), 1),
    ("copa", "train", 0): ("My body cast a shadow over the grass because",
                           (" The sun was rising.", " The grass was cut."), 0),
    # premise ends in ". ": keeps its period, double space before "because"
    ("copa", "train", 209): ("The parents forbade their children from watching the movie.  because",
                             (" The movie was rated R.", " The movie was animated."), 0),
    ("hellaswag", "eval", 0): ("A man is sitting on a roof. he",
                               (" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                                " is holding a rubik's cube.", " starts pulling up roofing on a roof."), 3),
    ("obqa", "eval", 0): ("Frilled sharks and angler fish live far beneath the surface of the ocean, which is "
                          "why they are known as",
                          (" Deep sea animals.", " fish.", " Long Sea Fish.", " Far Sea Animals."), 0),
    # a choice already ending in "." gives ".."
    ("obqa", "eval", 166): ("Hypothermia will set in under which conditions:",
                            (" while exposed to harsh winds in a polar region.", " while stranded deep in a swap.",
                             " while swimming in tropical seas..",
                             " while exposed to direct sunlight on a tropical island."), 0),
    # unstripped questions: trailing space -> double space before the choice; leading space kept
    ("qasc", "eval", 151): ("What are produced to fight allergens? ",
                            (" oxidizers", " bacteria", " flagella", " antibodies", " red blood cells",
                             " enzymes", " hormones", " orange"), 3),
    ("qasc", "eval", 205): (" Spring days can see what",
                            (" rain weather", " rivers freezing", " changes in size", " melting glaciers",
                             " deposits", " Seisometers", " shorter days", " measure of motion"), 0),
    ("winogrande", "eval", 0): ("Sarah was a much better surgeon than Maria so",
                                (" Sarah always got the easier cases.", " Maria always got the easier cases."), 1),
    # "_ ." -> "{option} ."
    ("winogrande", "eval", 129): ("The wages at the factory were lower than the wages at the plant since it was "
                                  "more safe to work at the", (" plant .", " factory ."), 1),
}


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"{k[0]}-{k[1]}-{k[2]}")
def test_prompt_strings(data_dir, key):
    query, continuations, label = EXPECTED[key]
    ex = example(*key)
    assert (ex.query, ex.continuations, ex.label) == (query, continuations, label)
    assert ex.demo_text == query + continuations[label]


def test_copa_demo_line_from_tasks_md(data_dir):
    assert example("copa", "eval", 0).demo_text == "The man turned on the faucet therefore Water flowed from the spout."


def test_hellaswag_raw_context_kept_as_is(data_dir):
    ex = example("hellaswag", "eval_raw500", 0)
    assert ex.query.startswith("[header] How to recover from an emotional affair [title] Forgive yourself. [step]")
    assert ex.continuations[1].endswith("[substeps] Cheating can be very emotional, and can even be worse.")


@pytest.mark.parametrize("name", PAPER_TASKS + ["sentiment-demo"])
def test_every_row_builds(data_dir, name):
    task = get_task(name)
    for split in ("train", "eval") if task.demo_pool == "train" else ("eval",):
        rows = load_rows(task, split, data_dir)
        for i, row in enumerate(rows[:3000]):
            ex = task.example(row, i, split)
            assert 0 <= ex.label < len(ex.continuations) and ex.continuations
            if task.choices is not None:
                assert ex.continuations == tuple(" " + c for c in task.choices)


# --- user task files ---------------------------------------------------------------------

USER_TASK = {
    "name": "my-nli",
    "description": "toy entailment task",
    "data_files": {"train": "rows/train.jsonl", "eval": "rows/eval.jsonl"},
    "query_field": "premise",
    "strip_query": True,
    "label_field": "gold",
    "choices": ["yes", "no"],
    "query_template": "{query}\nQuestion: true?\nAnswer:",
    "choice_template": "{query}\nQuestion: true?\nAnswer: {choice}",
    "sampling": "random",
}


def write_task(tmp_path: Path, data: dict, suffix: str = ".yaml") -> Path:
    import yaml

    path = tmp_path / f"task{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_user_yaml_round_trip(tmp_path):
    (tmp_path / "rows").mkdir()
    for split, n in (("train", 6), ("eval", 4)):
        rows = [{"premise": f" sentence {i} ", "gold": i % 2} for i in range(n)]
        (tmp_path / "rows" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task_file(write_task(tmp_path, USER_TASK))
    assert task == load_task_file(write_task(tmp_path, USER_TASK, ".json"))
    assert get_task(str(tmp_path / "task.yaml")) == task
    assert task.choices == ("yes", "no") and task.sampling == "random"

    ex = task.example({"premise": " It rains. ", "gold": 1}, 0, "train")
    assert ex.query == "It rains.\nQuestion: true?\nAnswer:"
    assert ex.continuations == (" yes", " no") and ex.demo_text == "It rains.\nQuestion: true?\nAnswer: no"

    plan = deepthink.data.make_plan(task, seed=3, shots=2, dev_size=2, data_dir=tmp_path / "elsewhere")
    assert len(plan.demos) == 2 and len(plan.dev) == 2 and len(plan.eval) == 4


@pytest.mark.parametrize("change, field", [
    ({"query_template": None}, "query_template"),                 # missing (None = delete)
    ({"choices": 3}, "choices"),                                   # wrong type
    ({"strip_query": "yes"}, "strip_query"),
    ({"sampling": "balanced"}, "sampling"),                        # unknown mode
    ({"query_template": "Text: {text}\nAnswer:"}, "query_template"),  # no {query}
    ({"choice_template": "{query} -> {choice}"}, "choice_template"),  # does not extend Q
    ({"label_format": "roman"}, "label_format"),
    ({"hook": "nope"}, "hook"),
    ({"scored_subset": -5}, "scored_subset"),
    ({"choices_field": "options"}, "choices"),                     # both choices and choices_field
    ({"template": "x"}, "template"),                               # unknown field
])
def test_malformed_task_file_names_field_and_file(tmp_path, change, field):
    data = {k: v for k, v in {**USER_TASK, **change}.items() if v is not None}
    path = write_task(tmp_path, data)
    with pytest.raises(ValueError, match=f"'{field}'") as e:
        load_task_file(path)
    assert str(path) in str(e.value)


def test_sampling_error_lists_valid_modes(tmp_path):
    with pytest.raises(ValueError, match=r"\['random', 'stratified'\]"):
        load_task_file(write_task(tmp_path, {**USER_TASK, "sampling": "balanced"}))


@pytest.mark.parametrize("text", ["- just\n- a list\n", "name: [unclosed\n"])
def test_unreadable_task_file(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="bad.yaml"):
        load_task_file(path)


def test_task_validates_when_built_in_python():
    with pytest.raises(ValueError, match="field 'choice_template'"):
        Task(name="x", query_field="q", query_template="{query}", choice_template="{query}", choices=("a",))
    with pytest.raises(ValueError, match="winogrande.*exactly one '_'"):
        get_task("winogrande").example({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}, 7, "eval")
    with pytest.raises(ValueError, match="eval row 7: label 5 out of range"):
        get_task("sst2").example({"sentence": "fine", "label": 5}, 7, "eval")
    with pytest.raises(ValueError, match="missing field 'sentence'"):
        get_task("sst2").example({"text": "fine", "label": 1}, 0, "train")
