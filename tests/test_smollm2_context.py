"""Tuned contexts on the real embedded SmolLM2-135M: generation with a step-1 context is plain ICL generation."""
import pytest
import torch

import deepthink
from deepthink import TunedContext, TuningConfig
from conftest import DEMOS, QUERIES
from conftest import plain_greedy

pytestmark = pytest.mark.smollm2
PROMPTS = ["The capital of France is", "Review: a dull, lifeless film.\nSentiment:"]


@pytest.fixture(scope="module")
def smol():
    return deepthink.load_model("smollm2-135m")


def test_generate_step1_equals_generation_with_demonstrations_concatenated(smol):
    ctx = deepthink.tune(smol, DEMOS, TuningConfig(steps=1))
    for prompt in PROMPTS:
        got = ctx.generate_tokens(prompt, max_new_tokens=20, stop_at_eos=False)
        assert got == plain_greedy(smol, DEMOS, prompt, 20)
        # and transformers' own greedy generate over the concatenated ids
        ids = smol.tokenizer(DEMOS).input_ids + smol.tokenizer(prompt, add_special_tokens=False).input_ids
        hf = smol.model.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert got == hf[0, len(ids):].tolist()


def test_saved_context_round_trips_on_smollm2(smol, tmp_path):
    ctx = deepthink.tune(smol, DEMOS, TuningConfig(steps=3))
    loaded = TunedContext.load(ctx.save(tmp_path / "ctx"), smol)
    assert all(torch.equal(a, b) for a, b in zip(ctx.keys + ctx.values, loaded.keys + loaded.values))
    assert loaded.predict(QUERIES, [" negative", " positive"]) == ctx.predict(QUERIES, [" negative", " positive"])
    assert loaded.generate(PROMPTS[0], max_new_tokens=8) == ctx.generate(PROMPTS[0], max_new_tokens=8)
