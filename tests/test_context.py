"""Tuned contexts as artifacts: save -> load round-trips, refusals, predict and generate (library API)."""
import copy
import json
import math
import os
import shutil

import pytest
import torch

import deepthink
from deepthink import TunedContext, TuningConfig, context
from deepthink.context_schema import ContextError, UnverifiedContextWarning, json_sha256
from deepthink.tasks import get_task
from conftest import ARCHS, CHOICES, DEMOS, MULTI, QUERIES, as_format_1, plain_greedy, tiny_lm, tiny_tokenizer

EMOJI_DEMOS = DEMOS + "Review: 很好看的电影 🎬🍿 naïve café\nSentiment: positive\n\n"


def tuned(lm, steps=3, demos=EMOJI_DEMOS):
    ctx = deepthink.tune(lm, demos, TuningConfig(steps=steps, step_size=0.2))
    ctx.origin = {"task": "sentiment-demo", "seed": 0, "shots": 1}
    ctx.task = get_task("sentiment-demo")
    return ctx


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(lm, ctx, path) of a tuned tiny Llama context saved once; tests that damage it work on a copy."""
    lm = tiny_lm("llama")
    ctx = tuned(lm)
    return lm, ctx, ctx.save(tmp_path_factory.mktemp("saved") / "ctx")


@pytest.fixture
def copy_of(saved, tmp_path):
    path = tmp_path / "ctx"
    shutil.copytree(saved[2], path)
    return path


def write_meta(path, meta, digest=True):
    """Write context.json; with digest, re-seal it as a forger would (so that the other checks are what refuses)."""
    if digest and "json_sha256" in meta:
        meta["json_sha256"] = json_sha256(meta)
    (path / context.CONFIG).write_text(json.dumps(meta))


def assert_same_context(a: TunedContext, b: TunedContext):
    assert len(a.keys) == len(b.keys) and len(a.values) == len(b.values)
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    for attr in ("prefix_ids", "config", "demonstrations", "steps_done", "history", "stopped", "origin", "method",
                 "task"):
        assert getattr(a, attr) == getattr(b, attr), attr


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trips_exactly(arch, tmp_path):
    lm = tiny_lm(arch)
    ctx = tuned(lm)
    path = ctx.save(tmp_path / "ctx")
    assert sorted(p.name for p in path.iterdir()) == ["context.json", "context.safetensors"]
    loaded = TunedContext.load(path, lm)
    assert_same_context(ctx, loaded)
    meta = json.loads((path / "context.json").read_text(encoding="utf-8"))
    assert meta["format_version"] == context.FORMAT_VERSION and meta["deepthink_version"] == deepthink.__version__
    assert meta["model"]["name"] == lm.name and meta["model"]["fingerprint"] == lm.fingerprint
    assert meta["model"]["tokenizer_fingerprint"] == lm.tokenizer_fingerprint
    assert meta["dtype"] == "float32" and meta["tuning"] == ctx.config.to_dict()
    assert meta["demonstrations"] == EMOJI_DEMOS and meta["tokens"] == ctx.length == len(ctx.prefix_ids)
    assert [h["step"] for h in meta["history"]] == [1, 2, 3] and len(meta["history"][2]["dk"]) == len(ctx.keys)
    assert meta["task"]["name"] == "sentiment-demo" and meta["task"]["choices"] == ["negative", "positive"]
    assert meta["json_sha256"] == json_sha256(meta)
    # the loaded context saves to byte-identical files: nothing is lost or added on the way
    again = loaded.save(tmp_path / "again")
    for name in ("context.json", "context.safetensors"):
        assert (again / name).read_bytes() == (path / name).read_bytes()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])   # no special tokens (no tensors at all) / BOS only
def test_zero_shot_round_trip(arch, tmp_path):
    lm = tiny_lm(arch)
    ctx = deepthink.zero_shot(lm)
    loaded = TunedContext.load(ctx.save(tmp_path / "zs"), lm)
    assert_same_context(ctx, loaded)
    assert loaded.score(QUERIES, MULTI).logprob == ctx.score(QUERIES, MULTI).logprob


def test_bfloat16_round_trip_and_dtype_refusal(tmp_path):
    base = tiny_lm("qwen2")
    lm = deepthink.wrap_model(copy.deepcopy(base.model).to(torch.bfloat16), base.tokenizer, name="tiny-qwen2-bf16")
    ctx = tuned(lm, steps=2)
    path = ctx.save(tmp_path / "bf16")
    assert json.loads((path / "context.json").read_text())["dtype"] == "bfloat16"
    assert_same_context(ctx, TunedContext.load(path, lm))
    with pytest.raises(ValueError, match=r"tuned in bfloat16, but the model is loaded in float32: .*--dtype bfloat16"):
        TunedContext.load(path, base)


def test_predictions_from_loaded_equal_in_memory(saved):
    lm, ctx, path = saved
    loaded = TunedContext.load(path, lm)
    for choices in (CHOICES, MULTI):
        assert loaded.score(QUERIES, choices).logprob == ctx.score(QUERIES, choices).logprob
        assert loaded.predict(QUERIES, choices) == ctx.predict(QUERIES, choices)
    assert loaded.generate_tokens(QUERIES[0], 8) == ctx.generate_tokens(QUERIES[0], 8)


def test_diverged_tuning_is_recorded_in_the_artifact(tmp_path):
    lm = tiny_lm("llama")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=6, step_size=1e38, momentum=0.0))
    path = ctx.save(tmp_path / "nan")
    loaded = TunedContext.load(path, lm)
    def strict(constant):
        raise AssertionError(f"{constant} in context.json: not strict JSON")
    json.loads((path / "context.json").read_text(), parse_constant=strict)   # huge norms stay finite numbers
    assert loaded.stopped == ctx.stopped and "non-finite" in loaded.stopped
    assert loaded.steps_done == len(loaded.history) < 6
    assert all(torch.isfinite(t).all() for t in loaded.keys + loaded.values)


# ---------------------------------------------------------------- predict

def test_predict_rows_and_normalize(saved):
    _, ctx, _ = saved
    rows = ctx.predict(QUERIES, MULTI)
    scores = ctx.score(QUERIES, MULTI)
    for row, q, cs, lp, norm, p, pn in zip(rows, QUERIES, MULTI, scores.logprob, scores.normalized,
                                          scores.predictions(), scores.predictions(normalize=True)):
        assert row == {"query": q, "choices": cs, "logprob": lp, "normalized": norm, "prediction": p,
                       "prediction_normalized": pn, "answer": cs[p]}
    assert [r["answer"] for r in ctx.predict(QUERIES, MULTI, normalize=True)] == \
           [cs[p] for cs, p in zip(MULTI, scores.predictions(normalize=True))]


def test_predict_groups_queries_with_different_numbers_of_choices(saved):
    """score() refuses mixed sizes (test_scoring); predict() scores each size as its own group."""
    _, ctx, _ = saved
    choices = [MULTI[0], CHOICES, MULTI[2]]
    rows = ctx.predict(QUERIES, choices)
    for i, row in enumerate(rows):
        assert row["logprob"] == pytest.approx(ctx.score([QUERIES[i]], [choices[i]]).logprob[0], abs=1e-5)
    with pytest.raises(ValueError, match="same number of choices"):
        ctx.score(QUERIES, choices)
    # errors name the caller's query index, not the index inside a group
    with pytest.raises(ValueError, match=r"query 2: duplicate choices"):
        ctx.predict(QUERIES, [MULTI[0], CHOICES, [" a", " a"]])
    with pytest.raises(ValueError, match="3 queries but 2"):
        ctx.predict(QUERIES, [CHOICES, CHOICES])


# ---------------------------------------------------------------- generate

@pytest.mark.parametrize("arch", ARCHS)
def test_generate_step1_equals_plain_generation(arch):
    lm = tiny_lm(arch)
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    for prompt in ("Review: witty and gorgeous\nSentiment:", "Review: 很好看 🎬"):
        got = ctx.generate_tokens(prompt, max_new_tokens=12, stop_at_eos=False)
        assert got == plain_greedy(lm, DEMOS, prompt, 12)
        assert ctx.generate(prompt, max_new_tokens=12, stop_at_eos=False) == lm.tokenizer.decode(got)


@pytest.mark.parametrize("arch, window", [("gemma3", {"sliding_window": 16}), ("mistral", {"sliding_window": 16}),
                                          ("gpt_neo", {"window_size": 16})])
def test_generate_past_a_sliding_window_equals_plain_generation(arch, window):
    """Prefix (~53 tokens) + prompt + new tokens far beyond a 16-token window: the model's mask still applies."""
    lm = tiny_lm(arch, **window)
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    assert ctx.generate_tokens(QUERIES[0], 12, stop_at_eos=False) == plain_greedy(lm, DEMOS, QUERIES[0], 12)


