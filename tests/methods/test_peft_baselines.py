"""The peft baselines (lora, lora_icl, ia3, prefix, prompt, cpt) on tiny random models."""
import pytest
import torch

from deepthink.methods import MethodFailed, Setup, Workspace, make_method
from deepthink.methods import peft_baselines as pb
from deepthink.tasks import Example
from conftest import approx, tiny_lm

peft = pytest.importorskip("peft")       # the `peft` extra; installed by make venv (requirements-lm-eval.txt)

PEFT_METHODS = ["lora", "lora_icl", "ia3", "prefix", "prompt", "cpt"]
CHOICES = (" negative", " positive")
DEMOS = [Example("Review: a gorgeous, witty, seductive movie.\nSentiment:", CHOICES, 1, 0, "train"),
         Example("Review: the plot is nothing but boilerplate clichés.\nSentiment:", CHOICES, 0, 1, "train")]
DEV = [Example("Review: witty and gorgeous\nSentiment:", CHOICES, 1, 2, "train"),
       Example("Review: boilerplate\nSentiment:", CHOICES, 0, 3, "train"),
       Example("Review: a movie.\nSentiment:", CHOICES, 1, 4, "train")]
TEXT = "".join(e.demo_text + "\n\n" for e in DEMOS)
QUERIES, CHOICE_LISTS = [e.query for e in DEV], [list(e.continuations) for e in DEV]


def setup_for(arch: str, dev=DEV) -> Setup:
    return Setup(tiny_lm(arch), TEXT, dev, demos=DEMOS)


def icl_scores(lm):
    """Plain ICL on a fresh workspace: what the next method of a unit sees."""
    return Workspace(lm, TEXT).icl().score(QUERIES, CHOICE_LISTS).logprob


