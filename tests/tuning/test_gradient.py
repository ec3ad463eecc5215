"""Gradient KV tuning on tiny models: plain ICL at lr 0, a decreasing objective, a leave-one-out mask that
really hides the demonstration's own span, seeds, artifacts, refused architectures."""
import json

import pytest
import torch

import deepthink
from deepthink import TunedContext, TuningConfig
from deepthink.tasks import Example
from deepthink.tuning.gradient import (GradientConfig, GradientTuner, Row, demonstration_spans, gradient_tune, leak,
                                       row_logprobs)
from conftest import ARCHS, CHOICES, QUERIES, assert_same_json, tiny_lm, tiny_lm64

ITEMS = [Example("Review: a gorgeous, witty, seductive movie.\nSentiment:", tuple(CHOICES), 1, 0, "train"),
         Example("Review: the plot is nothing but boilerplate clichés.\nSentiment:", tuple(CHOICES), 0, 1, "train"),
         Example("Review: witty and gorgeous\nSentiment:", tuple(CHOICES), 1, 2, "train")]
TEXT = "".join(e.demo_text + "\n\n" for e in ITEMS)
MASKABLE = [a for a in ARCHS if a != "bloom"]


def tuner(arch="llama", **options):
    return GradientTuner(tiny_lm(arch), TEXT, ITEMS, GradientConfig(**options))


@pytest.mark.parametrize("arch", MASKABLE)
def test_lr_zero_is_plain_icl_exactly(arch):
    lm = tiny_lm(arch)
    icl = deepthink.tune(lm, TEXT, TuningConfig(steps=1))
    contexts = list(tuner(arch, steps=3, lr=0.0))
    assert [c.steps_done for c in contexts] == [1, 2, 3]
    for ctx in contexts:
        assert all(torch.equal(a, b) for a, b in zip(ctx.keys + ctx.values, icl.keys + icl.values))
        assert ctx.score(QUERIES, CHOICES).logprob == icl.score(QUERIES, CHOICES).logprob


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_objective_decreases_over_steps(arch):
    t = tuner(arch, steps=6, lr=0.003)
    contexts = list(t)
    with torch.no_grad():
        values = [float(t.objective(keys=c.keys, values=c.values)) for c in contexts]
    assert all(b < a for a, b in zip(values, values[1:])), values
    # the history's loss at step t is J at the cache of step t - 1 (full batch here)
    assert [h["loss"] for h in t.history[1:]] == pytest.approx(values[:-1], rel=1e-5)


@pytest.mark.parametrize("arch", MASKABLE)
def test_a_demonstrations_term_does_not_depend_on_its_own_span(arch):
    t = tuner(arch, steps=1)
    t.step()
    g = torch.Generator().manual_seed(1)
    for i, (a, b) in enumerate(t.spans):
        keys = [k.detach().clone() for k in t.keys]
        values = [v.detach().clone() for v in t.values]
        for x in keys + values:
            x[..., a:b, :] += 5 * torch.randn(x[..., a:b, :].shape, generator=g)
        with torch.no_grad():
            before = t.logprobs(t.rows).tolist()
            after = t.logprobs(t.rows, keys, values).tolist()
        assert after[i] == pytest.approx(before[i], abs=1e-6)                       # its own term: unchanged
        others = [j for j in range(len(ITEMS)) if j != i]
        assert any(abs(after[j] - before[j]) > 1e-4 for j in others)              # the others read that span


def test_the_gradient_of_a_term_is_zero_on_its_own_span():
    t = tuner(steps=1)
    t.step()
    for i, (a, b) in enumerate(t.spans):
        keys = [k.detach().clone().requires_grad_() for k in t.keys]
        values = [v.detach().clone().requires_grad_() for v in t.values]
        t.objective([i], keys, values).backward()
        for x in keys + values:
            assert torch.count_nonzero(x.grad[..., a:b, :]) == 0
            assert torch.count_nonzero(x.grad) > 0


