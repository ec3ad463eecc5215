"""The lm-evaluation-harness adapter against the harness's own `hf` model, TunedContext.score and bad inputs."""
from __future__ import annotations

import json
import logging
import textwrap

import pytest
import torch

import deepthink
from conftest import DEMOS, approx, tiny_lm

lm_eval = pytest.importorskip("lm_eval", reason="pip install 'deepthink[lm-eval]' (make test installs it)")
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from deepthink.integrations.lm_eval import DeepThinkLM, shared_prefix  # noqa: E402

REVIEWS = [("a gorgeous, witty, seductive movie.", 1), ("the plot is nothing but boilerplate clichés.", 0),
           ("witty and gorgeous", 1), ("boilerplate", 0), ("a movie.", 1), ("nothing but clichés", 0),
           ("seductive lines", 1), ("the plot is terrible", 0)]
QUESTIONS = [("What is the capital of France ?", "Location"), ("Stocks rallied on Wall Street today.", "Business"),
             ("The man turned on the faucet", "Water"), ("a witty movie", "positive"),
             ("boilerplate clichés", "negative"), ("Wall Street", "Business")]


def _write_task(folder, name, body, rows):
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            train: {folder / (name + '.jsonl')}
            test: {folder / (name + '.jsonl')}
        training_split: train
        test_split: test
        fewshot_split: train
        """) + textwrap.dedent(body))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Local JSON tasks: tiny_mc (multiple choice) and tiny_gen (generation), fixed few-shot sets (first_n);
    tiny_mc_random uses the harness's default (random per request) sampler."""
    d = tmp_path_factory.mktemp("lm-eval-tasks")
    mc = textwrap.dedent("""\
        output_type: multiple_choice
        doc_to_text: "Review: {{text}}\\nSentiment:"
        doc_to_choice: ["negative", "positive"]
        doc_to_target: label
        metric_list:
          - metric: acc
        """)
    reviews = [{"text": t, "label": y} for t, y in REVIEWS]
    _write_task(d, "tiny_mc", mc + "fewshot_config:\n  sampler: first_n\n", reviews)
    _write_task(d, "tiny_mc_random", mc, reviews)
    _write_task(d, "tiny_gen", """\
        output_type: generate_until
        doc_to_text: "Question: {{q}}\\nType:"
        doc_to_target: " {{a}}"
        target_delimiter: ""
        generation_kwargs:
          until: ["\\n", "e"]
          max_gen_toks: 8
          do_sample: false
        metric_list:
          - metric: exact_match
        fewshot_config:
          sampler: first_n
        """, [{"q": q, "a": a} for q, a in QUESTIONS])
    return d


@pytest.fixture(scope="module")
def tasks(task_dir):
    return TaskManager(include_path=str(task_dir), include_defaults=False)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return HFLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=4)


def _run(model, tasks, task, shots, limit=6):
    out = lm_eval.simple_evaluate(model=model, tasks=[task], num_fewshot=shots, limit=limit, task_manager=tasks,
                                  log_samples=True, bootstrap_iters=0)
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def _loglikelihoods(samples):
    return [[r[0][0] for r in s["resps"]] for s in samples]             # resps: per choice [(logprob, is_greedy)]


def test_icl_equals_hf_multiple_choice(tiny_model_dir, tasks, hf_model):
    ours = DeepThinkLM(model=str(tiny_model_dir), steps=1)
    a, b = _run(hf_model, tasks, "tiny_mc", 3), _run(ours, tasks, "tiny_mc", 3)
    assert [s["arguments"] for s in a] == [s["arguments"] for s in b]
    for x, y in zip(a, b):
        assert [r[0][1] for r in y["resps"]] == [r[0][1] for r in x["resps"]]            # is_greedy
        assert [r[0][0] for r in y["resps"]] == pytest.approx([r[0][0] for r in x["resps"]], abs=1e-4, rel=0)
    prefix = ours.prefixes["tiny_mc"]
    assert prefix["text"].endswith("\n\n") and prefix["text"].count("Sentiment:") == 3   # the 3 demonstrations only


