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
    err = error(capsys, "predict", "--context", ctx_dir, "--task", "copa", *q)
    assert "task 'copa' needs JSONL rows" in err
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


@pytest.mark.parametrize("command", ["tune", "predict", "generate"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and f"usage: deepthink {command}" in capsys.readouterr().out