def test_leaks_visible_reading_is_the_unmasked_term():
    """"visible" is the term with nothing hidden (the label can be copied): plain scoring of the demonstration."""
    t = tuner(steps=1)
    t.step()
    r = leak(t)
    assert all(p["visible"] == pytest.approx(-t.logprobs([Row(None, row.ids, row.start)])[0].item(), abs=1e-5)
               for p, row in zip(r["per_demo"], t.rows))


def test_leak_measurement_compares_mask_with_reencode():
    t = tuner(steps=1)
    t.step()
    r = leak(t)
    assert len(r["per_demo"]) == len(ITEMS)
    first, last = r["per_demo"][0], r["per_demo"][-1]
    assert last["leak"] == pytest.approx(0.0, abs=1e-5)      # nothing follows the last demonstration
    assert abs(first["leak"]) > 1e-5                          # the later ones read the first
    assert r["mean_leak"] == pytest.approx(sum(p["reencode"] - p["mask"] for p in r["per_demo"]) / len(ITEMS))


def test_reencode_objective_tunes_and_records_itself():
    t = tuner(steps=4, lr=0.003, objective="loo-reencode")
    contexts = list(t)
    losses = [h["loss"] for h in t.history[1:]]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert contexts[-1].method == {"name": "grad_kv", "options": t.config.to_dict()}
    assert contexts[-1].method["options"]["objective"] == "loo-reencode"


def test_reproducible_with_a_seed():
    runs = [list(tuner(steps=4, lr=0.01, batch=1, seed=s))[-1] for s in (3, 3)]
    # the same draws give the same cache; floats within 1e-5, never bit for bit across runs
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(runs[0].keys + runs[0].values,
                                                                           runs[1].keys + runs[1].values))
    assert_same_json(runs[0].history, runs[1].history)
    batches = set()
    for s in range(5):
        t = tuner(steps=4, lr=0.0, batch=1, seed=s)
        list(t)
        batches.add(tuple(h["batch"][0] for h in t.history[1:]))
        assert all(len(h["batch"]) == 1 for h in t.history[1:])
    assert len(batches) > 1                                     # the seed sets the order


def test_save_load_score_round_trip(tmp_path):
    lm = tiny_lm("llama")
    ctx = gradient_tune(lm, TEXT, ITEMS, GradientConfig(steps=3, lr=0.01, update="k", layers="1:"))
    ctx.save(tmp_path / "ctx")
    meta = json.loads((tmp_path / "ctx" / "context.json").read_text())
    assert meta["tuning"] is None
    assert meta["method"] == {"name": "grad_kv", "options": GradientConfig(steps=3, lr=0.01, update="k",
                                                                            layers="1:").to_dict()}
    back = TunedContext.load(tmp_path / "ctx", lm)
    assert back.method == ctx.method and back.steps_done == 3 and back.history == ctx.history
    assert all(torch.equal(a, b) for a, b in zip(back.keys + back.values, ctx.keys + ctx.values))
    assert back.score(QUERIES, CHOICES).logprob == ctx.score(QUERIES, CHOICES).logprob
    assert back.generate_tokens(QUERIES[0], 4) == ctx.generate_tokens(QUERIES[0], 4)


def test_forward_tuned_artifacts_record_no_method(tmp_path):
    lm = tiny_lm("llama")
    deepthink.tune(lm, TEXT, TuningConfig(steps=2)).save(tmp_path / "fwd")
    assert "method" not in json.loads((tmp_path / "fwd" / "context.json").read_text())
    assert TunedContext.load(tmp_path / "fwd", lm).method is None


def test_target_and_layer_range_leave_the_rest_untouched():
    t = tuner(steps=3, lr=0.05, update="k", layers="1:")
    first, last = list(t)[0], t.context()
    assert all(torch.equal(a, b) for a, b in zip(first.values, last.values))        # values never move
    assert torch.equal(first.keys[0], last.keys[0])                                  # layer 0 never moves
    assert not torch.equal(first.keys[1], last.keys[1])


def test_l2_pulls_towards_the_step1_cache():
    def moved(l2):
        t = tuner(steps=5, lr=0.05, l2=l2)
        first, last = list(t)[0], t.context()
        return sum(float((a - b).norm()) for a, b in zip(first.keys + first.values, last.keys + last.values))
    assert moved(1e4) < moved(0.0)