def base_state(lm) -> dict:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def assert_base_restored(lm, before_state, before_icl):
    after = lm.model.state_dict()
    assert set(after) == set(before_state)                         # no adapter module left behind
    assert all(torch.equal(after[k], before_state[k]) for k in after)
    assert not any("lora" in n or "ia3" in n for n, _ in lm.model.named_modules())
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert icl_scores(lm) == approx(before_icl, abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", PEFT_METHODS)
def test_method_trains_chooses_on_dev_and_leaves_the_base_model(arch, name):
    setup = setup_for(arch)
    lm = setup.lm
    before, before_icl = base_state(lm), icl_scores(lm)
    method = make_method(name, {"steps": 3, "lr": 0.05})
    method.check(setup)
    prepared = method.prepare(setup)
    info = prepared.info
    assert info["train_loss"][-1] < info["train_loss"][0]          # training lowers the loss it optimises
    assert info["dev_steps"] == [0, 1, 2, 3] and len(info["dev_curve"]) == 4 and len(prepared.curve) == 4
    accs = [c["sum"] for c in info["dev_curve"]]
    assert info["chosen_step"] == accs.index(max(accs))             # ties to fewer steps
    assert info["selection_used"] == "dev-acc"
    assert info["trainable_parameters"] > 0 and info["adapter_bytes"] == 4 * info["trainable_parameters"]
    assert info["tuning_seconds"] >= 0
    scores = setup.workspace.score(prepared.scorer, DEV)
    assert len(scores.logprob) == 3 and all(len(r) == 2 for r in scores.logprob)
    assert_base_restored(lm, before, before_icl)


@pytest.mark.parametrize("arch, name", [("llama", n) for n in ["lora", "ia3", "prefix", "prompt", "cpt"]]
                         + [("gpt2", "prefix"), ("bloom", "prefix"), ("gemma3", "prefix")])
def test_scorer_equals_the_peft_models_own_forward(arch, name):
    """What deepthink scores with (the adapter in the model, or peft's prompt turned into a prefix cache) gives
    peft's own forward's log-probabilities, by the scoring rule's tokenisation (prefix tuning also on the caches of
    GPT-2, BLOOM and Gemma-3's sliding layers)."""
    setup = setup_for(arch)
    method = make_method(name, {"steps": 2, "lr": 0.05})
    state = method.run(setup).states[-1]
    got = method.scorer(setup, state).score(QUERIES, CHOICE_LISTS).logprob
    model = pb._wrap(method, setup, state=state)
    try:
        special = method.input_special(setup)
        want = []
        for q, cs in zip(QUERIES, CHOICE_LISTS):
            row = []
            for c in cs:
                (qi, ai), = pb._pairs(setup.lm, [Example(q, (c,), 0, 0, "x")])
                ids = torch.tensor([special + qi + ai])
                kw = {"labels": ids, "input_type_mask": torch.full_like(ids, 4)} if name == "cpt" else {}
                with torch.no_grad():
                    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits
                s = len(special) + len(qi)
                row.append(-float(pb._answer_loss(logits, ids, [(s, s + len(ai))])))
            want.append(row)
    finally:
        method._remove(model)
    assert got == approx(want, abs=1e-4)


def test_lora_icl_reads_loras_run_and_scores_with_the_demonstrations():
    setup = setup_for("qwen2")
    lora = make_method("lora", {"steps": 2})
    with_demos = make_method("lora_icl", {"steps": 2})
    a, b = lora.prepare(setup), with_demos.prepare(setup)
    assert a.info["train_loss"] == b.info["train_loss"]
    assert len([k for k in setup.workspace._memo if k[0] == "peft"]) == 1       # one training run
    # step 0 is the untouched model: zero-shot for lora, plain ICL for lora_icl
    assert lora.scorer(setup, lora.run(setup).states[0]).score(QUERIES, CHOICE_LISTS).logprob == approx(
        setup.zero_shot().score(QUERIES, CHOICE_LISTS).logprob, abs=1e-5)
    assert with_demos.scorer(setup, lora.run(setup).states[0]).score(QUERIES, CHOICE_LISTS).logprob == \
        approx(setup.icl().score(QUERIES, CHOICE_LISTS).logprob, abs=1e-5)


def test_lora_targets_every_attention_projection():
    names = pb._attention_linears(tiny_lm("llama").model)
    assert sorted({n.rsplit(".", 1)[1] for n in names}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert sorted({n.rsplit(".", 1)[1] for n in pb._attention_linears(tiny_lm("gpt2").model)}) == ["c_attn", "c_proj"]
    assert all(".attn." in n for n in pb._attention_linears(tiny_lm("gpt2").model))


def test_step_is_chosen_on_dev_with_ties_to_fewer_steps(monkeypatch):
    curve = iter([50.0, 70.0, 70.0, 60.0])
    monkeypatch.setattr(Setup, "dev_accuracy", lambda self, scorer: {"sum": next(curve), "norm": 0.0})
    prepared = make_method("ia3", {"steps": 3}).prepare(setup_for("llama"))
    assert prepared.info["chosen_step"] == 1 and prepared.scorer is prepared.curve[1]


def test_eval_every_and_no_dev_items():
    prepared = make_method("prompt", {"steps": 3, "eval_every": 2}).prepare(setup_for("llama", dev=()))
    info = prepared.info
    assert info["dev_steps"] == [0, 2, 3] and info["dev_curve"] == []
    assert info["selection_used"] == "last step" and info["chosen_step"] == 3 and len(info["train_loss"]) == 3


def test_a_peft_failure_is_a_method_failure_and_restores_the_model(monkeypatch):
    setup = setup_for("llama")
    lm = setup.lm
    before, before_icl = base_state(lm), icl_scores(lm)

    def broken(self, model, batch):
        raise RuntimeError("'tuple' object has no attribute 'get_seq_length'\nmore lines")
    monkeypatch.setattr(pb.PeftMethod, "_loss", broken)
    with pytest.raises(MethodFailed, match=r"^peft \S+ lora on llama: RuntimeError: 'tuple' object has no "
                                           r"attribute 'get_seq_length'$"):
        make_method("lora", {"steps": 2}).prepare(setup)
    assert_base_restored(lm, before, before_icl)
    monkeypatch.setattr(peft, "get_peft_model", lambda *a, **k: (_ for _ in ()).throw(ValueError("unsupported")))
    with pytest.raises(MethodFailed, match="prefix on llama: ValueError: unsupported"):
        make_method("prefix", {"steps": 2}).prepare(setup)


def test_the_runner_records_a_failed_method_and_runs_the_others(monkeypatch, tmp_path, capsys):
    from conftest import SHARED_DATA
    from deepthink.evaluation import EvalConfig, report, runner

    monkeypatch.setattr(peft, "get_peft_model", lambda *a, **k: (_ for _ in ()).throw(ValueError("no cache")))
    cfg = EvalConfig(shots=1, dev_size=2, max_eval=3, methods={"icl": {}, "prefix": {"steps": 2}})
    unit, preds = runner.run_unit(tiny_lm("qwen2"), "sst2", 0, cfg, data_dir=SHARED_DATA, progress=False)
    assert set(unit["accuracy"]) == {"icl"}
    assert unit["methods"]["prefix"] == {"fails": "peft %s prefix on qwen2: ValueError: no cache" % peft.__version__}
    assert "prefix tuning fails" in runner.summary_line(unit, cfg)
    assert all("prefix" not in p for p in preds)
    rows = report.summarize([unit])
    assert rows[0]["prefix"] == f"fails: peft {peft.__version__} prefix on qwen2: ValueError: no cache"
    table = report.format_table(rows)
    assert "fails: peft" in table and "prefix tuning" in table


@pytest.mark.parametrize("options, match", [({"lr": 0}, "lr=0"), ({"steps": 0}, "steps=0"),
                                            ({"r": 0}, "r=0"), ({"eval_every": 1.5}, "eval_every"),
                                            ({"targets": ""}, "targets")])
def test_bad_options_say_what_to_fix(options, match):
    with pytest.raises(ValueError, match=match):
        make_method("lora", options)


def test_demonstrations_without_items_are_refused():
    with pytest.raises(ValueError, match="demonstrations as items"):
        make_method("prompt").check(Setup(tiny_lm("llama"), TEXT, DEV))


def test_the_log_line_names_the_chosen_step():
    from deepthink.evaluation import EvalConfig, runner

    cfg = EvalConfig(methods={"icl": {}, "lora": {}, "prefix": {}})
    unit = {"model": "m", "task": "t", "seed": 0, "wall_s": {"total": 1.0},
            "methods": {"icl": {}, "lora": {"chosen_step": 3}, "prefix": {"fails": "peft x prefix on y: E"}},
            "accuracy": {"icl": {"sum": 50.0, "norm": 50.0}, "lora": {"sum": 62.5, "norm": 60.0}}}
    assert runner.summary_line(unit, cfg) == "m t seed 0: ICL 50.0  LoRA (step 3) 62.5  prefix tuning fails  [1s]"