def test_generate_stops_at_eos():
    lm = tiny_lm("gpt2")
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=2, step_size=0.2))
    full = ctx.generate_tokens(QUERIES[0], 30, stop_at_eos=False)
    eos = lm.tokenizer.eos_token_id
    cut = ctx.generate_tokens(QUERIES[0], 30)
    assert cut == (full[:full.index(eos)] if eos in full else full)


def test_sampling_is_seeded_and_a_tiny_nucleus_is_greedy(saved):
    _, ctx, _ = saved
    a = ctx.generate_tokens(QUERIES[0], 16, temperature=1.5, seed=1, stop_at_eos=False)
    assert a == ctx.generate_tokens(QUERIES[0], 16, temperature=1.5, seed=1, stop_at_eos=False)
    samples = {tuple(ctx.generate_tokens(QUERIES[0], 16, temperature=1.5, seed=s, stop_at_eos=False))
               for s in range(2, 6)}
    assert len(samples | {tuple(a)}) > 1
    greedy = ctx.generate_tokens(QUERIES[0], 16, stop_at_eos=False)
    assert ctx.generate_tokens(QUERIES[0], 16, temperature=1.5, top_p=1e-3, seed=3, stop_at_eos=False) == greedy


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": True}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"temperature": 1e-45}, "temperature must be 0"), ({"top_p": 1e-300}, "top_p must be between"),   # overflowed
    ({"prompt": ""}, "tokenises to nothing"),
    ({"max_new_tokens": 250}, "exceed the model's 256 positions"),
])
def test_generate_bad_arguments(kwargs, match):
    lm = tiny_lm("gpt2")   # 256 positions
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    kwargs = {"prompt": QUERIES[0], **kwargs}
    with pytest.raises(ValueError, match=match):
        ctx.generate(**kwargs)


