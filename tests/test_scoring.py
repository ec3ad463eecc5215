"""Scoring: input validation, tokenisation at the boundary, batching invariance."""
import pytest

import deepthink
from deepthink import TuningConfig
from deepthink.scoring import Scores, prepare
from conftest import CHOICES, DEMOS, MULTI, QUERIES, tiny_lm, approx


@pytest.fixture(scope="module")
def ctx():
    return deepthink.tune(tiny_lm("llama"), DEMOS, TuningConfig(steps=2, step_size=0.1))


def test_batch_size_and_order_do_not_change_scores(ctx):
    queries = QUERIES * 3
    choices = MULTI * 3
    a = ctx.score(queries, choices, batch_size=1).logprob
    b = ctx.score(queries, choices, batch_size=7).logprob
    assert a == approx(b, abs=1e-4)
    assert a[:3] == approx(ctx.score(QUERIES, MULTI).logprob, abs=1e-4)


def test_normalized_and_predictions():
    s = Scores(logprob=[[-2.0, -3.0], [-4.0, -4.0], [-6.0, -4.0]], n_tokens=[[1, 3], [1, 1], [3, 1]])
    assert s.normalized == [[-2.0, -1.0], [-4.0, -4.0], [-2.0, -4.0]]
    assert s.predictions() == [0, 0, 1]            # ties go to the first choice
    assert s.predictions(normalize=True) == [1, 0, 0]


def test_boundary_rule_matches_reference(ctx):
    tok = ctx.lm.tokenizer
    units, n = prepare(tok, ["Review: witty"], [" witty movie", "movie"])
    q = tok("Review: witty", add_special_tokens=False).input_ids
    for u in units:
        for j, toks in u.choices:
            full = tok("Review: witty" + [" witty movie", "movie"][j], add_special_tokens=False).input_ids
            assert u.context == full[:len(q)] and toks == full[len(q):]


@pytest.mark.parametrize("queries, choices, match", [
    ([], CHOICES, "empty"),
    ("a single string", CHOICES, "list of strings"),
    (QUERIES, [CHOICES, CHOICES], "3 queries but 2"),
    (QUERIES[:2], [CHOICES, [" a", " b", " c"]], "same number of choices"),
    (QUERIES[:1], [" good", " good"], "duplicate"),
    (QUERIES[:1], [" good", ""], "adds no tokens"),
    ([""], CHOICES, "tokenises to nothing"),
    (QUERIES[:1], [[]], "at least one choice"),
    ([3], CHOICES, "strings"),
])
def test_bad_inputs_rejected(ctx, queries, choices, match):
    with pytest.raises(ValueError, match=match):
        ctx.score(queries, choices)


def test_query_beyond_context_length_rejected():
    lm = tiny_lm("gpt2")  # 256 positions
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    with pytest.raises(ValueError, match="beyond the model's 256 positions"):
        ctx.score(["Review: " + "witty " * 250], CHOICES)


def test_unknown_method_and_bad_batch_size(ctx):
    with pytest.raises(ValueError, match="naive"):
        ctx.score(QUERIES, CHOICES, method="turbo")
    with pytest.raises(ValueError, match="batch_size"):
        ctx.score(QUERIES, CHOICES, batch_size=0)


def test_unicode_emoji_and_long_inputs(ctx):
    queries = ["Review: 很好看的电影 🎬🍿\nSentiment:", "Review: " + "naïve café " * 40 + "\nSentiment:"]
    fast = ctx.score(queries, CHOICES)
    naive = ctx.score(queries, CHOICES, method="naive")
    assert fast.logprob == approx(naive.logprob, abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma3"])
def test_token_logprobs_are_score_tokens_per_position(arch):
    """Every position's log-probability (an OpenAI echo) sums, over a continuation, to score_tokens' value, in any
    batch; the top-1 alternative is the argmax score_tokens' greedy flag looks at; the last row predicts the next
    token as generation does."""
    ctx = deepthink.tune(tiny_lm(arch), DEMOS, TuningConfig(steps=2, step_size=0.1))
    tok = ctx.lm.tokenizer
    pairs = [(tok(q, add_special_tokens=False).input_ids, tok(c, add_special_tokens=False).input_ids)
             for q, cs in zip(QUERIES, MULTI) for c in cs]
    want = ctx.score_tokens(pairs)
    for batch_size in (1, 4):
        rows = ctx.token_logprobs([c + t for c, t in pairs], top_k=1, batch_size=batch_size)
        for (c, t), row, (lp, greedy) in zip(pairs, rows, want):
            assert len(row["logprobs"]) == len(c) + len(t) - 1 and len(row["top"]) == len(c) + len(t)
            assert sum(row["logprobs"][len(c) - 1:]) == pytest.approx(lp, abs=1e-4)
            hits = [top[0][0] == x for top, x in zip(row["top"][len(c) - 1:-1], t)]
            assert all(hits) == greedy
    ids = pairs[0][0]
    (row,) = ctx.token_logprobs([ids])
    assert int(row["next"].argmax()) == ctx.generate_tokens(ids, max_new_tokens=1, stop_at_eos=False)[0]


def test_generation_observes_every_token_it_chooses():
    ctx = deepthink.tune(tiny_lm("llama"), DEMOS, TuningConfig(steps=2, step_size=0.1))
    seen = []
    out = ctx.generate_tokens(QUERIES[0], max_new_tokens=6, observe=lambda t, logits: seen.append((t, logits.shape)))
    assert [t for t, _ in seen][:len(out)] == out and len(seen) in (len(out), len(out) + 1)
    assert all(shape == (ctx.lm.model.get_output_embeddings().weight.shape[0],) for _, shape in seen)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        ctx.token_logprobs([[1, 2], []])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
@pytest.mark.parametrize("shared", [False, True])
def test_last_hidden_is_the_whole_prompts_last_hidden_state_at_its_end(arch, shared):
    """score_fast(last_hidden=True) keeps, per query, the hidden state the LM head reads at the query's last
    position after the prefix: a whole-prompt forward's hidden_states[-1] there (StaICC's kernel reads that)."""
    import torch

    from deepthink import kv
    from deepthink.scoring import Unit, score_fast

    lm = tiny_lm(arch)
    if shared and not kv.supports_shared_prefix(lm.model):
        pytest.skip(f"{arch} has no shared-prefix path")
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))              # plain ICL: the demonstrations encoded
    tok = lm.tokenizer
    ids = [tok(q, add_special_tokens=False).input_ids for q in QUERIES]
    units = [Unit(i, q, [(0, [5]), (1, [7])]) for i, q in enumerate(ids)]
    s = score_fast(lm.model, ctx.prefix, units, 2, len(ids), batch_size=2, shared=shared, last_hidden=True)
    assert score_fast(lm.model, ctx.prefix, units, 2, len(ids), batch_size=2, shared=shared).last_hidden is None
    assert len(s.last_hidden) == len(QUERIES) and s.last_hidden[0].dtype.name == "float32"
    for q, h in zip(ids, s.last_hidden):
        with torch.no_grad():
            out = lm.model(torch.tensor([ctx.prefix_ids + q]), output_hidden_states=True)
        assert abs(out.hidden_states[-1][0, -1].float().numpy() - h).max() < 1e-4
    assert abs(s.last_hidden[0] - s.last_hidden[1]).max() > 1e-3              # each query's own
