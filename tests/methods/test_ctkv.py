"""ct_kv (Context Tuning, CT-KV) on tiny models: every element of the authors' recipe (AdamW, cosine schedule to 0
without warm-up, gradient clipping, token dropout, leave-one-out mask, token-mean loss), the recorded dev points,
the dev-chosen variant, and `deepthink eval --methods ct_kv`."""
import json
import math
import unittest.mock as mock

import pytest
import torch

from deepthink.cli import main
from deepthink.methods import METHODS, Setup, make_method
from deepthink.tasks import Example
from deepthink.tuning import gradient
from deepthink.tuning.gradient import GradientConfig, GradientTuner, _allowed
from conftest import CHOICES, QUERIES, approx, tiny_lm, tiny_lm64

ITEMS = [Example("Review: a gorgeous, witty, seductive movie.\nSentiment:", tuple(CHOICES), 1, 0, "train"),
         Example("Review: the plot is nothing but boilerplate clichés.\nSentiment:", tuple(CHOICES), 0, 1, "train"),
         Example("Review: witty and gorgeous\nSentiment:", tuple(CHOICES), 1, 2, "train")]
TEXT = "".join(e.demo_text + "\n\n" for e in ITEMS)
DEV = [Example(q, tuple(CHOICES), i % 2, 10 + i, "train") for i, q in enumerate(QUERIES)]


def tuner(**options) -> GradientTuner:
    return GradientTuner(tiny_lm("llama"), TEXT, ITEMS, GradientConfig(**options))


def test_defaults_are_the_authors_recipe():
    assert "ct_kv" in METHODS
    g = make_method("ct_kv").config.gradient_config()
    assert (g.optimizer, g.weight_decay, g.lr, g.schedule, g.clip, g.token_dropout, g.loss) == \
        ("adamw", 0.0, 1e-3, "cosine", 1.0, 0.05, "token")
    assert (g.steps, g.batch, g.objective, g.update, g.layers) == (201, 0, "loo-mask", "kv", "all")   # 200 epochs
    assert make_method("ct_kv").config.record_every == 10 and make_method("ct_kv").config.selection == "last"
    for opts, match in (({"epochs": 0}, "CTKVConfig.epochs"), ({"token_dropout": 1.0}, "CTKVConfig.token_dropout"),
                        ({"optimizer": "adam", "weight_decay": 0.1}, "set optimizer='adamw'"),
                        ({"selection": "eval"}, "CTKVConfig.selection"), ({"record_every": 0}, "record_every")):
        with pytest.raises(ValueError, match=f"method 'ct_kv'.*{match}"):
            make_method("ct_kv", opts)


def test_cosine_schedule_from_lr_to_zero_without_warmup():
    """lr * (1 + cos(pi u / U)) / 2 for update u of U = steps - 1: transformers' get_cosine_schedule_with_warmup
    with no warm-up (the authors' scheduler), starting at lr and reaching 0 after the last update."""
    from transformers import get_cosine_schedule_with_warmup

    cfg = GradientConfig(steps=201, lr=1e-3, schedule="cosine")
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
    ref = get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=200)
    theirs = []
    for _ in range(201):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert [cfg.lr_at(u) for u in range(201)] == approx(theirs, abs=1e-12)
    assert cfg.lr_at(0) == 1e-3 and cfg.lr_at(100) == pytest.approx(5e-4) and cfg.lr_at(200) == 0.0
    assert cfg.lr_at(50) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert GradientConfig(steps=201, lr=1e-3).lr_at(150) == 1e-3                   # schedule none: constant
    # the tuner uses it: update u of 4 at lr_at(u)
    t = tuner(steps=5, lr=0.01, schedule="cosine")
    list(t)
    assert [h["lr"] for h in t.history[1:]] == approx([0.01, 0.01 * (1 + math.cos(math.pi / 4)) / 2, 0.005,
                                                        0.01 * (1 + math.cos(3 * math.pi / 4)) / 2], abs=1e-12)


def test_gradient_norm_is_clipped_at_one_when_it_is_larger():
    t = tuner(steps=2, lr=1e-3, clip=1.0, optimizer="adamw")
    real = t.objective
    t.objective = lambda *a, **k: 100 * real(*a, **k)        # a raw gradient norm well above 1 on the tiny model
    list(t)
    raw = t.history[1]["grad_norm"]
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in t.params]))
    assert raw > 2.0
    assert float(clipped) <= 1.0 * (1 + 1e-5) and float(clipped) == pytest.approx(1.0, rel=1e-4)
    # below the limit nothing changes: the recorded raw norm is the gradient's own norm
    u = tuner(steps=2, lr=1e-3, clip=1.0)
    list(u)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in u.params]))
    assert u.history[1]["grad_norm"] < 1.0 and float(norm) == pytest.approx(u.history[1]["grad_norm"], rel=1e-5)