# ---------------------------------------------------------------- load refuses

def test_refuses_another_model(saved):
    _, _, path = saved
    with pytest.raises(ValueError, match=r"made for model 'tiny-llama' .*fingerprint .* load the model"):
        TunedContext.load(path, tiny_lm("llama", seed=1))


def test_refuses_another_tokenizer(saved):
    lm, _, path = saved
    other = deepthink.wrap_model(lm.model, tiny_tokenizer(bos=False), name="tiny-llama")   # same weights
    with pytest.raises(ValueError, match="tokenizer fingerprint"):
        TunedContext.load(path, other)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_refuses_truncated_or_altered_tensors(saved, copy_of, damage):
    f = copy_of / context.TENSORS
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    else:
        data[-5] ^= 0x01
    f.write_bytes(bytes(data))
    # truncated: the header's byte ranges run past the end (found before any tensor is read); flipped: the sha256
    with pytest.raises(ValueError, match="does not hold .* bytes inside the file" if damage == "truncate"
                       else "altered or truncated"):
        TunedContext.load(copy_of, saved[0])


def test_refuses_tensors_that_do_not_match_the_json(saved, copy_of):
    """A consistent but wrong tensor file (checksum updated too) is still refused, naming the tensor."""
    from safetensors.torch import load_file, save_file

    f = copy_of / context.TENSORS
    tensors = load_file(f)
    tensors["k.1"] = tensors["k.1"][:, :-1].contiguous()
    save_file(tensors, f)
    meta = json.loads((copy_of / context.CONFIG).read_text())
    meta["checksums"][context.TENSORS] = context.sha256_bytes(f.read_bytes())
    write_meta(copy_of, meta)
    with pytest.raises(ValueError, match=r'context.safetensors: tensor k.1: expected {"shape": \[2, 102, 8\].* the '
                                         r'header has {"shape": \[2, 101, 8\].*does not match context.json'):
        TunedContext.load(copy_of, saved[0])


@pytest.mark.parametrize("version, match", [(4, "newer than the 3 this deepthink reads.*upgrade"),
                                            (0, "not one deepthink knows"), ("1", "not one deepthink knows")])