def test_checkpointing_gives_the_same_updates():
    a, b = (list(tuner("qwen2", steps=3, lr=0.01, checkpointing=c))[-1] for c in (False, True))
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.keys + a.values, b.keys + b.values))


def test_spans_are_the_demonstrations_tokens():
    for arch in ("gpt2", "llama"):         # without and with BOS
        lm = tiny_lm(arch)
        ids, spans = demonstration_spans(lm.tokenizer, TEXT, ITEMS)
        assert ids == lm.tokenizer(TEXT).input_ids
        assert [lm.tokenizer.decode(ids[a:b]) for a, b in spans] == [e.demo_text + "\n\n" for e in ITEMS]
        assert spans[-1][1] == len(ids) and all(s[1] == n[0] for s, n in zip(spans, spans[1:]))


def test_spans_follow_each_demonstrations_own_separator():
    """A template that ends each demonstration with one newline (StaICC's label affix), not a blank line: the spans
    cover each demonstration with its own separator, and the tuner accepts the items (issue 29)."""
    from dataclasses import replace

    items = [replace(e, separator="\n") for e in ITEMS]
    text = "".join(e.demo_text + "\n" for e in items)
    lm = tiny_lm("llama")
    ids, spans = demonstration_spans(lm.tokenizer, text, items)
    assert [lm.tokenizer.decode(ids[a:b]) for a, b in spans] == [e.block for e in items]
    assert list(GradientTuner(lm, text, items, GradientConfig(steps=2)))[-1].length == len(ids)
    with pytest.raises(ValueError, match="do not spell the demonstration text"):
        demonstration_spans(lm.tokenizer, text, ITEMS)            # the blank-line items do not spell this text


def test_row_logprobs_equal_scoring():
    lm = tiny_lm("mistral")
    ctx = deepthink.tune(lm, TEXT, TuningConfig(steps=1))
    rows = [Row(None, lm.tokenizer(q + c, add_special_tokens=False).input_ids,
                len(lm.tokenizer(q, add_special_tokens=False).input_ids)) for q in QUERIES for c in CHOICES]
    with torch.no_grad():
        got = row_logprobs(lm.model, ctx.prefix, rows, []).tolist()
    want = [x for row in ctx.score(QUERIES, CHOICES).logprob for x in row]
    assert got == pytest.approx(want, abs=1e-4)


def test_architectures_that_cannot_take_the_mask_are_refused():
    with pytest.raises(ValueError, match="bloom: its attention does not take a custom 4D attention mask"):
        list(tuner("bloom", steps=2))


def test_bad_inputs_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="lr"):
        GradientConfig(lr=-1)
    with pytest.raises(ValueError, match="update"):
        GradientConfig(update="q")
    with pytest.raises(ValueError, match="layers"):
        GradientConfig(layers="2-4")
    with pytest.raises(ValueError, match="objective.*loo-mask"):
        GradientConfig(objective="plain")
    with pytest.raises(ValueError, match="steps"):
        GradientConfig(steps=0)
    with pytest.raises(ValueError, match="checkpointing"):
        GradientConfig(checkpointing="yes")
    with pytest.raises(ValueError, match="inside the model's 2 layers"):
        tuner(layers="1:5")
    with pytest.raises(ValueError, match="at least 2"):
        GradientTuner(tiny_lm("llama"), ITEMS[0].demo_text + "\n\n", ITEMS[:1])
    with pytest.raises(ValueError, match="do not spell the demonstration text"):
        GradientTuner(tiny_lm("llama"), TEXT + "extra", ITEMS)
    with pytest.raises(ValueError, match="see only the last 40: .* at most 39 tokens"):
        GradientTuner(tiny_lm("mistral", sliding_window=40), TEXT, ITEMS)     # the demonstrations alone are ~71
    lm = tiny_lm("gemma3", sliding_window=80)                 # a layer type the mask does not know (as a future
    monkeypatch.setattr(lm.config, "layer_types", ["sliding_attention", "chunked_attention"])   # architecture's)
    with pytest.raises(ValueError, match="layer types .*chunked_attention.* full and sliding-window attention only"):
        GradientTuner(lm, TEXT, ITEMS)            # refused when built, before any step: the queries cross the window


