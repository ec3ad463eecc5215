"""Every fast path gives the plain path's scores (within 1e-4), on all tiny architectures.

Paths: score_fast with the prefix held once for the batch (shared, the default where supported), score_fast
with the prefix expanded per row (the fallback for gpt_neo and bloom), the shared attention's portable math
kernel (used off CPU), and sliding windows that cut into the prefix. The plain path is score_naive, or one full
forward of demonstrations + query + choice for plain ICL.
"""
import pytest
import torch

import deepthink
from deepthink import TuningConfig, kv, scoring
from conftest import ARCHS, CHOICES, DEMOS, MULTI, QUERIES, tiny_lm, approx
from conftest import plain_icl_scores

ATOL = 1e-4
SHARED_ARCHS = {"gpt2", "opt", "llama", "qwen2", "mistral", "gemma3"}


def _scores(ctx, choices, **kw):
    units, n = scoring.prepare(ctx.lm.tokenizer, QUERIES, choices, ctx.length)
    return scoring.score_fast(ctx.lm.model, ctx.prefix, units, n, len(QUERIES), **kw)


def _naive(ctx, choices):
    return ctx.score(QUERIES, choices, method="naive")


@pytest.fixture(scope="module", params=ARCHS)
def tuned(request):
    lm = tiny_lm(request.param)
    return deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.1))


def _arch(ctx) -> str:
    return ctx.lm.name.removeprefix("tiny-")


def test_shared_support_matches_architecture(tuned):
    assert kv.supports_shared_prefix(tuned.lm.model) == (_arch(tuned) in SHARED_ARCHS)


@pytest.mark.parametrize("choices", [CHOICES, MULTI], ids=["single-token", "multi-token"])
@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_every_fast_path_equals_naive(tuned, choices, batch_size):
    want = _naive(tuned, choices)
    expanded = _scores(tuned, choices, batch_size=batch_size, shared=False)
    assert expanded.logprob == approx(want.logprob, abs=ATOL)
    assert expanded.n_tokens == want.n_tokens
    if _arch(tuned) not in SHARED_ARCHS:
        with pytest.raises(ValueError, match="shared-prefix path cannot serve"):
            _scores(tuned, choices, shared=True)
        return
    got = _scores(tuned, choices, batch_size=batch_size, shared=True)
    assert got.logprob == approx(want.logprob, abs=ATOL)
    assert got.n_tokens == want.n_tokens
    # the default picks the shared path, and TunedContext.score goes through it
    assert tuned.score(QUERIES, choices, batch_size=batch_size).logprob == approx(want.logprob, abs=ATOL)


@pytest.mark.parametrize("arch", sorted(SHARED_ARCHS))
def test_portable_kernel_equals_cpu_kernel(arch, monkeypatch):
    ctx = deepthink.tune(tiny_lm(arch), DEMOS, TuningConfig(steps=2, step_size=0.1))
    want = _naive(ctx, MULTI)
    monkeypatch.setattr(kv, "_CPU_FLASH", None)          # what a CUDA or MPS device runs
    assert _scores(ctx, MULTI, batch_size=2, shared=True).logprob == approx(want.logprob, abs=ATOL)


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
@pytest.mark.parametrize("extra", [-40, 2, 6, 14])
def test_sliding_window_cuts_into_the_shared_prefix(arch, extra):
    """Windows near the demonstrations' length: later query tokens lose the oldest prefix positions (with
    extra < 0 some lose all of them: their prefix part is empty and must weigh nothing)."""
    L = len(tiny_lm(arch).tokenizer(DEMOS).input_ids)
    lm = tiny_lm(arch, sliding_window=L + extra)
    icl = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    for choices in (CHOICES, MULTI):
        want = plain_icl_scores(lm, DEMOS, QUERIES, [choices] * 3 if isinstance(choices[0], str) else choices)
        got = _scores(icl, choices, batch_size=2, shared=True)
        assert got.logprob == approx(want, abs=ATOL)
    # the window does cut: a model without it scores differently
    wide = plain_icl_scores(tiny_lm(arch), DEMOS, QUERIES, MULTI)
    assert not _scores(icl, MULTI, shared=True).logprob == approx(wide, abs=ATOL)
    if extra > 0:      # tuning needs the whole cache inside the window
        tuned = deepthink.tune(lm, DEMOS, TuningConfig(steps=3, step_size=0.1))
        assert _scores(tuned, MULTI, batch_size=2, shared=True).logprob == approx(_naive(tuned, MULTI).logprob,
                                                                                  abs=ATOL)