def test_refuses_unknown_format_version(saved, copy_of, version, match):
    meta = json.loads((copy_of / context.CONFIG).read_text())
    meta["format_version"] = version
    (copy_of / context.CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        TunedContext.load(copy_of, saved[0])


def test_refuses_missing_files_and_damaged_json(saved, copy_of, tmp_path):
    lm = saved[0]
    with pytest.raises(FileNotFoundError, match="no saved context"):
        TunedContext.load(tmp_path / "nowhere", lm)
    (copy_of / context.TENSORS).rename(tmp_path / "kept.safetensors")
    with pytest.raises(FileNotFoundError, match="context.safetensors is missing"):
        TunedContext.load(copy_of, lm)
    (tmp_path / "kept.safetensors").rename(copy_of / context.TENSORS)
    text = (copy_of / context.CONFIG).read_text()
    (copy_of / context.CONFIG).write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match="cannot be read as JSON"):
        TunedContext.load(copy_of, lm)
    meta = json.loads(text)
    del meta["checksums"], meta["model"]["fingerprint"]
    (copy_of / context.CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['checksums', 'model.fingerprint'\]"):
        TunedContext.load(copy_of, lm)
    (copy_of / context.CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match="context.json not found"):
        TunedContext.load(copy_of, lm)


# ---------------------------------------------------------------- save refuses / never half-writes

def test_save_refuses_existing_folders_unless_overwrite(saved, tmp_path):
    lm, ctx, _ = saved
    other = tmp_path / "not-a-context"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and does not hold a deepthink context"):
        ctx.save(other, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        ctx.save(tmp_path / "a-file")
    (tmp_path / "empty").mkdir()
    ctx.save(tmp_path / "empty")                        # an empty folder is fine
    first = ctx.save(tmp_path / "ctx")
    with pytest.raises(FileExistsError, match="already holds a tuned context: pass --overwrite"):
        ctx.save(first)
    newer = tuned(lm, steps=2)
    newer.save(first, overwrite=True)
    assert TunedContext.load(first, lm).steps_done == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "ctx", "empty", "not-a-context"]


def test_save_refuses_an_unwritable_output_dir(saved, tmp_path, monkeypatch):
    ctx = saved[1]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="is not writable"):
        ctx.save(tmp_path / "file" / "ctx")             # parent is a file
    if os.geteuid() != 0:                               # root writes anywhere: only checkable as a user
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(OSError, match="is not writable"):
            ctx.save(ro / "ctx")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(context.tempfile, "mkdtemp", denied)
    with pytest.raises(OSError, match=r"is not writable \(Permission denied\); choose another output directory"):
        ctx.save(tmp_path / "ctx")


@pytest.mark.parametrize("when", [1, 2])   # 1: while writing the tensors, 2: while writing context.json
def test_interrupted_save_leaves_nothing_load_accepts(saved, tmp_path, monkeypatch, when):
    lm, ctx, _ = saved
    old = tuned(lm, steps=2).save(tmp_path / "old")
    real, calls = context.write_synced, []

    def interrupted(path, write):
        calls.append(path)
        if len(calls) == when:
            path.write_bytes(b"partial")
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(context, "write_synced", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ctx.save(tmp_path / "new")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        ctx.save(old, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]      # no new folder, no temporary leftovers
    with pytest.raises(FileNotFoundError):
        TunedContext.load(tmp_path / "new", lm)
    assert TunedContext.load(old, lm).steps_done == 2                  # the earlier context is untouched
    # a process killed mid-write (no cleanup) leaves a temporary folder without context.json
    killed = tmp_path / ".new.tmp-killed"
    killed.mkdir()
    (killed / context.TENSORS).write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="not a \\(complete\\) saved deepthink context"):
        TunedContext.load(killed, lm)


# ---------------------------------------------------------------- altered or hostile context.json (issue 26)

def altered(path, field, value, reseal=True):
    """Set the dotted `field` of path/context.json to `value` (a callable: applied to the meta instead)."""
    meta = json.loads((path / context.CONFIG).read_text())
    if callable(value):
        value(meta)
    else:
        *parents, last = field.split(".") if not field.startswith("tensors.") else ["tensors", *field[8:].rsplit(".", 1)]
        node = meta
        for key in parents:
            node = node[key]
        node[last] = value
    write_meta(path, meta, digest=reseal)
    return meta


def set_prefix_id(i, value):
    def change(meta):
        meta["prefix_ids"][i] = value
    return change


