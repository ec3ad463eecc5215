"""Your own examples end to end: a task from --template/--choices/--train, text labels, train-only data, text
demonstrations split by the template, and `deepthink.tune` as the one code path of the CLI's `tune`."""
import json
import warnings
from pathlib import Path

import pytest
import torch

import deepthink
from deepthink import api
from deepthink.cli import main
from deepthink.data import make_plan
from deepthink.context_schema import task_definition, task_from_definition
from deepthink.tasks import Task, load_task_file, task_from_template, template_of
from conftest import approx

TEMPLATE = "Ticket: {text}\\nUrgency:"          # as typed on a command line: \n is a newline
CHOICES = "low,medium,high"
TICKETS = [("The site is down for every customer, we are losing sales", "high"),
           ("Could you change the colour of the footer link?", "low"),
           ("Checkout fails for some users on mobile", "medium"),
           ("Production database is not responding", "high"),
           ("Typo on the about page", "low"),
           ("Export to CSV is slow for large reports", "medium")]


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tickets(tmp_path, labels=None) -> Path:
    rows = [{"text": t, "label": y if labels is None else labels(i, y)} for i, (t, y) in enumerate(TICKETS)]
    return write_rows(tmp_path / "tickets.jsonl", rows)


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"deepthink {argv[0]}: error: "), err
    return last


def meta(folder) -> dict:
    return json.loads((Path(folder) / "context.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the README's "your own data" journey

def test_six_tickets_tune_then_predict(tiny_model_dir, tmp_path, capsys):
    """Six labelled rows, no task file, no eval file: tune (the default method) then predict new tickets."""
    train = tickets(tmp_path)
    code, out, err = run(capsys, "tune", "--model", tiny_model_dir, "--train", train, "--template", TEMPLATE,
                         "--choices", CHOICES, "--steps", 3, "--out", tmp_path / "ctx")
    assert code == 0, err
    m = meta(tmp_path / "ctx")
    sel = m["method"]["selection"]
    assert m["method"]["name"] == "grad_kv" and sel["rule"] == "dev-acc"
    assert sel["dev_items"] == 3                                   # 6 rows - 1 demonstration per label
    assert m["origin"] == {"task": "tickets", "seed": 0, "shots": 1}
    assert m["task"]["query_template"] == "Ticket: {query}\nUrgency:"     # the whole task is stored: portable
    assert m["task"]["query_field"] == "text" and m["task"]["choices"] == ["low", "medium", "high"]
    assert m["demonstrations"].count("\nUrgency: ") == 3 and m["demonstrations"].endswith("\n\n")
    # progress on stderr, one line per step, and the small dev set said plainly
    assert [line.split()[1] for line in err.splitlines() if line.startswith("step ")] == ["1/3", "2/3", "3/3"]
    assert "ETA" in err and "dev acc" in err and "loss" in err
    assert "only 3 dev items" in err and "--dev-size" in err and "--selection" in err
    # predict: the task comes from the context; rows without a label, and one with a label name
    new = write_rows(tmp_path / "new.jsonl", [{"text": "Payments are failing for everyone"},
                                              {"text": "Please update the logo", "label": "low"}])
    code, out, err = run(capsys, "predict", "--context", tmp_path / "ctx", "--input", new)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0]["query"] == "Ticket: Payments are failing for everyone\nUrgency:"
    assert rows[0]["choices"] == [" low", " medium", " high"] and "label" not in rows[0] and rows[1]["label"] == 0
    # the same flags on predict give the same rows; plain lines fill the template's field
    code, again, _ = run(capsys, "predict", "--context", tmp_path / "ctx", "--template", TEMPLATE, "--choices",
                         CHOICES, "--input", new)
    assert code == 0 and again == out
    (tmp_path / "new.txt").write_text("Payments are failing for everyone\n")
    code, plain, _ = run(capsys, "predict", "--context", tmp_path / "ctx", "--input", tmp_path / "new.txt")
    assert code == 0 and json.loads(plain)["logprob"] == approx(rows[0]["logprob"], abs=1e-5)


# ---------------------------------------------------------------- labels

def test_labels_by_name_index_or_format(tmp_path):
    task = task_from_template("Ticket: {text}\nUrgency:", ["low", "medium", "high"])
    assert [task.example({"text": "x", "label": y}, 0, "train").label for y in ("high", " low ", 1, "2")] == [2, 0, 1, 2]
    with pytest.raises(ValueError, match=r"train row 4: label 'urgent' matches no choice: expected one of the names "
                                         r"low, medium, high or a 0-based index"):
        task.example({"text": "x", "label": "urgent"}, 4, "train")
    with pytest.raises(ValueError, match=r"label 3 out of range for 3 choices \(low, medium, high\)"):
        task.example({"text": "x", "label": 3}, 0, "train")
    # a task file in the int format (copied from sst2.yaml) takes label names too; the format's reading comes first
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nquery_field: s\nchoices: [neg, pos]\nquery_template: 'R: {query}\\nS:'\n"
                    "choice_template: 'R: {query}\\nS: {choice}'\n")
    t = load_task_file(path)
    assert [t.example({"s": "x", "label": y}, 0, "eval").label for y in ("pos", 0, "1")] == [1, 0, 1]
    for fmt, value in (("letter", "B"), ("one_based", 2), ("names", "pos")):
        path.write_text(path.read_text().split("label_format")[0] + f"label_format: {fmt}\n")
        assert load_task_file(path).example({"s": "x", "label": value}, 0, "eval").label == 1