def test_token_dropout_rate_is_p_per_row_and_step():
    t = tuner(steps=2, token_dropout=0.05)
    draws = [t.draw_dropout(3) for _ in range(400)]
    n = sum(d.numel() for d in draws)
    hidden = sum(int(d.sum()) for d in draws)
    sd = math.sqrt(n * 0.05 * 0.95)
    assert abs(hidden - 0.05 * n) < 5 * sd, (hidden, n)                              # binomial, 5 sigma
    assert draws[0].shape == (3, t.length) and draws[0].dtype == torch.bool
    assert any(not torch.equal(d[0], d[1]) for d in draws)                           # per row
    assert any(not torch.equal(a, b) for a, b in zip(draws, draws[1:]))             # per step
    assert tuner(steps=2).draw_dropout(3) is None                                    # off: nothing drawn
    # a seeded draw: the same seed draws the same positions
    assert torch.equal(tuner(steps=2, token_dropout=0.05, seed=3).draw_dropout(3),
                       tuner(steps=2, token_dropout=0.05, seed=3).draw_dropout(3))


def test_every_update_draws_a_dropout_and_scoring_never_does():
    t = tuner(steps=4, lr=1e-3, token_dropout=0.05)
    seen = []
    real = t.draw_dropout

    def spy(n):
        d = real(n)
        seen.append(d)
        return d

    t.draw_dropout = spy
    contexts = list(t)
    assert len(seen) == 3 and all(d.shape == (3, t.length) for d in seen)            # one per update, one row each
    t.loo_eval(contexts[-1])
    contexts[-1].score(QUERIES, [list(CHOICES)] * len(QUERIES))
    assert len(seen) == 3


def test_dropped_positions_are_hidden_and_others_are_read():
    t = tuner(steps=1)
    t.step()
    dropped = torch.zeros(3, t.length, dtype=torch.bool)
    a, b = t.spans[1]
    dropped[0, a:b] = True                   # demonstration 1's span hidden from row 0 only
    g = torch.Generator().manual_seed(0)
    keys = [k.detach().clone() for k in t.keys]
    values = [v.detach().clone() for v in t.values]
    for x in keys + values:
        x[..., a:b, :] += 5 * torch.randn(x[..., a:b, :].shape, generator=g)
    with torch.no_grad():
        before = t.logprobs(t.rows, dropped=dropped).tolist()
        after = t.logprobs(t.rows, keys, values, dropped=dropped).tolist()
        plain = t.logprobs(t.rows).tolist()
        none = t.logprobs(t.rows, dropped=torch.zeros(3, t.length, dtype=torch.bool)).tolist()
    assert after[0] == pytest.approx(before[0], abs=1e-6)           # row 0 no longer reads span 1
    assert abs(after[2] - before[2]) > 1e-4                         # row 2 still does
    assert none == approx(plain, abs=1e-6) and abs(before[0] - plain[0]) > 1e-4


def test_leave_one_out_mask_hides_a_rows_own_span_only():
    spans = [(1, 4), (4, 9), (9, 12)]
    dropped = torch.zeros(3, 12, dtype=torch.bool)
    dropped[2, 0] = True
    allowed = _allowed(12, spans, [3, 2, 3], 3, "cpu", dropped)                      # (3, 3, 12 + 3)
    for row, (a, b) in enumerate(spans):
        pre = allowed[row, :, :12]
        assert not pre[:, a:b].any()                                                # its own span: hidden
        others = torch.ones(12, dtype=torch.bool)
        others[a:b] = False
        if row == 2:
            others[0] = False                                                       # and what dropout hid
        assert torch.equal(pre, others.expand(3, 12))                              # everything else: visible
    own = allowed[1, :, 12:]
    assert own.tolist() == [[True, False, False], [True, True, False], [True, True, False]]   # causal, 2 real


def test_adamw_without_weight_decay_is_adam():
    adam = list(tuner(steps=4, lr=0.01, optimizer="adam"))[-1]
    adamw = list(tuner(steps=4, lr=0.01, optimizer="adamw"))[-1]
    decayed = list(tuner(steps=4, lr=0.01, optimizer="adamw", weight_decay=0.5))[-1]
    for x, y, z in zip(adam.keys + adam.values, adamw.keys + adamw.values, decayed.keys + decayed.values):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(x, z, rtol=1e-3, atol=1e-4) for x, z in zip(adam.keys, decayed.keys))


def test_token_loss_is_the_mean_over_answer_tokens():
    t = tuner(steps=1, loss="token")
    t.step()
    with torch.no_grad():
        lp = t.logprobs(t.rows)
        n = sum(len(r.ids) - r.start for r in t.rows)
        assert float(t.objective()) == pytest.approx(float(-lp.sum() / n), rel=1e-6)
        row = tuner(steps=1).objective(keys=t.keys, values=t.values)
        assert float(row) == pytest.approx(float(-lp.mean()), rel=1e-6)