# (field changed, new value, the field the refusal names, words it says). Each file is re-sealed as a forger would
# (json_sha256 recomputed): the schema refuses on its own, before the digest is even compared.
GARBAGE = [
    ("layers", 10**9, "layers", "not an integer in 0..10000"),
    ("layers", 3, "tensors", "lists 4 tensors, but layers is 3"),
    ("layers", "2", "layers", "not an integer"),
    ("dtype", "nope", "dtype", "allowed: float32, bfloat16, float16"),
    ("dtype", 5, "dtype", "allowed: float32, bfloat16, float16"),
    ("dtype", "float64", "dtype", "allowed: float32, bfloat16, float16"),
    ("model.fingerprint", 12345, "model.fingerprint", "is not a fingerprint"),
    ("model.tokenizer_fingerprint", "abc", "model.tokenizer_fingerprint", "not a sha256"),
    ("model.name", 12345, "model.name", "not a non-empty one-line string"),
    ("model.name", "", "model.name", "not a non-empty one-line string"),
    ("model.name", "tiny\nllama", "model.name", "one-line"),
    ("model.name", "x" * 5000, "model.name", "at most 4096 characters"),
    ("model.max_positions", -1, "model.max_positions", "not an integer"),
    ("origin.task", "agnews", "origin.task", "'agnews', but the embedded task definition is 'sentiment-demo'"),
    ("origin.task", 7, "origin.task", "not a non-empty one-line string"),
    ("origin.shots", -2, "origin.shots", "not an integer"),
    ("origin", "sst2", "origin", "not a JSON object"),
    ("origin.where", "?", "origin", "unknown key(s)"),
    ("prefix_ids", "garbage", "prefix_ids", "is not a list, but tokens is 102"),
    ("prefix_ids", [1, 2, 3], "prefix_ids", "holds 3 ids, but tokens is 102"),
    ("prefix_ids", set_prefix_id(3, "x"), "prefix_ids[3]", "not a token id"),
    ("prefix_ids", set_prefix_id(0, -1), "prefix_ids[0]", "not a token id"),
    ("prefix_ids", set_prefix_id(5, 1.5), "prefix_ids[5]", "not a token id"),
    ("tokens", 5, "prefix_ids", "holds 102 ids, but tokens is 5"),
    ("steps_done", 999, "steps_done", "not an integer in 0..3 (tuning.steps is 3)"),
    ("steps_done", -5, "steps_done", "not an integer in 0..3"),
    ("steps_done", 10**400, "steps_done", "not an integer in 0..3"),
    ("steps_done", 2.0, "steps_done", "not an integer"),
    ("steps_done", True, "steps_done", "not an integer"),
    ("steps_done", 2, "history", "holds 3 steps, but steps_done is 2"),
    ("demonstrations", 5, "demonstrations", "not a string"),
    ("demonstrations", ["Review: x"], "demonstrations", "not a string"),
    ("history", "lots", "history", "is not a list"),
    ("history", [{"step": 1}], "history", "holds 1 steps, but steps_done is 3"),
    ("history", lambda m: m["history"][1].update(dk=["x", 1]), "history[1].dk", "not a list of 2 finite numbers"),
    ("history", lambda m: m["history"][2].update(step=7), "history[2].step", "expected 3"),
    ("history", lambda m: m["history"][0].update(evil=[[[]]]), "history[0]", "unknown key(s)"),
    ("history", lambda m: m["history"][1].update(lr="fast"), "history[1].lr", "not a finite number"),
    ("history", lambda m: m["history"][1].update(grad_norm=[1.0]), "history[1].grad_norm", "not a finite number"),
    ("stopped", 5, "stopped", "not a one-line string"),
    ("stopped", {"why": "no"}, "stopped", "not a one-line string"),
    ("method", {"name": "grad_kv", "options": {}}, "method", "together with tuning"),
    ("tuning", "fast", "tuning", "not a JSON object"),
    ("tuning.steps", 0, "tuning", "must be an integer >= 1"),
    ("tuning.rule", "rm -rf", "tuning", "unknown update rule"),
    ("tensors.k.0.shape", [2, 5, 8], "tensors.k.0.shape", "not [kv_heads, 102, head_dim]"),
    ("tensors.k.0.shape", [2, 102, -8], "tensors.k.0.shape", "positive sizes"),
    ("tensors.v.1.dtype", "float16", "tensors.v.1.dtype", "but the context's dtype is float32"),
    ("tensors", lambda m: m["tensors"].update({"k.7": m["tensors"].pop("k.1")}), "tensors", "'k.7' is not a tensor"),
    ("checksums", {}, "checksums", "lacks key(s)"),
    ("checksums", {"context.safetensors": 1}, "checksums.context.safetensors", "not a sha256"),
    ("task", "sst2", "task", "not a JSON object"),
    ("task.choices", [], "task", "field 'choices' must be a non-empty list of strings"),
    ("task.hook", "os.system", "task", "field 'hook' must be one of"),
    ("task.query_template", "Review: {query:>999999999}\nSentiment:", "task.query_template", "not a plain {name}"),
    ("task.query_template", "Review: {query.__class__}\nSentiment:", "task.query_template", "not a plain {name}"),
    ("task.query_template", "Review: {0}\nSentiment:", "task.query_template", "not a plain {name}"),
    ("task.surprise", 1, "task", "unknown field(s) ['surprise']"),
    ("surprise", 1, "surprise", "is not a field of context format version 2"),
    ("format_version", 1, "json_sha256", "not a field of context format version 1"),
    ("json_sha256", 12, "json_sha256", "not a sha256"),
]