def test_a_wrong_label_is_refused_by_row_in_the_draw(tiny_model_dir, tmp_path, capsys):
    train = tickets(tmp_path, labels=lambda i, y: "urgent" if i == 3 else y)
    err = refused(capsys, "tune", "--model", tiny_model_dir, "--train", train, "--template", TEMPLATE,
                  "--choices", CHOICES, "--out", tmp_path / "c")
    assert "train row 3: label 'urgent' matches no choice: expected one of the names low, medium, high" in err
    indices = tickets(tmp_path, labels=lambda i, y: ["low", "medium", "high"].index(y))   # indices work as well
    plan = make_plan(task_from_template("Ticket: {text}\nUrgency:", ["low", "medium", "high"], train=indices), 0,
                     dev_size=8, score=False)
    assert sorted(e.label for e in plan.demos) == [0, 1, 2] and len(plan.dev) == 3 and plan.eval == []
    assert not (tmp_path / "c").exists()


def test_task_flags_are_checked(tiny_model_dir, tmp_path, capsys):
    train = tickets(tmp_path)
    out = ["--out", tmp_path / "c"]
    assert "--template needs --choices" in refused(capsys, "tune", "--model", tiny_model_dir, "--train", train,
                                                   "--template", TEMPLATE, *out)
    assert "not both" in refused(capsys, "tune", "--model", tiny_model_dir, "--task", "sst2", "--template", TEMPLATE,
                                 "--choices", CHOICES, *out)
    assert "--train goes with --template" in refused(capsys, "tune", "--model", tiny_model_dir, "--task", "sst2",
                                                     "--train", train, *out)
    assert "names no field" in refused(capsys, "tune", "--model", tiny_model_dir, "--train", train, "--template",
                                       "Urgency:", "--choices", CHOICES, *out)
    assert "duplicate names" in refused(capsys, "tune", "--model", tiny_model_dir, "--train", train, "--template",
                                        TEMPLATE, "--choices", "low,low", *out)
    err = refused(capsys, "tune", "--model", tiny_model_dir, "--train", train, "--template", "T: {body}\\nU:",
                  "--choices", CHOICES, *out)
    assert "missing field 'body' (its fields: label, text)" in err
    err = refused(capsys, "tune", "--model", tiny_model_dir, "--train", train, "--template", "T: {text} {body}\\nU:",
                  "--choices", CHOICES, *out)
    assert "the template needs the field 'body', which the row lacks (its fields: label, text)" in err