def test_ct_kv_records_dev_every_k_epochs_and_answers_with_the_last():
    s = Setup(tiny_lm("llama"), TEXT, DEV, demos=ITEMS)
    runs = []
    real = GradientTuner.__init__

    def counting(self, *a, **k):
        runs.append(1)
        real(self, *a, **k)

    with mock.patch.object(gradient.GradientTuner, "__init__", counting):
        last = make_method("ct_kv", {"epochs": 12, "record_every": 5}).prepare(s)
        dev = make_method("ct_kv", {"epochs": 12, "record_every": 5, "selection": "dev-acc"}).prepare(s)
    assert len(runs) == 1                                                      # ct_kv@dev reads the same run
    info = last.info
    assert [p["epoch"] for p in info["dev_record"]] == [0, 5, 10, 12] and info["chosen_epoch"] == 12
    assert last.scorer is last.curve[-1] and last.curve[0] is s.icl() and "chosen_steps" not in info
    assert len(info["train_loss"]) == 12 and len(info["grad_norm"]) == 12 and info["selection_used"] == "last"
    assert info["dev_record"] == dev.info["dev_record"]
    sums = [p["sum"] for p in dev.info["dev_record"]]
    k = sums.index(max(sums))                                                  # ties to the earlier epoch
    assert dev.info["chosen_epoch"] == [0, 5, 10, 12][k] and dev.info["chosen_steps"] == dev.info["chosen_epoch"] + 1
    assert dev.scorer is last.curve[k]
    json.dumps(info)
    json.dumps(dev.info)
    # without dev items: the last epoch, said so
    nodev = make_method("ct_kv", {"epochs": 3, "selection": "dev-acc"}).prepare(Setup(tiny_lm("llama"), TEXT, (),
                                                                                         demos=ITEMS))
    assert nodev.info["selection_used"] == "last" and nodev.info["chosen_epoch"] == 3 and nodev.info["dev_record"] == []


def test_micro_batches_run_the_same_recipe():
    """ct_kv, the memory-hungriest method: its rows one or two at a time give the same epochs (token loss over the
    whole batch, dropout drawn for the whole batch, clipping on the accumulated gradient). In float64: Adam
    magnifies float32 rounding (tests/tuning/test_gradient.py checks the float32 gradient)."""
    with pytest.raises(ValueError, match=r"method 'ct_kv'.*CTKVConfig\.micro_batch=-1: must be >= 0"):
        make_method("ct_kv", {"micro_batch": -1})
    assert make_method("ct_kv", {"micro_batch": 2}).config.gradient_config().micro_batch == 2
    recipe = {"epochs": 4, "lr": 0.05, "clip": 0.01, "token_dropout": 0.3}
    runs = {m: make_method("ct_kv", {**recipe, "micro_batch": m}).prepare(Setup(tiny_lm64("llama"), TEXT, (),
                                                                                demos=ITEMS)) for m in (0, 1, 2)}
    full = runs[0].info
    assert full["clipped"] == 4                                   # every epoch clipped at 0.01
    for m in (1, 2):
        info, ctx = runs[m].info, runs[m].scorer
        assert info["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
        assert info["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-5) and info["clipped"] == full["clipped"]
        assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(
            ctx.keys + ctx.values, runs[0].scorer.keys + runs[0].scorer.values))
        assert ctx.method["options"]["micro_batch"] == m


def test_one_demonstration_is_plain_icl_and_says_so():
    one = Setup(tiny_lm("llama"), ITEMS[0].demo_text + "\n\n", DEV, demos=ITEMS[:1])
    method = make_method("ct_kv", {"epochs": 3})
    method.check(one)
    p = method.prepare(one)
    assert p.scorer is one.icl() and "nothing to leave out" in method.describe(p.info)


def test_eval_runs_ct_kv(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--seeds", "0", "--shots", "2",
                 "--dev-size", "4", "--max-eval", "4", "--methods", "icl", "ct_kv", "ct_kv@dev", "-o", "ct_kv.epochs=4",
                 "-o", "ct_kv.record_every=2", "-o", "ct_kv@dev.epochs=4", "-o", "ct_kv@dev.record_every=2",
                 "-o", "ct_kv@dev.selection=dev-acc", "-o", "ct_kv.micro_batch=1", "--quiet", "--out", str(out)]) == 0
    (unit,) = (json.loads(p.read_text()) for p in (out / "units").glob("*seed0.json"))
    assert set(unit["accuracy"]) == {"icl", "ct_kv", "ct_kv@dev"}
    info, dev = unit["methods"]["ct_kv"], unit["methods"]["ct_kv@dev"]
    assert [p["epoch"] for p in info["dev_record"]] == [0, 2, 4] and info["chosen_epoch"] == 4
    assert dev["dev_record"] == info["dev_record"] and dev["selection_used"] == "dev-acc"
    assert dev["chosen_steps"] == dev["chosen_epoch"] + 1
    assert unit["config"]["methods"]["ct_kv"]["epochs"] == 4 and unit["config"]["methods"]["ct_kv"]["clip"] == 1.0
    # micro_batch is recorded, and ct_kv (1 row at a time) and ct_kv@dev (all at once) are one shared run
    assert unit["config"]["methods"]["ct_kv"]["micro_batch"] == 1
    assert unit["config"]["methods"]["ct_kv@dev"]["micro_batch"] == 0