@pytest.mark.parametrize("field, value, named, says", GARBAGE, ids=[f"{f}={str(v)[:20]}" for f, v, *_ in GARBAGE])
def test_altered_fields_are_refused_naming_the_field(saved, copy_of, field, value, named, says):
    altered(copy_of, field, value, reseal=field != "json_sha256")
    for read in (TunedContext.read_config, lambda p: TunedContext.load(p, saved[0])):
        with pytest.raises(ContextError) as e:
            read(copy_of)
        assert e.value.field == named and says in e.value.problem, str(e.value)
        message = str(e.value)
        assert message.startswith(f"{copy_of / 'context.json'}: {named}: ") and "\n" not in message
        assert isinstance(e.value, ValueError) and len(message) < 400


@pytest.mark.parametrize("field, value", [("origin.task", "agnews"), ("origin.seed", 1), ("steps_done", 2),
                                          ("demonstrations", "Review: other\nSentiment: positive\n\n"),
                                          ("model.name", "tiny-gpt2"), ("history", lambda m: m["history"][1]["dk"].reverse()),
                                          ("task.query_template", "Ticket: {query}\nSentiment:")])
def test_an_edited_field_of_the_right_type_breaks_the_digest(saved, copy_of, field, value):
    if field == "steps_done":
        value = lambda m: m.update(steps_done=2, history=m["history"][:2])          # consistent, but edited
    elif field == "task.query_template":
        value = lambda m: m["task"].update(query_template="Ticket: {query}\nSentiment:",
                                           choice_template="Ticket: {query}\nSentiment: {choice}")
    elif field == "origin.task":
        value = lambda m: (m["origin"].update(task="agnews"), m["task"].update(name="agnews"))
    altered(copy_of, field, value, reseal=False)
    with pytest.raises(ContextError, match=r"context.json: json_sha256: the content's sha256 is [0-9a-f]{16}, the "
                                           r"file records [0-9a-f]{16}: context.json was altered after it was saved"):
        TunedContext.read_config(copy_of)


def test_layers_of_a_billion_are_refused_without_allocating(saved, copy_of):
    import tracemalloc

    altered(copy_of, "layers", 10**9)
    meta = json.loads((copy_of / context.CONFIG).read_text())
    meta["tensors"] = {f"{kind}.{i}": meta["tensors"]["k.0"] for kind in "kv" for i in range(3)}   # 6 named
    write_meta(copy_of, meta)
    tracemalloc.start()
    try:
        with pytest.raises(ContextError, match="layers: 1000000000 is not an integer in 0..10000"):
            TunedContext.load(copy_of, saved[0])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5e6          # the file's own size and a little: nothing sized by the claimed layer count


@pytest.mark.parametrize("text, says", [
    ("[" * 100_000, "cannot be read as JSON (nested too deeply)"),
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "cannot be read as JSON (nested too deeply)"),
    ('{"format_version": NaN}', "NaN is not a JSON number"),
    ('{"format_version": 2, "format_version": 1}', "key 'format_version' appears twice"),
    ('{"format_version": 1' + "0" * 5000 + "}", "cannot be read as JSON"),
    ("\xff\xfe garbage", "cannot be read as JSON"),
    ("[1, 2]", "holds list, expected a JSON object"),
])
def test_unparseable_context_json_is_one_clean_error(copy_of, text, says):
    (copy_of / context.CONFIG).write_bytes(text.encode("utf-8", "surrogateescape") if text[0] != "\xff"
                                           else b"\xff\xfe garbage")
    with pytest.raises(ContextError) as e:
        TunedContext.read_config(copy_of)
    assert says in str(e.value) and str(e.value).startswith(str(copy_of / "context.json")) and "\n" not in str(e.value)