def test_a_template_with_two_fields(tmp_path):
    task = task_from_template("Subject: {subject}\nBody: {body}\nUrgency:", ["low", "high"])
    e = task.example({"subject": "Down", "body": "all of it", "label": "high"}, 0, "train")
    assert e.query == "Subject: Down\nBody: all of it\nUrgency:" and e.continuations == (" low", " high")
    assert isinstance(task, Task) and task.query_field == "subject"
    assert template_of(task) == "Subject: {subject}\nBody: {body}\nUrgency:"
    stored = task_from_definition(json.loads(json.dumps(task_definition(task))), "context.json")   # as stored
    assert stored.example({"subject": "Down", "body": "all of it", "label": "high"}, 0, "input").query == e.query


# ---------------------------------------------------------------- train-only data, dev items

def test_no_eval_file_and_the_warning_when_no_dev_rows_are_left(tiny_model_dir, tmp_path, capsys):
    three = write_rows(tmp_path / "three.jsonl", [{"text": t, "label": y} for t, y in TICKETS[:3]])
    code, out, err = run(capsys, "tune", "--model", tiny_model_dir, "--train", three, "--template", TEMPLATE,
                         "--choices", CHOICES, "--steps", 2, "--quiet", "--out", tmp_path / "c")
    assert code == 0, err
    assert "warning: no dev items (training rows left after the demonstrations, 3 demonstrations)" in err
    assert "leave-one-out" in err and "--selection loo" in err and "--dev-size 0" in err
    assert "step 1/2" not in err                                                    # --quiet
    assert meta(tmp_path / "c")["method"]["selection"]["rule"] == "loo"
    # a task file with only train data: tune needs no eval.jsonl either
    data = tmp_path / "data" / "tix"
    data.mkdir(parents=True)
    tickets(data).rename(data / "train.jsonl")
    (tmp_path / "tix.yaml").write_text("name: tix\nquery_field: text\nchoices: [low, medium, high]\n"
                                       "query_template: 'Ticket: {query}\\nUrgency:'\n"
                                       "choice_template: 'Ticket: {query}\\nUrgency: {choice}'\n")
    code, _, err = run(capsys, "tune", "--model", tiny_model_dir, "--task", tmp_path / "tix.yaml", "--data-dir",
                       tmp_path / "data", "--steps", 2, "--out", tmp_path / "d")
    assert code == 0, err
    assert meta(tmp_path / "d")["method"]["selection"]["dev_items"] == 3


# ---------------------------------------------------------------- text demonstrations with the default method

DEMO_TEXT = ("Ticket: The site is down\nUrgency: high\n\nTicket: Typo on a page\nUrgency: low\n\n"
             "Ticket: Export is slow\nUrgency: medium\n")


def test_text_demonstrations_are_split_by_the_template(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "demos.txt").write_text(DEMO_TEXT)
    train = tickets(tmp_path)
    code, _, err = run(capsys, "tune", "--model", tiny_model_dir, "--demos", tmp_path / "demos.txt", "--train", train,
                       "--template", TEMPLATE, "--choices", CHOICES, "--steps", 2, "--out", tmp_path / "c")
    assert code == 0, err
    m = meta(tmp_path / "c")
    assert m["demonstrations"] == DEMO_TEXT + "\n"                     # each demonstration ends with a blank line
    assert m["method"]["selection"]["dev_items"] == 6                 # no training row is a demonstration
    task = task_from_template("Ticket: {text}\nUrgency:", ["low", "medium", "high"])
    items = task.parse_demonstrations(DEMO_TEXT)
    assert [(e.query, e.label) for e in items] == [("Ticket: The site is down\nUrgency:", 2),
                                                  ("Ticket: Typo on a page\nUrgency:", 0),
                                                  ("Ticket: Export is slow\nUrgency:", 1)]
    bad = DEMO_TEXT.replace("Urgency: medium", "Urgency: urgent")
    (tmp_path / "bad.txt").write_text(bad)
    err = refused(capsys, "tune", "--model", tiny_model_dir, "--demos", tmp_path / "bad.txt", "--template", TEMPLATE,
                  "--choices", CHOICES, "--out", tmp_path / "d")
    assert "bad.txt: demonstration 3 of 3 does not match the template" in err and "low, medium, high" in err
    # a built-in task's template splits text too (sentiment-demo: Review/Sentiment)
    items = deepthink.get_task("sentiment-demo").parse_demonstrations(
        "Review: dull\nSentiment: negative\n\nReview: witty\nSentiment: positive\n\n")
    assert [e.label for e in items] == [0, 1]
    with pytest.raises(ValueError, match="per-item choices"):
        deepthink.get_task("copa").parse_demonstrations("x")