def test_icl_equals_hf_generation(tiny_model_dir, tasks, hf_model):
    ours = DeepThinkLM(model=str(tiny_model_dir), steps=1)
    a, b = _run(hf_model, tasks, "tiny_gen", 2), _run(ours, tasks, "tiny_gen", 2)
    assert [s["arguments"] for s in a] == [s["arguments"] for s in b]
    assert [s["resps"] for s in b] == [s["resps"] for s in a]                           # greedy text, stop strings
    # and the log-likelihood of each target after the task's few-shot context
    from lm_eval.api.instance import Instance

    reqs = [Instance("loglikelihood", s["doc"], (s["arguments"][0][0], s["target"]), i,
                     task_name="tiny_gen") for i, s in enumerate(a)]
    x, y = hf_model.loglikelihood(reqs), ours.loglikelihood(reqs)
    assert [r[1] for r in y] == [r[1] for r in x]
    assert [r[0] for r in y] == pytest.approx([r[0] for r in x], abs=1e-4, rel=0)


def test_explicit_context_equals_tuned_context_score(tiny_model_dir, tasks, tmp_path, caplog):
    lm = deepthink.load_model(str(tiny_model_dir))
    ctx = deepthink.tune(lm, DEMOS, deepthink.TuningConfig(steps=3, step_size=0.1, momentum=0.5))
    ctx.save(tmp_path / "ctx")
    (tmp_path / "demos.txt").write_text(DEMOS)
    queries = [f"Review: {t}\nSentiment:" for t, _ in REVIEWS[:6]]
    want = ctx.score(queries, [" negative", " positive"]).logprob
    for model in (DeepThinkLM(model=lm, context=str(tmp_path / "ctx")),
                  DeepThinkLM(model=lm, demos=str(tmp_path / "demos.txt"), steps=3, step_size=0.1, momentum=0.5)):
        got = _loglikelihoods(_run(model, tasks, "tiny_mc", 0))
        assert got == approx(want, abs=1e-5)
    with caplog.at_level(logging.WARNING, logger="deepthink"):
        _run(model, tasks, "tiny_mc", 2, limit=2)             # harness examples on top of the explicit context
    assert "probably the harness's few-shot examples" in caplog.text


def test_a_gradient_tuned_context_is_used_unchanged(tiny_model_dir, tasks, tmp_path):
    """A context saved by `deepthink tune` (gradient KV tuning, its default) is read by the adapter like any other."""
    from deepthink.cli import main

    assert main(["tune", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--shots", "2", "--steps", "3",
                 "--selection", "last", "--out", str(tmp_path / "g")]) == 0
    lm = deepthink.load_model(str(tiny_model_dir))
    ctx = deepthink.TunedContext.load(tmp_path / "g", lm)
    assert ctx.method["name"] == "grad_kv" and ctx.steps_done == 3
    queries = [f"Review: {t}\nSentiment:" for t, _ in REVIEWS[:6]]
    want = ctx.score(queries, [" negative", " positive"]).logprob
    icl = deepthink.tune(lm, ctx.demonstrations, deepthink.TuningConfig(steps=1)).score(
        queries, [" negative", " positive"]).logprob
    assert want != approx(icl, abs=1e-4)                                  # the gradient steps changed the cache
    got = _loglikelihoods(_run(DeepThinkLM(model=lm, context=str(tmp_path / "g")), tasks, "tiny_mc", 0))
    assert got == approx(want, abs=1e-5)