WINDOWED = {"gemma3": dict(sliding_window=80), "mistral": dict(sliding_window=80), "gpt_neo": dict(window_size=80),
            "qwen2": dict(sliding_window=80, use_sliding_window=True,
                          layer_types=("full_attention", "sliding_attention"))}


@pytest.mark.parametrize("arch", sorted(WINDOWED))
def test_queries_that_cross_a_sliding_window_see_what_scoring_sees(arch):
    """Demonstrations within the window, queries past it (as gemma3-270m's 512-token window with agnews' 8
    demonstrations): the sliding-window layers of the masked forward see only the last 80 positions, like
    scoring, per layer type; a hidden span still changes nothing."""
    lm = tiny_lm(arch, **WINDOWED[arch])
    t = GradientTuner(lm, TEXT, ITEMS, GradientConfig(lr=0.0, steps=2))
    assert t.length < 80 and all(t.length + len(r.ids) > 80 for r in t.rows)        # every row crosses it
    ctx = t.step()
    t.check_mask()                               # the guard itself: unmasked equals scoring, hidden span inert
    plain = t.logprobs([Row(None, r.ids, r.start) for r in t.rows]).tolist()
    ref = [ctx.score([e.query], [[e.continuations[e.label]]]).logprob[0][0] for e in ITEMS]
    assert plain == pytest.approx(ref, abs=1e-4)
    unwindowed = tiny_lm(arch)                   # the same weights with the default 200-token window: it differs
    far = GradientTuner(unwindowed, TEXT, ITEMS, GradientConfig(lr=0.0, steps=2))
    far.step()
    assert far.logprobs([Row(None, r.ids, r.start) for r in far.rows]).tolist() != pytest.approx(ref, abs=1e-4)


# ---- micro-batches: the same objective and gradient, a few rows at a time --------------------------------------

def same_tensors(a, b):
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a, b))


@pytest.mark.parametrize("options", [
    dict(loss="row", token_dropout=0.3, l2=0.5),
    dict(loss="token", token_dropout=0.3, l2=0.5, optimizer="adamw", schedule="cosine", clip=0.05),
    dict(loss="row", objective="loo-reencode", checkpointing=True),
], ids=["row", "token", "reencode-checkpointed"])
def test_micro_batches_give_the_full_batch_updates(options):
    """3 rows in parts of 1 (three parts) and 2 (a part of 2 and one of 1): the same losses, gradient norms and
    cache after every update as all 3 at once; token dropout drawn for the whole batch, the pull added once.
    In float64 (tiny_lm64): in float32 the gradients agree to 1e-5 (next test) but Adam magnifies the rounding."""
    lm = tiny_lm64("llama")
    runs = {m: GradientTuner(lm, TEXT, ITEMS, GradientConfig(steps=4, lr=0.05, micro_batch=m, **options))
            for m in (0, 1, 2)}
    contexts = {m: list(t) for m, t in runs.items()}
    full = runs[0].history[1:]
    assert all(h["loss"] > 0 and h["grad_norm"] > 0 for h in full)
    for m in (1, 2):
        for a, b in zip(contexts[0], contexts[m]):
            assert same_tensors(a.keys + a.values, b.keys + b.values)
        assert not same_tensors(contexts[m][0].keys, contexts[m][-1].keys)          # it did move
        assert [h["loss"] for h in runs[m].history[1:]] == pytest.approx([h["loss"] for h in full], rel=1e-5)
        assert [h["grad_norm"] for h in runs[m].history[1:]] == pytest.approx([h["grad_norm"] for h in full],
                                                                               rel=1e-5)
        assert runs[m].context().method["options"]["micro_batch"] == m      # recorded in the artifact
    if options.get("clip"):
        assert all(h["grad_norm"] > options["clip"] for h in full)            # clipping was active