# ---------------------------------------------------------------- one code path: deepthink.tune == deepthink tune

def test_library_tune_gives_the_cli_context(tiny_model_dir, tmp_path, capsys):
    train = tickets(tmp_path)
    code, _, err = run(capsys, "tune", "--model", tiny_model_dir, "--train", train, "--template", TEMPLATE,
                       "--choices", CHOICES, "--steps", 4, "--dev-size", 2, "--out", tmp_path / "cli")
    assert code == 0, err
    lm = deepthink.load_model(str(tiny_model_dir))
    cli = deepthink.TunedContext.load(tmp_path / "cli", lm)
    task = deepthink.task_from_template("Ticket: {text}\nUrgency:", ["low", "medium", "high"], train=train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = deepthink.tune(lm, task, method="grad_kv", steps=4, dev_size=2)
    assert not [w for w in caught if "dev items" in str(w.message)]         # 2 asked, 2 there: no warning
    assert ctx.steps_done == cli.steps_done == ctx.method["selection"]["chosen_steps"]
    assert ctx.prefix_ids == cli.prefix_ids and ctx.demonstrations == cli.demonstrations
    for a, b in zip(ctx.keys + ctx.values, cli.keys + cli.values):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    want, got = meta(tmp_path / "cli"), meta(ctx.save(tmp_path / "lib"))
    wl, gl = want["method"]["selection"].pop("train_loss"), got["method"]["selection"].pop("train_loss")
    assert wl[0] is None and gl[0] is None and gl[1:] == approx(wl[1:], abs=1e-5)
    assert got["method"] == want["method"] and got["origin"] == want["origin"]
    floats = ("history", "checksums", "tensors")
    assert {k: v for k, v in got.items() if k not in floats} == {k: v for k, v in want.items() if k not in floats}
    assert [h["dk"] for h in got["history"]] == approx([h["dk"] for h in want["history"]], abs=1e-5)


def test_library_tune_methods_and_refusals(tmp_path):
    from conftest import tiny_lm

    lm = tiny_lm("llama")
    task = deepthink.get_task("sentiment-demo")
    text = "Review: dull\nSentiment: negative\n\nReview: witty\nSentiment: positive\n\n"
    fwd = deepthink.tune(lm, text, method="forward", steps=2, step_size=0.1)
    old = deepthink.tune(lm, text, deepthink.TuningConfig(steps=2, step_size=0.1))     # the old call, unchanged
    assert fwd.config == old.config and all(torch.equal(a, b) for a, b in zip(fwd.keys, old.keys))
    with pytest.raises(ValueError, match="needs each demonstration's query and answer.*--method forward"):
        deepthink.tune(lm, text)
    ctx = deepthink.tune(lm, text, task=task, steps=2, selection="last")
    assert ctx.method["selection"] == {"rule": "last", "chosen_steps": 2} and ctx.origin == {"task": "sentiment-demo"}
    steps = []
    deepthink.tune(lm, text, task=task, steps=3, dev_size=0, progress=steps.append)
    assert [s["step"] for s in steps] == [1, 2, 3] and steps[0]["loss"] is None and steps[1]["loss"] > 0
    assert all(s["eta"] >= 0 and s["elapsed"] >= 0 for s in steps)
    with pytest.raises(ValueError, match=r"method 'grad_kv' has no option\(s\) \['step_size'\]"):
        deepthink.tune(lm, task, step_size=0.1)
    with pytest.raises(ValueError, match="unknown method 'ridge'; valid: grad_kv, forward"):
        deepthink.tune(lm, task, method="ridge")
    with pytest.raises(ValueError, match="demonstrations are empty"):
        deepthink.tune(lm, "   ")


# ---------------------------------------------------------------- eval and generate

def test_eval_takes_the_task_flags(tiny_model_dir, tmp_path, capsys):
    train = tickets(tmp_path)
    evals = write_rows(tmp_path / "held_out.jsonl", [{"text": "Login broken for all", "label": "high"},
                                                     {"text": "Rename a button", "label": "low"}])
    code, _, err = run(capsys, "eval", "--model", tiny_model_dir, "--train", train, "--eval", evals, "--template",
                       TEMPLATE, "--choices", CHOICES, "--methods", "icl", "--quiet", "--out", tmp_path / "run")
    assert code == 0, err
    unit = json.loads(next((tmp_path / "run" / "units").glob("*.json")).read_text())
    assert unit["task"] == "tickets" and "icl" in unit["methods"]
    assert "needs --train ROWS.jsonl" in refused(capsys, "eval", "--model", tiny_model_dir, "--train", train,
                                                 "--template", TEMPLATE, "--choices", CHOICES, "--out", tmp_path / "x")


def test_generate_stop(tiny_model_dir, tmp_path, capsys):
    text = "Review: dull\nSentiment: negative\n\nReview: witty\nSentiment: positive\n\n"
    (tmp_path / "d.txt").write_text(text)
    assert run(capsys, "tune", "--model", tiny_model_dir, "--demos", tmp_path / "d.txt", "--method", "forward",
               "--steps", 1, "--out", tmp_path / "c")[0] == 0
    base = ["generate", "--context", tmp_path / "c", "--prompt", "Review: x\nSentiment:", "--max-new-tokens", 12,
            "--no-stop-at-eos"]
    full = run(capsys, *base)[1][:-1]
    assert len(full) > 2
    stop = full[len(full) // 2: len(full) // 2 + 1]                     # a character it generates
    cut = run(capsys, *base, "--stop", stop, "--stop", "never-generated")[1][:-1]
    assert cut == full[:full.find(stop)]                                 # the server's rule: before the first one
    assert "--stop strings must be non-empty" in refused(capsys, *base, "--stop", "")


# ---------------------------------------------------------------- the default dev split (issue 31)

@pytest.mark.parametrize("rows, warned", [(200, False), (90, False), (40, True)])
def test_the_default_dev_split_takes_what_there_is_and_warns_below_64(tmp_path, rows, warned):
    """The default asks for api.DEV_SIZE (128) dev items; with fewer left it takes them all, and says the choice is
    coarse only below api.DEV_FIRM (64), the size the default was measured with before."""
    assert (api.DEV_SIZE, api.DEV_FIRM) == (128, 64)
    train = write_rows(tmp_path / "t.jsonl", [{"text": f"ticket {i}", "label": ["low", "medium", "high"][i % 3]}
                                              for i in range(rows)])
    task = deepthink.task_from_template("Ticket: {text}\nUrgency:", ["low", "medium", "high"], train=train)
    inputs = api.resolve(task, method="grad_kv")
    assert len(inputs.dev) == min(rows - 3, api.DEV_SIZE)
    assert any("dev items" in w for w in inputs.warnings) == warned
    if warned:
        assert f"only {rows - 3} dev items" in " ".join(inputs.warnings)
    # an explicit size larger than the rows left is refused, as before
    with pytest.raises(ValueError, match=f"only {min(rows - 3, 200)} rows are left"):
        api.resolve(task, method="grad_kv", dev_size=1000)