def test_method_arg_and_grad_kv_contexts(tiny_model_dir, tasks, task_dir, tmp_path, capsys, caplog):
    """method=grad_kv: a saved grad_kv context (context=DIR, checked against the record), or a demos file tuned here
    with a deepthink task's template, exactly as deepthink.tune tunes it; the harness's string args work too."""
    from pathlib import Path

    from deepthink.cli import main

    lm = deepthink.load_model(str(tiny_model_dir))
    task = deepthink.get_task("sentiment-demo")
    ctx = deepthink.tune(lm, task, shots=2, steps=3, selection="last")
    ctx.save(tmp_path / "g")
    queries = [f"Review: {t}\nSentiment:" for t, _ in REVIEWS[:6]]
    want = ctx.score(queries, [" negative", " positive"]).logprob
    model = DeepThinkLM(model=lm, context=str(tmp_path / "g"), method="grad_kv")
    assert _loglikelihoods(_run(model, tasks, "tiny_mc", 0)) == approx(want, abs=1e-5)
    assert model.get_model_info()["method"]["name"] == "grad_kv" and model.get_model_info()["tuning"] is None
    with pytest.raises(ValueError, match="was tuned by grad_kv, not method=forward"):
        DeepThinkLM(model=lm, context=str(tmp_path / "g"), method="forward")
    # a text file tuned here: split by the task's template, T chosen on dev items from its training data
    demos = tmp_path / "demos.txt"
    demos.write_text(ctx.demonstrations)
    here = DeepThinkLM(model=lm, method="grad_kv", demos=str(demos), task="sentiment-demo", steps="3", dev_size="4")
    lib = deepthink.tune(lm, Path(demos), task="sentiment-demo", steps=3, dev_size=4)
    assert here.explicit.steps_done == lib.steps_done and here.explicit.method == lib.method
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(here.explicit.keys, lib.keys))
    # a guarded selection rule (issue 31), its level as the harness's string
    here = DeepThinkLM(model=lm, method="grad_kv", demos=str(demos), task="sentiment-demo", steps="3", dev_size="4",
                       selection="dev-mcnemar", level="0.2")
    lib = deepthink.tune(lm, Path(demos), task="sentiment-demo", steps=3, dev_size=4, selection="dev-mcnemar",
                         level=0.2)
    sel = here.explicit.method["selection"]
    assert sel["rule"] == "dev-mcnemar" and sel["level"] == 0.2 and sel["dev_items"] == 4
    assert here.explicit.steps_done == lib.steps_done and here.explicit.method == lib.method
    with caplog.at_level("WARNING"):
        DeepThinkLM(model=lm, method="grad_kv", demos=str(demos), task="sentiment-demo", steps="2", dev_size="0",
                    selection="dev-bootstrap")
    assert "--selection dev-bootstrap keeps T = 1 (plain ICL)" in caplog.text
    # through the command line: the harness passes model args as strings
    assert main(["lm-eval", "--model_args", f"model={tiny_model_dir},method=grad_kv,context={tmp_path / 'g'}",
                 "--tasks", "tiny_mc", "--include_path", str(task_dir), "--limit", "2",
                 "--output_path", str(tmp_path / "out")]) == 0
    info = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert "tiny_mc" in info["results"]
    # refusals, before the model loads
    with pytest.raises(ValueError, match="method=grad_kv needs each demonstration's query and answer.*context=DIR"):
        DeepThinkLM(model=lm, method="grad_kv")
    with pytest.raises(ValueError, match="demos=FILE needs task=T"):
        DeepThinkLM(model=lm, method="grad_kv", demos=str(demos))
    with pytest.raises(ValueError, match="method='ridge': valid: forward, grad_kv"):
        DeepThinkLM(model=lm, method="ridge")
    with pytest.raises(ValueError, match=r"unknown deepthink model arg\(s\) \['step_size'\]; valid: .*lr.*method=grad_kv"):
        DeepThinkLM(model=lm, method="grad_kv", demos=str(demos), task="sentiment-demo", step_size=0.1)
    with pytest.raises(ValueError, match="task= names the deepthink task"):
        DeepThinkLM(model=lm, demos=str(demos), task="sentiment-demo")
    (tmp_path / "bad.txt").write_text("Review: dull\nSentiment: meh\n\n")
    with pytest.raises(ValueError, match="demonstration 1 of 1 does not match the template"):
        DeepThinkLM(model=lm, method="grad_kv", demos=str(tmp_path / "bad.txt"), task="sentiment-demo")


def test_shared_prefix_tuned_once_per_task(tiny_model_dir, tasks):
    lm = deepthink.load_model(str(tiny_model_dir))
    calls = {"model": 0, "base": 0}
    hooks = [lm.model.register_forward_pre_hook(lambda *a: calls.__setitem__("model", calls["model"] + 1)),
             lm.model.base_model.register_forward_pre_hook(lambda *a: calls.__setitem__("base", calls["base"] + 1))]
    try:
        ours = DeepThinkLM(model=lm, steps=4, step_size=0.1, batch_size=4)
        tuned = _loglikelihoods(_run(ours, tasks, "tiny_mc", 3, limit=5))       # 5 docs x 2 choices = 10 requests
    finally:
        for h in hooks:
            h.remove()
    assert calls["model"] == 4                      # the 4 tuning passes, once for the task (not per request)
    assert calls["base"] == 4 + 3                   # + 10 requests scored in batches of 4
    assert ours.prefixes["tiny_mc"]["steps"] == 4
    icl = _loglikelihoods(_run(DeepThinkLM(model=lm, steps=1), tasks, "tiny_mc", 3, limit=5))
    assert tuned != approx(icl, abs=1e-3)    # tuning changed the scores