@pytest.mark.parametrize("arch", sorted(SHARED_ARCHS))
def test_zero_shot_and_floor(arch):
    """A prefix of only BOS (or none at all) goes through the same paths."""
    lm = tiny_lm(arch)
    zs = deepthink.zero_shot(lm)
    want = plain_icl_scores(lm, "", QUERIES, MULTI)
    assert zs.score(QUERIES, MULTI).logprob == approx(want, abs=ATOL)
    units, n = scoring.prepare(lm.tokenizer, QUERIES, MULTI)
    floor = scoring.score_fast(lm.model, ([], []), units, n, len(QUERIES), shared=True)
    bare = []
    for q, cs in zip(QUERIES, MULTI):
        row = []
        for c in cs:
            s = len(lm.tokenizer(q, add_special_tokens=False).input_ids)
            f = lm.tokenizer(q + c, add_special_tokens=False).input_ids
            logp = lm.model(torch.tensor([f])).logits[0].log_softmax(-1)
            row.append(sum(float(logp[i - 1, f[i]]) for i in range(s, len(f))))
        bare.append(row)
    assert floor.logprob == approx(bare, abs=ATOL)


def test_shared_forward_leaves_the_model_as_it_was():
    lm = tiny_lm("llama")
    before = lm.config._attn_implementation
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=2, step_size=0.1))
    _scores(ctx, MULTI, shared=True)
    assert lm.config._attn_implementation == before
    # the prefix tensors are not modified or expanded in place
    assert all(k.shape[0] == 1 for k in ctx.keys)


def test_shared_attention_needs_its_prefix():
    lm = tiny_lm("llama")
    with kv.shared_attention(lm.model), pytest.raises(RuntimeError, match="deepthink_shared"):
        lm.model(torch.tensor([[5, 6, 7]]))
    assert lm.config._attn_implementation != kv.SHARED_ATTENTION


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_rows_with_a_padded_past_continue_at_their_own_positions(arch):
    """shared_forward with a right-padded per-row past (how choices follow their contexts) equals one plain
    forward of prefix + context + choice per row."""
    lm = tiny_lm(arch, sliding_window=40) if arch == "gemma3" else tiny_lm(arch)
    tok = lm.tokenizer
    ctx = deepthink.tune(lm, DEMOS, TuningConfig(steps=1))
    contexts = [tok(q, add_special_tokens=False).input_ids for q in QUERIES]
    conts = [tok(" a seductive movie", add_special_tokens=False).input_ids, tok(" Number", add_special_tokens=False).input_ids,
             tok(" the plot is witty", add_special_tokens=False).input_ids]
    width = max(map(len, contexts))
    ids = torch.tensor([c + [c[-1]] * (width - len(c)) for c in contexts])
    first = kv.shared_forward(lm.model, ids, ctx.prefix, use_cache=True)
    past = kv.cache_tensors(kv.output_cache(first))
    w2 = max(map(len, conts))
    ids2 = torch.tensor([c + [c[-1]] * (w2 - len(c)) for c in conts])
    got = kv.shared_forward(lm.model, ids2, ctx.prefix, past, torch.tensor([len(c) for c in contexts]))
    for r, (c, t) in enumerate(zip(contexts, conts)):
        full = lm.model.base_model(torch.tensor([ctx.prefix_ids + c + t])).last_hidden_state[0, -len(t):]
        torch.testing.assert_close(got.last_hidden_state[r, :len(t)], full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "bloom"])