@pytest.mark.parametrize("loss", ["row", "token"])
def test_one_updates_gradient_is_the_full_batch_gradient(loss):
    """The accumulated .grad after one update's backward equals the gradient of the objective J (with its pull)
    on the same rows and the same dropout draw; so does the returned loss."""
    from deepthink.tuning.gradient import frozen

    t = tuner(steps=2, lr=0.05, loss=loss, token_dropout=0.3, l2=0.5)
    t.step()
    which, dropped = [0, 1, 2], t.draw_dropout(3)
    assert dropped.any()
    with torch.enable_grad():
        J = t.objective(which, dropped=dropped)
        reference = torch.autograd.grad(J, t.params)
    for m in (1, 2, 3, 7):                   # 3 and 7: all rows in one part, today's single backward
        t.config = GradientConfig(steps=2, lr=0.05, loss=loss, token_dropout=0.3, l2=0.5, micro_batch=m)
        for p in t.params:
            p.grad = None
        with frozen(t.lm.model), torch.enable_grad():
            value = t._backward(which, dropped)
        assert float(value) == pytest.approx(float(J.detach()), rel=1e-5)
        assert same_tensors([p.grad for p in t.params], reference)


def test_micro_batch_is_validated_recorded_and_not_part_of_a_runs_identity():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"GradientConfig\.micro_batch="):
            GradientConfig(micro_batch=bad)
    with pytest.raises(ValueError, match=r"micro_batch=-1: must be >= 0 \(0 = all rows"):
        GradientConfig(micro_batch=-1)
    cfg = GradientConfig(steps=3, micro_batch=4, token_dropout=0.1)
    back = GradientConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.to_dict() == cfg.to_dict() and back.micro_batch == 4
    old = {k: v for k, v in cfg.to_dict().items() if k != "micro_batch"}      # recorded before the option existed
    assert GradientConfig.from_dict(old).micro_batch == 0
    # a memory knob: runs that differ only in it are the same run (a workspace shares it)
    assert cfg == GradientConfig(steps=3, token_dropout=0.1) and hash(cfg) == hash(GradientConfig(steps=3,
                                                                                                  token_dropout=0.1))


def test_artifacts_record_micro_batch_and_old_ones_still_load(tmp_path):
    lm = tiny_lm("llama")
    ctx = gradient_tune(lm, TEXT, ITEMS, GradientConfig(steps=2, lr=0.01, micro_batch=2))
    ctx.save(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "context.json").read_text())["method"]["options"]["micro_batch"] == 2
    assert TunedContext.load(tmp_path / "new", lm).method == ctx.method
    # an artifact saved before the option existed: its options lack it, and it loads as it was saved
    before = TunedContext(lm, ctx.keys, ctx.values, ctx.prefix_ids, config=None, demonstrations=TEXT,
                          steps_done=ctx.steps_done, history=ctx.history,
                          method={"name": "grad_kv", "options": {k: v for k, v in ctx.method["options"].items()
                                                                 if k != "micro_batch"}})
    before.save(tmp_path / "old")
    back = TunedContext.load(tmp_path / "old", lm)
    assert "micro_batch" not in back.method["options"]
    assert GradientConfig.from_dict(back.method["options"]).micro_batch == 0


@pytest.mark.parametrize("micro_batch", [0, 1, 2])
def test_a_diverging_update_stops_at_the_last_finite_step(micro_batch):
    """lr 1e30: the cache after one update is finite but the next objective is not; tuning keeps step 2, warns
    and says why, with or without micro-batches (a non-finite part stops the accumulation: no step is taken)."""
    t = tuner(steps=4, lr=1e30, micro_batch=micro_batch)
    with pytest.warns(RuntimeWarning, match="non-finite objective or cache at step 3; kept step 2"):
        contexts = list(t)
    assert len(t.history) == 2 and t.stopped and contexts[-1].steps_done == 2
    assert all(bool(torch.isfinite(x).all()) for x in contexts[-1].keys + contexts[-1].values)
    assert all(torch.equal(a, b) for a, b in zip(contexts[-1].keys, contexts[1].keys))