def test_an_oversized_context_json_is_refused_unread(copy_of, monkeypatch):
    from deepthink import context_schema

    monkeypatch.setattr(context_schema, "MAX_JSON_BYTES", 1000)
    with pytest.raises(ContextError, match=r"is \d+ bytes, more than any context.json \(1000 bytes\)"):
        TunedContext.read_config(copy_of)


@pytest.mark.parametrize("damage, says", [
    (lambda b: (2**63).to_bytes(8, "little") + b[8:], "is not a safetensors file (header length"),
    (lambda b: b[:4], "is not a safetensors file"),
    (lambda b: (200_000).to_bytes(8, "little") + b"[" * 200_000 + b[-64:], "nested too deeply"),
    (lambda b: b.replace(b'"F32"', b'"F64"', 1), 'the header has {"shape": [2, 102, 8], "dtype": "F64"}'),
    (lambda b: b.replace(b'"k.1"', b'"k.9"', 1), 'tensor(s) ["k.9"] not listed there'),
])
def test_the_tensor_header_is_checked_before_any_tensor_is_read(saved, copy_of, monkeypatch, damage, says):
    f = copy_of / context.TENSORS
    f.write_bytes(damage(f.read_bytes()))
    monkeypatch.setattr("safetensors.torch.load", lambda *a: pytest.fail("tensors read before the header check"))
    with pytest.raises(ContextError) as e:
        TunedContext.load(copy_of, saved[0])
    assert str(e.value).startswith(str(f)) and says in str(e.value) and "\n" not in str(e.value)


def test_a_forged_consistent_context_for_another_layer_count_is_refused(saved, copy_of):
    """One layer dropped everywhere (tensors, history, checksum, digest): consistent, but not this model's."""
    from safetensors.torch import load_file, save_file

    f = copy_of / context.TENSORS
    save_file({k: t for k, t in load_file(f).items() if k.endswith(".0")}, f)
    meta = json.loads((copy_of / context.CONFIG).read_text())
    meta["layers"] = 1
    meta["tensors"] = {k: v for k, v in meta["tensors"].items() if k.endswith(".0")}
    meta["history"] = [{**h, "dk": h["dk"][:1], "dv": h["dv"][:1]} for h in meta["history"]]
    meta["checksums"][context.TENSORS] = context.sha256_bytes(f.read_bytes())
    write_meta(copy_of, meta)
    with pytest.raises(ContextError, match="context.json: layers: 1, but the model 'tiny-llama' has 2 layers"):
        TunedContext.load(copy_of, saved[0])


def test_prefix_ids_beyond_the_vocabulary_are_refused(saved, copy_of):
    altered(copy_of, "prefix_ids", set_prefix_id(0, 10**6))
    TunedContext.read_config(copy_of)                       # a plausible id: only the model knows its vocabulary
    with pytest.raises(ContextError, match=r"prefix_ids\[0\]: 1000000 is beyond the model's 400 tokens"):
        TunedContext.load(copy_of, saved[0])


def test_method_records_are_checked(tmp_path):
    from deepthink.tuning.gradient import GradientConfig, gradient_tune
    from deepthink.data import read_demos_file

    lm = tiny_lm("llama")
    items = read_demos_file(deepthink.__path__[0] + "/demo_data/sentiment_train.jsonl", get_task("sentiment-demo"))[:2]
    text = "".join(e.demo_text + "\n\n" for e in items)
    path = gradient_tune(lm, text, items, GradientConfig(steps=2, lr=0.01)).save(tmp_path / "g")
    assert TunedContext.load(path, lm).method["name"] == "grad_kv"
    for field, value, named, says in [
            ("method", "grad_kv", "method", "not a JSON object"),
            ("method.name", "sudo", "method.name", "not a method that saves contexts; valid: grad_kv"),
            ("method.options", [1], "method.options", "not an object of option names and plain values"),
            ("method.options.lr", [[[0.1]]], "method.options", "not an object of option names and plain values"),
            ("method.options.steps", "2", "method.options.steps", "not an integer in 1..1000000"),
            ("method.selection", {"rule": [[["deep"]]]}, "method.selection", "not an object of plain values"),
            ("method.selection", {"rule": "dev-mcnemar", "level": 1.5}, "method.selection.level",
             "not a number between 0 and 1"),
            ("steps_done", 3, "steps_done", "not an integer in 0..2 (method.options.steps is 2)")]:
        shutil.copytree(path, tmp_path / "bad", dirs_exist_ok=True)
        altered(tmp_path / "bad", field, value)
        with pytest.raises(ContextError) as e:
            TunedContext.load(tmp_path / "bad", lm)
        assert e.value.field == named and says in e.value.problem, str(e.value)