def test_sharded_model_tunes_and_scores_unchanged(arch, tmp_path):
    """A model dispatched by accelerate (device_map, here one decoder layer offloaded to disk behind hooks, as
    `device_map="auto"` does when a model does not fit) tunes and scores exactly like the plain model."""
    lm = tiny_lm(arch)
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    base = lm.model.base_model_prefix
    layers = "h" if arch in ("gpt2", "bloom") else "layers"
    device_map = {name: "cpu" for name, _ in lm.model.named_children() if name != base}
    device_map.update({f"{base}.{name}": "cpu" for name, _ in lm.model.base_model.named_children() if name != layers})
    device_map.update({f"{base}.{layers}.0": "cpu", f"{base}.{layers}.1": "disk"})
    sharded = deepthink.load_model(str(tmp_path / "m"), device_map=device_map, offload_folder=str(tmp_path / "off"))
    assert hasattr(getattr(sharded.model.base_model, layers)[1], "_hf_hook")
    cfg = TuningConfig(steps=3, step_size=0.1)
    plain, split = deepthink.tune(lm, DEMOS, cfg), deepthink.tune(sharded, DEMOS, cfg)
    for a, b in zip(plain.keys + plain.values, split.keys + split.values):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    want = plain.score(QUERIES, MULTI).logprob
    for method in ("fast", "naive"):
        assert split.score(QUERIES, MULTI, method=method).logprob == approx(want, abs=ATOL)


def test_device_auto_loads_through_accelerate_and_scores_unchanged(tmp_path, monkeypatch):
    """--device auto is accelerate's device_map="auto" (all on the CPU here); the scores do not change."""
    from transformers import AutoModelForCausalLM

    lm = tiny_lm("llama")
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    seen, load = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: seen.append(kw) or load(*a, **kw))
    auto = deepthink.load_model(str(tmp_path / "m"), device="auto")
    assert seen[0]["device_map"] == "auto" and auto.device.type == "cpu"
    cfg = TuningConfig(steps=2, step_size=0.1)
    want = deepthink.tune(lm, DEMOS, cfg).score(QUERIES, MULTI).logprob
    assert deepthink.tune(auto, DEMOS, cfg).score(QUERIES, MULTI).logprob == approx(want, abs=ATOL)


def test_quantize_says_what_to_install_or_fix(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)           # as if not installed
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        deepthink.load_model(str(tmp_path), quantize="8bit")
    with pytest.raises(ValueError, match="'8bit' or '4bit'"):
        deepthink.load_model(str(tmp_path), quantize="2bit")


def test_model_cache_rehashes_only_files_that_changed(tmp_path, monkeypatch):
    """The second load trusts a cache entry whose files keep the stat signature recorded after a full sha256
    check; any write (even one that keeps the size) brings the full check back, which then fails."""
    import json

    from deepthink import models

    folder = tmp_path / "entry"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights" * 1000)
    files = {p.name: (p.stat().st_size, models.sha256_file(p)) for p in folder.iterdir()}
    (folder / "manifest.json").write_text(json.dumps({"format": models.CACHE_FORMAT, "files": files}))
    assert models._cache_entry_valid(folder)
    assert (folder / models.VERIFIED).exists()
    calls = []
    monkeypatch.setattr(models, "sha256_file", lambda p, *a: calls.append(p) or "x")
    assert models._cache_entry_valid(folder) and not calls          # signature unchanged: no hashing
    with open(folder / "model.safetensors", "r+b") as f:              # same size, other bytes
        f.write(b"W")
    assert not models._cache_entry_valid(folder) and calls