def test_shared_prefix_rule():
    tok = tiny_lm("llama").tokenizer
    texts = ["Review: a\nSentiment: positive\n\nReview: witty movie\nSentiment:",
             "Review: a\nSentiment: positive\n\nReview: boilerplate\nSentiment:"]
    encs = [tok(t).input_ids for t in texts]
    cut = shared_prefix(encs, tok)
    assert tok.decode(encs[0][:cut], skip_special_tokens=True) == "Review: a\nSentiment: positive\n\n"
    assert shared_prefix([encs[0]] * 3, tok) == cut          # one request: still cut back to the demonstrations
    assert shared_prefix([tok(t).input_ids for t in ("Review: x\nSentiment:", "Review: y\nSentiment:")], tok) == 0


def test_bad_inputs(tiny_model_dir, tasks, tmp_path):
    with pytest.raises(ValueError, match=r"unknown deepthink model arg\(s\) \['stpes'\]; valid: .*steps"):
        DeepThinkLM(model=str(tiny_model_dir), stpes=3)
    with pytest.raises(ValueError, match="TuningConfig.steps=0"):
        DeepThinkLM(model=str(tiny_model_dir), steps=0)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="demos file .*empty.txt is empty"):
        DeepThinkLM(model=str(tiny_model_dir), demos=str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="demos file .* not found"):
        DeepThinkLM(model=str(tiny_model_dir), demos=str(tmp_path / "missing.txt"))
    other = tiny_lm("llama", seed=1)
    deepthink.tune(other, DEMOS, deepthink.TuningConfig(steps=1)).save(tmp_path / "other")
    with pytest.raises(ValueError, match="was made for model .*load the model the context was tuned with"):
        DeepThinkLM(model=str(tiny_model_dir), context=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="already tuned"):
        DeepThinkLM(model=str(tiny_model_dir), context=str(tmp_path / "other"), steps=3)
    ours = DeepThinkLM(model=str(tiny_model_dir), steps=1)
    with pytest.raises(ValueError, match=r"task tiny_mc: .* do not start with the same demonstrations.*first_n"):
        _run(ours, tasks, "tiny_mc", 0)                          # no few-shot examples at all
    with pytest.raises(ValueError, match=r"task tiny_mc_random: .* do not start with the same demonstrations"):
        _run(ours, tasks, "tiny_mc_random", 2)                   # per-request random demonstrations


def test_rolling_after_explicit_context(tiny_model_dir, tmp_path):
    from lm_eval.api.instance import Instance

    lm = deepthink.load_model(str(tiny_model_dir))
    ctx = deepthink.tune(lm, DEMOS, deepthink.TuningConfig(steps=2, step_size=0.1))
    text = "Review: witty and gorgeous\nSentiment: positive"
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    bos = lm.tokenizer.bos_token_id
    want = ctx.score_tokens([([bos], ids)])[0][0]
    ours = DeepThinkLM(model=lm, demos=_file(tmp_path, DEMOS), steps=2, step_size=0.1)
    got = ours.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    assert got == pytest.approx(want, abs=1e-4)          # the whole text, after the context and (as hf) BOS
    short = DeepThinkLM(model=lm, demos=_file(tmp_path, DEMOS), steps=2, step_size=0.1, max_length=ctx.length + 4)
    windows = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    assert windows < 0 and windows != pytest.approx(got, abs=1e-3)   # 4-position windows: less context, other score
    with pytest.raises(ValueError, match="pass an explicit context"):
        DeepThinkLM(model=lm, steps=1).loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])


def _file(folder, text):
    (folder / "demos.txt").write_text(text)
    return str(folder / "demos.txt")


def test_cli_runs_the_harness(tiny_model_dir, task_dir, tmp_path, capsys):
    from deepthink.cli import main

    folder = task_dir
    rc = main(["lm-eval", "--model_args", f"model={tiny_model_dir},steps=2,step_size=0.1", "--tasks", "tiny_mc",
               "--include_path", str(folder), "--num_fewshot", "2", "--limit", "3",
               "--output_path", str(tmp_path / "out")])
    assert rc == 0
    assert "tiny_mc" in capsys.readouterr().out                  # the harness's results table
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert len(results) == 1 and json.loads(results[0].read_text())["results"]["tiny_mc"]["acc,none"] >= 0
    assert main(["lm-eval", "--model_args", f"model={tiny_model_dir},demos=x.txt", "--tasks", "tiny_mc",
                 "--num_fewshot", "2"]) == 2
    assert "run with --num_fewshot 0" in capsys.readouterr().err
    assert main(["lm-eval", "--model", "hf", "--tasks", "tiny_mc"]) == 2