def test_save_refuses_a_dtype_contexts_are_not_loaded_in(tmp_path):
    base = tiny_lm("gpt2")
    lm = deepthink.wrap_model(copy.deepcopy(base.model).to(torch.float64), base.tokenizer, name="tiny-gpt2-f64")
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    with pytest.raises(ValueError, match="a context is saved in float32, bfloat16, float16; the model is in float64"):
        ctx.save(tmp_path / "f64")
    assert not (tmp_path / "f64").exists()


def test_a_format_1_context_still_loads_with_a_warning(saved, copy_of):
    """Contexts saved before json_sha256 and the task definition existed load as before, with a warning that edits
    to them cannot be detected; re-saving gives a current, sealed context with the same tensors."""
    lm, ctx, _ = saved
    meta = as_format_1(json.loads((copy_of / context.CONFIG).read_text()))
    (copy_of / context.CONFIG).write_text(json.dumps(meta))
    with pytest.warns(UnverifiedContextWarning, match="has no json_sha256 .*edits to it cannot be detected; re-save"):
        old = TunedContext.load(copy_of, lm)
    assert old.task is None and old.origin == ctx.origin
    for a, b in zip(old.keys + old.values, ctx.keys + ctx.values):
        assert torch.equal(a, b)
    old.task = ctx.task
    again = old.save(copy_of.parent / "resaved")
    assert TunedContext.read_config(again)["format_version"] == context.FORMAT_VERSION
    assert (again / context.TENSORS).read_bytes() == (copy_of / context.TENSORS).read_bytes()
    # the schema applies to format 1 as well
    meta["layers"] = 10**9
    (copy_of / context.CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ContextError, match="layers: 1000000000 is not an integer"):
        TunedContext.load(copy_of, lm)


def test_a_value_nested_just_below_the_parsers_limit_is_refused_cleanly(copy_of):
    text = (copy_of / context.CONFIG).read_text()
    assert '"stopped": null' in text
    (copy_of / context.CONFIG).write_text(text.replace('"stopped": null', '"stopped": ' + "[" * 980 + "]" * 980))
    with pytest.raises(ContextError) as e:
        TunedContext.read_config(copy_of)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(copy_of / "context.json"))


def test_save_refuses_what_load_would_refuse(saved, tmp_path):
    lm, ctx, _ = saved
    odd = TunedContext(lm, ctx.keys, ctx.values, ctx.prefix_ids, config=ctx.config, steps_done=ctx.steps_done,
                       history=ctx.history, origin={"task": "sst2", "where": "here"})
    with pytest.raises(ContextError, match=r"ctx/context.json: origin: unknown key\(s\) \[\"where\"\]; valid: task, "
                                           r"seed, shots, demos_file \(not saved: loading would refuse it\)"):
        odd.save(tmp_path / "ctx")
    assert list(tmp_path.iterdir()) == []


def test_the_server_names_the_context_a_refusal_is_about(copy_of):
    from deepthink.integrations.serving import load_contexts

    altered(copy_of, "layers", 10**9)
    with pytest.raises(ContextError, match=r"^context 'a': .*context.json: layers: 1000000000 is not an integer"):
        load_contexts({"a": copy_of})


def test_a_model_loaded_from_gguf_saves_and_loads(tmp_path):
    """A GGUF model's fingerprint is 'gguf-sha256:' and the file's sha256 (models.py): the schema takes it."""
    lm = copy.copy(tiny_lm("llama"))         # a shallow copy: the cached model's own fingerprint stays as it is
    lm._fingerprint = "gguf-sha256:" + "ab" * 32
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=2))
    loaded = TunedContext.load(ctx.save(tmp_path / "g"), lm)
    assert json.loads((tmp_path / "g" / "context.json").read_text())["model"]["fingerprint"] == lm._fingerprint
    assert_same_context(ctx, loaded)
    lm._fingerprint = "gguf-sha256:xyz"
    with pytest.raises(ContextError, match="model.fingerprint"):
        ctx.save(tmp_path / "bad")
