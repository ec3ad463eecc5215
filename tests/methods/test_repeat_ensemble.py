"""icl_repeat (demonstrations x r) and dt_ensemble (mean log-probability over steps 1..T)."""
import pytest

import deepthink
from deepthink import TuningConfig
from deepthink.methods import Setup, make_method
from deepthink.tasks import Example
from conftest import CHOICES, DEMOS, MULTI, QUERIES, approx, plain_icl_scores, tiny_lm

DEV = [Example(query=q, continuations=tuple(CHOICES), label=i % 2, split="train", index=i)
       for i, q in enumerate(QUERIES)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_repeat_once_is_icl_and_r_copies_are_plain_icl_on_the_repeated_text(arch):
    lm = tiny_lm(arch)
    setup = Setup(lm, DEMOS, DEV)
    once = make_method("icl_repeat", {"times": 1}).prepare(setup)
    assert once.scorer is setup.icl()
    assert once.scorer.score(QUERIES, CHOICES).logprob == make_method("icl").prepare(setup).scorer.score(
        QUERIES, CHOICES).logprob
    twice = make_method("icl_repeat", {"times": 2}).prepare(setup)
    assert twice.info == {"times": 2, "tokens": len(lm.tokenizer(DEMOS * 2).input_ids)}
    assert twice.scorer.score(QUERIES, CHOICES).logprob == approx(
        plain_icl_scores(lm, DEMOS * 2, QUERIES, [CHOICES] * 3), abs=1e-4)


def test_bad_repeat_counts_are_clear_errors():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="times.*integer >= 1"):
            make_method("icl_repeat", {"times": bad})


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_ensemble_of_one_step_is_icl(arch):
    lm = tiny_lm(arch)
    setup = Setup(lm, DEMOS, DEV)
    p = make_method("dt_ensemble", {"steps": 1}).prepare(setup)
    icl = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    assert p.scorer.score(QUERIES, CHOICES).logprob == icl.score(QUERIES, CHOICES).logprob
    assert setup.workspace.score(p.scorer, DEV).logprob == icl.score(QUERIES, CHOICES).logprob


def test_ensemble_averages_the_steps_log_probabilities_and_per_token_scores_alike():
    lm = tiny_lm("qwen2")
    setup = Setup(lm, DEMOS, DEV)
    p = make_method("dt_ensemble", {"steps": 3, "step_size": 0.3}).prepare(setup)
    ctxs = [deepthink.tune(lm, DEMOS, TuningConfig(steps=t, step_size=0.3, momentum=0.0)) for t in (1, 2, 3)]
    parts = [c.score(QUERIES, MULTI) for c in ctxs]
    got = p.scorer.score(QUERIES, MULTI)
    mean = [[sum(s.logprob[i][j] for s in parts) / 3 for j in range(3)] for i in range(3)]
    assert got.logprob == approx(mean, abs=1e-6)
    assert got.n_tokens == parts[0].n_tokens
    mean_norm = [[sum(s.normalized[i][j] for s in parts) / 3 for j in range(3)] for i in range(3)]
    assert got.normalized == approx(mean_norm, abs=1e-6)
    assert p.info["steps"] == 3 and len(p.info["norms"]) == 3
    assert setup.workspace.score(p.scorer, DEV).logprob == approx(p.scorer.score(QUERIES, CHOICES).logprob, abs=1e-9)
