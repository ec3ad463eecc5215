"""`deepthink tune | predict | generate` on a tiny model saved as a local Hugging Face folder."""
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

import deepthink
from deepthink import TunedContext, api, context
from deepthink.cli import main
from conftest import tiny_lm

DEMO_TEST = Path(deepthink.__file__).parent / "demo_data" / "sentiment_test.jsonl"
TUNE = ["--method", "forward", "--task", "sentiment-demo", "--seed", "0", "--shots", "1", "--steps", "3", "--step-size", "0.1"]


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    lm = tiny_lm("llama", seed=1)
    path = tmp_path_factory.mktemp("models") / "other-llama"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ctx_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ctx") / "sentiment"
    assert main(["tune", "--model", str(tiny_model_dir), *TUNE, "--out", str(out)]) == 0
    return out


def run(capsys, *argv, stdin=None, monkeypatch=None):
    """-> (exit code, stdout, stderr) of `deepthink argv...`."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error(capsys, *argv, **kw):
    code, out, err = run(capsys, *argv, **kw)
    assert code == 2, (out, err)
    last = err.strip().splitlines()[-1]        # after any progress bars of the model loading
    assert last.startswith(f"deepthink {argv[0]}: error: "), err
    return last


def jsonl(text):
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------- the whole path, CLI alone

def test_tune_copy_then_predict_and_generate(tiny_model_dir, ctx_dir, tmp_path, capsys):
    meta = json.loads((ctx_dir / "context.json").read_text())
    assert meta["model"]["name"] == tiny_model_dir.name and meta["model"]["source"] == str(tiny_model_dir)
    assert meta["origin"] == {"task": "sentiment-demo", "seed": 0, "shots": 1}
    assert meta["tuning"]["steps"] == meta["steps_done"] == 3 and meta["tuning"]["step_size"] == 0.1
    assert meta["demonstrations"].startswith("Review: ") and meta["demonstrations"].endswith("\n\n")
    # "another machine": the folder is copied; predict loads the model the context records
    moved = tmp_path / "elsewhere"
    shutil.copytree(ctx_dir, moved)
    code, out, err = run(capsys, "predict", "--context", moved, "--task", "sentiment-demo", "--input", DEMO_TEST)
    assert code == 0, err
    rows = jsonl(out)
    gold = [json.loads(line) for line in DEMO_TEST.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(gold))) and [r["label"] for r in rows] == [g["label"] for g in gold]
    assert rows[0]["query"] == f"Review: {gold[0]['sentence'].strip()}\nSentiment:"
    assert rows[0]["choices"] == [" negative", " positive"]
    assert f"accuracy" in err and f"on {len(gold)} labelled queries" in err
    # the same numbers as the library on the in-memory model
    lm = tiny_lm("llama")
    api = TunedContext.load(moved, lm).predict([r["query"] for r in rows], [" negative", " positive"])
    assert [{k: r[k] for k in api[0]} for r in rows] == api
    code, out, err = run(capsys, "generate", "--context", moved, "--prompt", "Review: witty\nSentiment:",
                         "--max-new-tokens", 6)
    assert code == 0, err
    assert out == TunedContext.load(moved, lm).generate("Review: witty\nSentiment:", max_new_tokens=6) + "\n"


def test_predict_with_choices_from_plain_lines_and_stdin(ctx_dir, tmp_path, capsys, monkeypatch):
    lines = ["Review: witty and gorgeous", "Review: boilerplate 🎬🍿 很好看", "", "Review: " + "naïve " * 30]
    (tmp_path / "q.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = run(capsys, "predict", "--context", ctx_dir, "--choices", "negative, positive",
                         "--input", tmp_path / "q.txt", "--output", tmp_path / "p.jsonl")
    assert code == 0 and out == ""
    rows = jsonl((tmp_path / "p.jsonl").read_text(encoding="utf-8"))
    assert [r["query"] for r in rows] == [line for line in lines if line]         # verbatim, blank line skipped
    assert all(r["choices"] == [" negative", " positive"] and "label" not in r for r in rows)
    assert "🎬🍿" in (tmp_path / "p.jsonl").read_text(encoding="utf-8")            # not \\u-escaped
    # stdin, JSONL: JSON strings may hold newlines; objects give their "query"
    stdin = "\n".join(json.dumps(x) for x in ["Review: witty\nSentiment:", {"query": "Review: dull\nSentiment:"}])
    code, out, _ = run(capsys, "predict", "--context", ctx_dir, "--choices", '[" negative", " positive!"]',
                       "--input", "-", stdin=stdin, monkeypatch=monkeypatch)
    assert code == 0
    rows = jsonl(out)
    assert [r["query"] for r in rows] == ["Review: witty\nSentiment:", "Review: dull\nSentiment:"]
    assert rows[1]["choices"] == [" negative", " positive!"]
    # stdin of plain lines that are not JSON
    code, out, _ = run(capsys, "predict", "--context", ctx_dir, "--choices", "a,b", "--input", "-",
                       stdin="Review: {not json\n", monkeypatch=monkeypatch)
    assert code == 0 and jsonl(out)[0]["query"] == "Review: {not json"


def test_predict_task_plain_lines_and_default_task(ctx_dir, tmp_path, capsys):
    (tmp_path / "q.txt").write_text("  a witty, gorgeous film  \nboilerplate\n")
    # no --task/--choices: the task the context was tuned on; a plain line is the task's query field
    code, out, err = run(capsys, "predict", "--context", ctx_dir, "--input", tmp_path / "q.txt", "--normalize")
    assert code == 0, err
    rows = jsonl(out)
    assert [r["query"] for r in rows] == ["Review: a witty, gorgeous film\nSentiment:", "Review: boilerplate\nSentiment:"]
    assert all(r["answer"] == r["choices"][r["prediction_normalized"]] for r in rows)
    assert "accuracy" not in err


def test_generate_reads_the_prompt_from_stdin_and_samples(ctx_dir, capsys, monkeypatch):
    prompt = "Review: 很好看 🎬\nSentiment:"
    code, out, _ = run(capsys, "generate", "--context", ctx_dir, "--prompt", "-", "--max-new-tokens", 5,
                       stdin=prompt, monkeypatch=monkeypatch)
    assert code == 0
    code, again, _ = run(capsys, "generate", "--context", ctx_dir, "--prompt", prompt, "--max-new-tokens", 5)
    assert again == out
    sample = ["generate", "--context", ctx_dir, "--prompt", prompt, "--max-new-tokens", 8, "--temperature", 1.2,
              "--top-p", 0.9, "--seed", 7, "--no-stop-at-eos"]
    assert run(capsys, *sample)[1] == run(capsys, *sample)[1]


def test_tune_from_a_demos_file(tiny_model_dir, tmp_path, capsys):
    text = "Review: 很好看的电影 🎬\nSentiment: positive\n\nReview: dull\nSentiment: negative\n"
    (tmp_path / "demos.txt").write_text(text, encoding="utf-8")
    code, out, err = run(capsys, "tune", "--model", tiny_model_dir, "--demos", tmp_path / "demos.txt", "--steps", 2,
                         "--method", "forward",
                         "--out", tmp_path / "txt")
    assert code == 0, err
    assert out.startswith(f"saved {tmp_path / 'txt'}: ")
    meta = json.loads((tmp_path / "txt" / "context.json").read_text(encoding="utf-8"))
    assert meta["demonstrations"] == text                                      # verbatim
    assert meta["origin"] == {"task": None, "demos_file": str(tmp_path / "demos.txt")}
    # task JSONL rows, formatted with the task's template
    (tmp_path / "demos.jsonl").write_text('{"sentence": "dull", "label": 0}\n{"sentence": "witty", "label": 1}\n')
    code, _, err = run(capsys, "tune", "--model", tiny_model_dir, "--task", "sentiment-demo",
                       "--demos", tmp_path / "demos.jsonl", "--steps", 1, "--out", tmp_path / "jsonl")
    assert code == 0, err
    meta = json.loads((tmp_path / "jsonl" / "context.json").read_text())
    assert meta["demonstrations"] == "Review: dull\nSentiment: negative\n\nReview: witty\nSentiment: positive\n\n"


# ---------------------------------------------------------------- §3: refusals through the CLI

def test_tune_bad_inputs(tiny_model_dir, tmp_path, capsys):
    out = ["--out", tmp_path / "ctx"]
    err = error(capsys, "tune", "--model", tiny_model_dir, "--task", "sst-9", *out)
    assert "unknown task 'sst-9'; valid tasks: sst2, sst5, mr" in err
    err = error(capsys, "tune", "--model", "gpt-17", *TUNE, *out)
    assert "unknown model 'gpt-17'" in err and "smollm2-135m" in err
    err = error(capsys, "tune", "--model", tiny_model_dir, "--task", "sst2", "--data-dir", tmp_path, *out)
    assert "split file" in err and "sst2/train.jsonl does not exist" in err      # tune never reads eval.jsonl
    (tmp_path / "empty.txt").write_text("  \n")
    err = error(capsys, "tune", "--model", tiny_model_dir, "--demos", tmp_path / "empty.txt", *out)
    assert "empty.txt holds no demonstrations" in err
    err = error(capsys, "tune", "--model", tiny_model_dir, *out)
    assert "--task T" in err and "--demos FILE" in err
    err = error(capsys, "tune", "--model", tiny_model_dir, "--demos", tmp_path / "nope.txt", *out)
    assert "nope.txt does not exist" in err
    (tmp_path / "d.jsonl").write_text('{"sentence": "x", "label": 0}\n')
    assert "give --task T" in error(capsys, "tune", "--model", tiny_model_dir, "--demos", tmp_path / "d.jsonl", *out)
    err = error(capsys, "tune", "--model", tiny_model_dir, "--demos", tmp_path / "empty.txt", "--shots", 2, *out)
    assert "--shots" in err
    err = error(capsys, "tune", "--model", tiny_model_dir, *TUNE, "--step-size", "-1", *out)
    assert "--step-size=-1.0: must be >= 0" in err
    (tmp_path / "long.txt").write_text("Review: witty gorgeous movie.\n" * 200)   # > 2048 positions
    err = error(capsys, "tune", "--model", tiny_model_dir, "--demos", tmp_path / "long.txt", "--method", "forward", *out)
    assert "positions but the model supports 2048" in err
    assert not (tmp_path / "ctx").exists()


def test_tune_output_dir_rules(tiny_model_dir, ctx_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = error(capsys, "tune", "--model", tiny_model_dir, *TUNE, "--out", tmp_path / "file" / "ctx")
    assert "is not writable" in err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    err = error(capsys, "tune", "--model", tiny_model_dir, *TUNE, "--out", tmp_path / "mine", "--overwrite")
    assert "does not hold a deepthink context" in err and (tmp_path / "mine" / "notes.txt").exists()
    target = tmp_path / "ctx"
    shutil.copytree(ctx_dir, target)
    err = error(capsys, "tune", "--model", tiny_model_dir, *TUNE, "--out", target)
    assert "already holds a tuned context: pass --overwrite" in err
    code, _, err = run(capsys, "tune", "--model", tiny_model_dir, *TUNE, "--steps", 2, "--out", target, "--overwrite")
    assert code == 0, err
    assert json.loads((target / "context.json").read_text())["steps_done"] == 2


def test_tune_divergence_warns_and_saves_the_last_finite_state(tiny_model_dir, tmp_path, capsys):
    code, out, err = run(capsys, "tune", "--model", tiny_model_dir, *TUNE, "--steps", 6, "--step-size", "1e38",
                         "--momentum", 0, "--out", tmp_path / "nan")
    assert code == 0
    assert "deepthink tune: warning: non-finite cache at step" in err and "recorded in the artifact" in err
    meta = json.loads((tmp_path / "nan" / "context.json").read_text())
    assert "non-finite" in meta["stopped"] and meta["steps_done"] < 6


@pytest.mark.parametrize("where", ["tuning", "saving"])
def test_interrupted_tune_leaves_no_artifact(tiny_model_dir, ctx_dir, tmp_path, capsys, monkeypatch, where):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "run", interrupt) if where == "tuning" else \
        monkeypatch.setattr(context, "write_synced", interrupt)
    code, _, err = run(capsys, "tune", "--model", tiny_model_dir, *TUNE, "--out", tmp_path / "new")
    assert code == 130 and "interrupted" in err
    old = tmp_path / "old"
    shutil.copytree(ctx_dir, old)
    before = (old / "context.json").read_bytes()
    code, _, _ = run(capsys, "tune", "--model", tiny_model_dir, *TUNE, "--out", old, "--overwrite")
    assert code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]          # no new folder, no temporary leftovers
    assert (old / "context.json").read_bytes() == before                  # the earlier context is untouched
    assert TunedContext.load(old, tiny_lm("llama")).steps_done == 3


def test_predict_and_generate_refusals(ctx_dir, other_model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "q.txt").write_text("Review: witty\n")
    q = ["--input", tmp_path / "q.txt"]
    err = error(capsys, "predict", "--context", ctx_dir, "--model", other_model_dir, "--choices", "a,b", *q)
    assert "made for model 'tiny-llama" in err and "fingerprint" in err
    err = error(capsys, "predict", "--context", ctx_dir, "--dtype", "bfloat16", "--choices", "a,b", *q)
    assert "tuned in float32, but the model is loaded in bfloat16: load it with --dtype float32" in err
    err = error(capsys, "generate", "--context", tmp_path / "nowhere", "--prompt", "x")
    assert "no saved context at" in err
    assert "duplicate choices" in error(capsys, "predict", "--context", ctx_dir, "--choices", "a,b,a", *q)
    assert "choice 1 is empty" in error(capsys, "predict", "--context", ctx_dir, "--choices", "a,,b", *q)
    assert "not a JSON list" in error(capsys, "predict", "--context", ctx_dir, "--choices", "[a", *q)
    err = error(capsys, "predict", "--context", ctx_dir, "--task", "copa", *q)     # not the task it was tuned on
    assert "--task copa: formats rows differently from the task 'sentiment-demo'" in err and "query_field" in err
    (tmp_path / "long.txt").write_text("Review: " + "witty " * 2100 + "\n")
    err = error(capsys, "predict", "--context", ctx_dir, "--choices", "a,b", "--input", tmp_path / "long.txt")
    assert "beyond the model's 2048 positions" in err
    err = error(capsys, "generate", "--context", ctx_dir, "--prompt", "x", "--max-new-tokens", 5000)
    assert "exceed the model's 2048 positions" in err
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "holds no queries" in error(capsys, "predict", "--context", ctx_dir, "--choices", "a,b",
                                       "--input", tmp_path / "blank.txt")
    (tmp_path / "bad.jsonl").write_text('{"sentence": "ok"}\n{"sentence": \n')
    assert "line 2: not valid JSON" in error(capsys, "predict", "--context", ctx_dir, "--task", "sentiment-demo",
                                             "--input", tmp_path / "bad.jsonl")
    (tmp_path / "label.jsonl").write_text('{"sentence": "ok", "label": 7}\n')
    assert "label 7 out of range" in error(capsys, "predict", "--context", ctx_dir, "--task", "sentiment-demo",
                                           "--input", tmp_path / "label.jsonl")


def test_predict_needs_task_or_choices_for_a_demos_file_context(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "d.txt").write_text("Review: dull\nSentiment: negative\n\n")
    assert run(capsys, "tune", "--model", tiny_model_dir, "--demos", tmp_path / "d.txt", "--steps", 1, "--method", "forward",
               "--out", tmp_path / "c")[0] == 0
    (tmp_path / "q.txt").write_text("Review: witty\n")
    err = error(capsys, "predict", "--context", tmp_path / "c", "--input", tmp_path / "q.txt")
    assert "give --task T" in err and "--choices a,b,c" in err
    err = error(capsys, "predict", "--context", tmp_path / "c", "--task", "copa", "--input", tmp_path / "q.txt")
    assert "task 'copa' needs JSONL rows" in err


@pytest.mark.parametrize("command", ["tune", "predict", "generate"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and f"usage: deepthink {command}" in capsys.readouterr().out


# ---------------------------------------------------------------- altered or hostile contexts (issue 26)

def set_field(path, field, value):
    """Change one dotted field of path/context.json (not re-sealed: what a user editing the file does)."""
    meta = json.loads((path / "context.json").read_text())
    *parents, last = field.split(".")
    node = meta
    for key in parents:
        node = node[key]
    node[last] = value
    (path / "context.json").write_text(json.dumps(meta))


REFUSED = [   # (field, value, what the one line says after "context.json: ")
    ("layers", 10**9, "layers: 1000000000 is not an integer in 0..10000"),
    ("dtype", "nope", "dtype: 'nope' is not a dtype contexts are saved in; allowed: float32, bfloat16, float16"),
    ("dtype", 5, "dtype: 5 is not a dtype contexts are saved in; allowed: float32, bfloat16, float16"),
    ("dtype", "float64", "dtype: 'float64' is not a dtype contexts are saved in; allowed: float32, bfloat16, float16"),
    ("model.fingerprint", 12345, "model.fingerprint: 12345 is not a fingerprint"),
    ("origin.task", "agnews", "origin.task: 'agnews', but the embedded task definition is 'sentiment-demo'"),
    ("origin.seed", 1, "json_sha256: the content's sha256 is"),
    ("prefix_ids", "garbage", "prefix_ids: 'garbage' is not a list, but tokens is"),
    ("prefix_ids", [None], "prefix_ids: holds 1 ids, but tokens is"),
    ("steps_done", 999, "steps_done: 999 is not an integer in 0..3 (tuning.steps is 3)"),
    ("steps_done", -5, "steps_done: -5 is not an integer in 0..3"),
    ("steps_done", 10**400, f"steps_done: 1{'0' * 56}... is not an integer in 0..3"),     # cut, never 401 digits
    ("steps_done", 2, "history: holds 3 steps, but steps_done is 2"),
    ("demonstrations", {"text": "x"}, "demonstrations: {\"text\": \"x\"} is not a string"),
    ("history", [[]], "history: holds 1 steps, but steps_done is 3"),
    ("stopped", ["no"], "stopped: [\"no\"] is not a one-line string"),
    ("method", {"name": "grad_kv", "options": {"lr": "x"}}, "method: is set together with tuning"),
    ("model.name", ["tiny"], "model.name: [\"tiny\"] is not a non-empty one-line string"),
    ("model.name", "x\ny", "model.name: 'x\\ny' is not a non-empty one-line string"),
    ("model.name", "tiny-gpt2", "json_sha256: the content's sha256 is"),
    ("task.choices", ["bad", "good"], "json_sha256: the content's sha256 is"),
]


@pytest.mark.parametrize("field, value, says", REFUSED, ids=[f"{f}={str(v)[:12]}" for f, v, _ in REFUSED])
def test_predict_refuses_an_altered_context_in_one_line_before_loading_the_model(
        ctx_dir, tmp_path, capsys, monkeypatch, field, value, says):
    bad = tmp_path / "bad"
    shutil.copytree(ctx_dir, bad)
    set_field(bad, field, value)
    monkeypatch.setattr("deepthink.infer.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "q.txt").write_text("Review: witty\n")
    for extra in ([], ["--choices", "a,b"]):
        code, out, err = run(capsys, "predict", "--context", bad, *extra, "--input", tmp_path / "q.txt")
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"deepthink predict: error: {bad / 'context.json'}: {says}"), err
    code, _, err = run(capsys, "generate", "--context", bad, "--prompt", "x")
    assert code == 2 and err.startswith(f"deepthink generate: error: {bad / 'context.json'}: {says}"), err


def test_predict_refuses_deeply_nested_json_and_a_damaged_tensor_header(ctx_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(ctx_dir, bad)
    (tmp_path / "q.txt").write_text("Review: witty\n")
    (bad / "context.json").write_text("[" * 100_000)
    code, _, err = run(capsys, "predict", "--context", bad, "--input", tmp_path / "q.txt")
    assert code == 2 and err == (f"deepthink predict: error: {bad / 'context.json'}: cannot be read as JSON (nested "
                                 "too deeply): the artifact is damaged; re-run `deepthink tune`\n")
    shutil.copy(ctx_dir / "context.json", bad / "context.json")
    (bad / "context.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    code, _, err = run(capsys, "predict", "--context", bad, "--input", tmp_path / "q.txt")
    assert code == 2 and err.count("\n") == 1 and err.startswith(
        f"deepthink predict: error: {bad / 'context.safetensors'}: is not a safetensors file (header length "), err


def test_a_format_1_context_predicts_as_before_with_one_warning(ctx_dir, tmp_path, capsys):
    from conftest import as_format_1

    old = tmp_path / "old"
    shutil.copytree(ctx_dir, old)
    (old / "context.json").write_text(json.dumps(as_format_1(json.loads((ctx_dir / "context.json").read_text()))))
    (tmp_path / "q.txt").write_text("a witty, gorgeous film\nboilerplate\n")
    code, out, err = run(capsys, "predict", "--context", old, "--input", tmp_path / "q.txt")
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("deepthink predict: warning: ")]
    assert len(warning) == 1 and "has no json_sha256" in warning[0] and "re-save it" in warning[0]
    code, new, _ = run(capsys, "predict", "--context", ctx_dir, "--input", tmp_path / "q.txt")
    assert code == 0 and jsonl(out) == jsonl(new)          # the task its origin names, as before


# ---------------------------------------------------------------- portable contexts (issue 27)

TICKET = """name: ticket
query_field: text
choices: [bug, feature]
query_template: "Ticket: {query}\\nKind:"
choice_template: "Ticket: {query}\\nKind: {choice}"
data_files: {train: train.jsonl, eval: eval.jsonl}
"""


@pytest.fixture
def ticket_ctx(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A context tuned in `project/` on the task file ticket.yaml, given as a relative path."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "ticket.yaml").write_text(TICKET)
    rows = [{"text": "the app crashes on start", "label": 0}, {"text": "please add a dark mode", "label": 1},
            {"text": "login button does nothing", "label": 0}, {"text": "export to csv would help", "label": 1}]
    for split in ("train", "eval"):
        (project / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(project)
    code, _, err = run(capsys, "tune", "--model", tiny_model_dir, "--task", "ticket.yaml", "--shots", 1,
                       "--method", "forward", "--steps", 2, "--out", "ctx")
    assert code == 0, err
    assert json.loads((project / "ctx" / "context.json").read_text())["origin"]["task"] == "ticket.yaml"
    return project


def test_a_copied_context_predicts_from_any_folder_without_its_task_file(ticket_ctx, tmp_path, capsys, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(ticket_ctx / "ctx", elsewhere / "ctx")
    (elsewhere / "q.jsonl").write_text('{"text": "crash when saving", "label": 0}\n{"text": "add tabs"}\n')
    monkeypatch.chdir(elsewhere)                                   # no ticket.yaml here
    code, out, err = run(capsys, "predict", "--context", "ctx", "--input", "q.jsonl")
    assert code == 0, err
    rows = jsonl(out)
    assert [r["query"] for r in rows] == ["Ticket: crash when saving\nKind:", "Ticket: add tabs\nKind:"]
    assert all(r["choices"] == [" bug", " feature"] for r in rows) and rows[0]["label"] == 0
    # the same task given again (another copy of the file): used; a task that formats rows differently: refused
    (elsewhere / "same.yaml").write_text(TICKET.replace("name: ticket", "name: ticket-copy"))
    code, again, _ = run(capsys, "predict", "--context", "ctx", "--task", "same.yaml", "--input", "q.jsonl")
    assert code == 0 and jsonl(again) == rows
    (elsewhere / "other.yaml").write_text(TICKET.replace("Kind:", "Type:"))
    code, _, err = run(capsys, "predict", "--context", "ctx", "--task", "other.yaml", "--input", "q.jsonl")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("deepthink predict: error: --task other.yaml: formats rows differently from the task "
                          "'ticket' that ctx was tuned on (stored in its context.json): query_template, "
                          "choice_template differ (query_template: 'Ticket: {query}\\nType:' instead of "
                          "'Ticket: {query}\\nKind:'); drop --task to use the stored task"), err


def test_a_format_1_context_names_its_relative_task_file_when_it_is_missing(ticket_ctx, tmp_path, capsys,
                                                                              monkeypatch):
    from conftest import as_format_1

    old = tmp_path / "old"
    shutil.copytree(ticket_ctx / "ctx", old)
    (old / "context.json").write_text(json.dumps(as_format_1(json.loads((old / "context.json").read_text()))))
    (tmp_path / "q.txt").write_text("crash\n")
    code, _, err = run(capsys, "predict", "--context", old, "--input", tmp_path / "q.txt")     # from project/: found
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "predict", "--context", old, "--input", tmp_path / "q.txt")
    assert code == 2 and err.count("\n") == 1 and "ticket.yaml: cannot read task file" in err
    assert "names the task file 'ticket.yaml' relative to the folder `tune` ran in" in err