def test_benchmark_runs_with_random_init(tmp_path, capsys):
    """benchmarks/speed.py end to end on a random tiny shape (the path used for 7B shapes without weights):
    all four methods, the memory probes in child processes, the files and the final JSON line."""
    import json

    folder = tmp_path / "tok"
    tiny_lm("llama").tokenizer.save_pretrained(folder)
    tiny_lm("llama").config.save_pretrained(folder)
    speed = _speed_module()
    out = tmp_path / "results"
    summary = speed.main(["--model", str(folder), "--random-init", "tiny-llama", "--quick", "--tasks", "sst2",
                          "--shots", "1", "--max-items", "3", "--reps", "1", "--batch-size", "2", "--mem-budget", "8", "--min-time", "0.05",
                          "--no-load", "--threads", "1", "--out", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == summary
    for key in ("speedup_vs_icl", "speedup_vs_reference", "floor_ratio", "max_batch_ratio", "second_load_s"):
        assert key in summary
    assert summary["max_batch_ratio"] > 0 and summary["floor_ratio_bound"] >= 1.0
    stored = json.loads((out / "speed.json").read_text())
    (entry,) = stored.values()
    assert entry["settings"][0]["max_abs_diff_vs_reference"] < 1e-3
    assert set(entry["settings"][0]["passes"]) == {"icl", "reference", "deepthink", "floor"}
    assert "| sst2 | 1 |" in (out / "speed.md").read_text()
    readme = tmp_path / "README.md"                     # the Performance table is rewritten between its markers
    readme.write_text(f"intro\n{speed.README_MARK[0]}\nold table\n{speed.README_MARK[1]}\nrest\n")
    assert speed.update_readme(stored, readme)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| random:tiny-llama @ cpu quick | " in text
    readme.write_text("no markers")
    assert not speed.update_readme(stored, readme) and readme.read_text() == "no markers"


def test_long_contexts_score_their_choices_in_bounded_chunks(monkeypatch):
    """Multi-token choices after long contexts run in several forwards; the scores do not change."""
    ctx = deepthink.tune(tiny_lm("qwen2"), DEMOS, TuningConfig(steps=2, step_size=0.1))
    want = _naive(ctx, MULTI).logprob
    monkeypatch.setattr(scoring, "CONTINUATION_TOKENS", 1)          # one row per forward
    assert _scores(ctx, MULTI, batch_size=3, shared=True).logprob == approx(want, abs=ATOL)


def _speed_module():
    from conftest import load_benchmark

    return load_benchmark("speed")


def test_attention_bound_counts_the_prefix_attention_of_every_scored_token():
    """c/d bound = (floor multiply-adds + each block token's q.K and p.V over the prefix) / floor, with the
    window instead of L on sliding layers; weights counted by hand from the tiny configs."""
    from types import SimpleNamespace

    speed = _speed_module()
    s = SimpleNamespace(L=500, query_tokens=30, cont_tokens=6, queries=[None] * 5)   # 36 block tokens, 11 head rows
    llama = tiny_lm("llama")      # 2 layers, hidden 32, 4 heads x 8, 2 kv heads, mlp 64, lm_head untied
    vocab = llama.model.get_output_embeddings().weight.shape[0]
    floor = 36 * 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64) + 11 * vocab * 32
    assert speed.attention_bound(llama, s) == pytest.approx((floor + 36 * 2 * (2 * 32 * 500)) / floor)
    gemma = tiny_lm("gemma3")     # same shapes; layer 0 slides over 200 positions, layer 1 sees all
    want = (floor + 36 * (2 * 32 * 200 + 2 * 32 * 500)) / floor
    assert speed.attention_bound(gemma, s) == pytest.approx(want)
    assert speed.attention_bound(gemma, SimpleNamespace(**{**vars(s), "L": 0})) == 1.0


def test_short_methods_are_timed_over_windows_of_several_calls():
    """A method faster than --min-time is called back to back until the window is long enough, and the time is
    per call; the call count is a pure function of the warm-up time (so every repetition does the same work)."""
    speed = _speed_module()
    assert speed.passes_for(0.5, 2.0) == 4 and speed.passes_for(0.3, 1.0) == 4
    assert speed.passes_for(3.0, 2.0) == 1 and speed.passes_for(0.0, 1.0) >= 1
    calls = []
    per_call = speed.timed(lambda: calls.append(1), "cpu", passes=7)
    assert len(calls) == 7 and per_call >= 0


def test_batch_ratio_is_never_infinite():
    """icl that cannot hold one row gives no ratio (not inf, which is not JSON); a capped deepthink search
    gives a lower bound, and says so."""
    speed = _speed_module()
    assert speed.batch_ratio({"max_batch_ratio": None}).startswith("none")
    assert speed.batch_ratio({"max_batch_ratio": 16.0, "max_batch_ratio_is_lower_bound": True}).startswith(">= 16")
    assert speed.batch_ratio({"max_batch_ratio": 40.0}) == "40.00"