def test_score_tokens_equals_score():
    """The token-level entry point gives TunedContext.score's numbers, with or without the shared-prefix path."""
    for arch in ("gpt2", "llama", "gemma3", "bloom"):
        lm = tiny_lm(arch)
        ctx = deepthink.tune(lm, DEMOS, deepthink.TuningConfig(steps=3, step_size=0.1))
        queries = ["Review: witty and gorgeous\nSentiment:", "Review: boilerplate\nSentiment:"]
        choices = [" negative", " positive plot"]
        want = ctx.score(queries, choices).logprob
        tok = lm.tokenizer
        pairs = []
        for q in queries:
            qi = tok(q, add_special_tokens=False).input_ids
            pairs += [(qi, tok(q + c, add_special_tokens=False).input_ids[len(qi):]) for c in choices]
        got = ctx.score_tokens(pairs, batch_size=3)
        assert [g[0] for g in got] == pytest.approx([x for row in want for x in row], abs=1e-4, rel=0)
        # is_greedy: every continuation token is the argmax after the prefix and what precedes it
        for (c, t), (_, greedy) in zip(pairs, got):
            with torch.no_grad():
                from deepthink import kv

                cache = kv.build_cache(lm.model, *ctx.prefix)
                logits = lm.model(torch.tensor([c + t[:-1]]), **kv.cache_kwarg(lm.model, cache)).logits[0, len(c) - 1:]
            assert greedy == bool((logits.argmax(-1) == torch.tensor(t)).all())
        with pytest.raises(ValueError, match="at least one token"):
            ctx.score_tokens([([], [1])])


def test_tune_from_token_ids_and_generate_with_stop():
    lm = tiny_lm("llama")
    cfg = deepthink.TuningConfig(steps=3, step_size=0.1)
    a, b = deepthink.tune(lm, DEMOS, cfg), deepthink.tune(lm, lm.tokenizer(DEMOS).input_ids, cfg)
    assert a.prefix_ids == b.prefix_ids and all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))
    prompt = "Review: witty\nSentiment:"
    full = a.generate_tokens(prompt, max_new_tokens=8, stop_at_eos=False)
    ids = lm.tokenizer(prompt, add_special_tokens=False).input_ids
    assert a.generate_tokens(ids, max_new_tokens=8, stop_at_eos=False) == full
    assert a.generate_tokens(ids, max_new_tokens=8, stop_at_eos=False, stop=lambda new: len(new) == 3) == full[:3]


def test_cli_argument_handling():
    from deepthink.cli.lm_eval import harness_argv, model_args

    assert model_args(["--model_args", "model=x,steps=5", "steps=6", "--tasks", "t", "-a", "demos=d.txt"]) == \
        {"model": "x", "steps": "6", "demos": "d.txt"}
    assert harness_argv(["--tasks", "t"]) == ["--model", "deepthink", "--tasks", "t", "--device", "cpu",
                                              "--batch_size", "16"]
    assert harness_argv(["run", "--model", "deepthink", "--device", "cuda", "--model_args", "context=c",
                         "--batch_size", "4"]) == \
        ["--model", "deepthink", "--device", "cuda", "--model_args", "context=c", "--batch_size", "4",
         "--num_fewshot", "0"]
    assert harness_argv(["--model_args=demos=d.txt", "-f", "0"])[-4:] == ["--device", "cpu", "--batch_size", "16"]
    with pytest.raises(ValueError, match="device is given twice"):
        harness_argv(["--model_args", "device=cpu", "--device", "cpu"])
    with pytest.raises(ValueError, match="run with --num_fewshot 0"):
        harness_argv(["--model_args", "demos=d.txt", "--num_fewshot", "3"])
    with pytest.raises(ValueError, match="use `lm_eval --model hf`"):
        harness_argv(["--model", "hf"])


def test_command_line_values():
    lm = tiny_lm("llama")
    m = DeepThinkLM(model=lm, fewshot_delimiter="\\n###\\n", add_bos_token="False", steps="3", step_size="0.1")
    assert (m.fewshot_delimiter, m.add_bos_token, m.config.steps, m.config.step_size) == ("\n###\n", False, 3, 0.1)
    assert m.tok_encode("Review: a")[0] != lm.tokenizer.bos_token_id        # add_bos_token=False is obeyed
    with pytest.raises(ValueError, match="model arg steps='many': expected int"):
        DeepThinkLM(model=lm, steps="many")
    with pytest.raises(ValueError, match="add_bos_token='maybe'"):
        DeepThinkLM(model=lm, add_bos_token="maybe")
