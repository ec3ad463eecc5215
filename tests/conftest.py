"""Shared fixtures: tiny random models of every supported architecture with a small trained tokenizer."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

import deepthink
from deepthink import kv

REPO = Path(__file__).resolve().parents[1]
PAPER_TASKS = ["sst2", "sst5", "mr", "agnews", "trec", "copa", "hellaswag", "obqa", "qasc", "winogrande"]
SHARED_DATA = Path(os.environ.get("DEEPTHINK_DATA_DIR", REPO.parent / "shared" / "data"))


def load_benchmark(name: str):
    """benchmarks/NAME.py imported as a module (the scripts are not a package), a fresh copy per call."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

CORPUS = [
    "Review: a gorgeous, witty, seductive movie.\nSentiment: positive\n\n",
    "Review: the plot is nothing but boilerplate clichés.\nSentiment: negative\n\n",
    "Question: What is the capital of France ?\nType: Location\n\n",
    "The man turned on the faucet therefore Water flowed from the spout.",
    "Article: Stocks rallied on Wall Street today.\nCategory: Business\n\n",
    "Abbreviation Entity Description Person Location Number World Sports Technology terrible great neutral",
] * 3


@functools.cache
def tiny_tokenizer(bos: bool):
    """A byte-level BPE tokenizer (vocab ~400); with bos=True it prepends <s> like Llama/OPT/Gemma."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(arch: str):
    import transformers as tf

    v = 400
    common = dict(vocab_size=v, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "gpt2": lambda: tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=256, **common),
        "opt": lambda: tf.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                                    max_position_embeddings=256, word_embed_proj_dim=32, **common),
        "gpt_neo": lambda: tf.GPTNeoConfig(num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=256,
                                           attention_types=[[["global", "local"], 1]], window_size=200, **common),
        "bloom": lambda: tf.BloomConfig(n_layer=2, hidden_size=32, n_head=4, **common),
        "llama": lambda: tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, **common),
        "qwen2": lambda: tf.Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, **common),
        "mistral": lambda: tf.MistralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, sliding_window=200,
                                            **common),
        "gemma3": lambda: tf.Gemma3TextConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=64, head_dim=8,
                                              sliding_window=200, layer_types=["sliding_attention",
                                                                               "full_attention"], **common),
    }[arch]()


ARCHS = ["gpt2", "opt", "gpt_neo", "bloom", "llama", "qwen2", "mistral", "gemma3"]
BOS = {"opt", "llama", "gemma3"}  # architectures whose real tokenizers prepend BOS


@functools.cache
def tiny_lm(arch: str, seed: int = 0, **overrides) -> deepthink.LM:
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    for k, val in overrides.items():
        setattr(config, k, list(val) if isinstance(val, tuple) else val)   # tuples: hashable for the cache
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init is near-uniform; scale up so that scores and updates are far from trivial
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0) if p.dim() > 1 else None
    return deepthink.wrap_model(model, tiny_tokenizer(arch in BOS), name=f"tiny-{arch}")


@functools.cache
def tiny_lm64(arch: str) -> deepthink.LM:
    """tiny_lm(arch) in float64: for properties that hold exactly in arithmetic but that Adam magnifies in float32
    (it divides each gradient element by its own size, so one rounding of a nearly cancelled element moves that
    element by a fraction of lr)."""
    import copy

    lm = tiny_lm(arch)
    return deepthink.wrap_model(copy.deepcopy(lm.model).double(), lm.tokenizer, name=f"{lm.name}-float64")


@pytest.fixture(params=ARCHS)
def lm(request) -> deepthink.LM:
    return tiny_lm(request.param)


DEMOS = ("Review: a gorgeous, witty, seductive movie.\nSentiment: positive\n\n"
         "Review: the plot is nothing but boilerplate clichés.\nSentiment: negative\n\n")
QUERIES = ["Review: witty and gorgeous\nSentiment:", "Review: boilerplate\nSentiment:",
           "Review: a movie.\nSentiment:"]
CHOICES = [" negative", " positive"]
MULTI = [[" terrible plot.", " great", " a seductive movie with witty lines"],
         [" Location", " Number of clichés", " Person"],
         [" Water flowed from the spout.", " Sports", " the plot"]]


def method_results(unit: dict) -> dict:
    """A unit's per-method info without what measures the process rather than the method (grad_kv's tuning
    seconds and peak memory): what two runs of the same unit must agree on."""
    measured = ("tuning_seconds", "process_peak_rss_mb")
    return {m: {k: v for k, v in info.items() if k not in measured} for m, info in unit["methods"].items()}


def assert_same_json(a, b, rel: float = 1e-5, abs: float = 1e-8, where: str = "") -> None:
    """Two JSON-like values equal in structure, strings, ints and bools, and in floats within `rel` (relative) or
    `abs`: what two runs of the same computation agree on. Floats are never compared exactly across runs, threads
    or processes: a sum taken in another order differs in its last bits (e.g. a train loss 14.951251983642578 on one
    process against 14.951251029968262 on two)."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool), f"{where}: {a!r} against {b!r}"
        assert a == pytest.approx(b, rel=rel, abs=abs), f"{where}: {a!r} against {b!r}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), f"{where}: keys {sorted(a)} against {sorted(b)}"
        for k in a:
            assert_same_json(a[k], b[k], rel, abs, f"{where}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} against {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_json(x, y, rel, abs, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} against {b!r}"


def approx(expected, abs=1e-4):
    """pytest.approx for nested lists of scores."""
    import numpy as np

    return pytest.approx(np.asarray(expected, dtype=float), abs=abs, rel=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a local Hugging Face model folder (what `--model DIR` takes)."""
    lm = tiny_lm("llama")
    d = tmp_path_factory.mktemp("tiny-llama")
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server or launcher a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_in_flight(url: str, endpoint: str, seconds: float = 30, finished=lambda: False) -> None:
    """Return once the server at `url` has begun a request to `endpoint` (its /metrics in-flight gauge), so that a
    test signals the server while the request is surely being served, not while it is still on its way.
    `finished()` says whether the request has already been answered: then the gauge will never show it, and the
    test fails at once, saying the request is too short to be caught in flight (not after `seconds` of polling)."""
    import re
    import time

    import httpx

    deadline = time.monotonic() + seconds
    pattern = re.compile(rf'^deepthink_requests_in_flight\{{endpoint="{re.escape(endpoint)}"\}} [1-9]', re.M)
    while not pattern.search(httpx.get(url + "/metrics", timeout=5).text):
        assert not finished(), f"the request to {endpoint} was answered before it was seen in flight: make it longer"
        assert time.monotonic() < deadline, f"no request to {endpoint} in flight after {seconds} s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def ctx_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A context `deepthink tune` saved on the tiny model (forward tuning, sentiment-demo, 2 steps), one per test
    module: what the server tests serve. A module may define its own `ctx_dir` instead."""
    from deepthink.cli import main

    out = tmp_path_factory.mktemp("ctx") / "ctx"
    assert main(["tune", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--steps", "2",
                 "--method", "forward", "--step-size", "0.1", "--out", str(out)]) == 0
    return out


# ---- independent re-implementations the tests compare against

def plain_icl_scores(lm, demos, queries, choices):
    """Log-likelihoods with the demonstrations concatenated before every query, one full forward each."""
    tok = lm.tokenizer
    d = tok(demos).input_ids if demos else tok("").input_ids
    out = []
    for q, cs in zip(queries, choices):
        s = len(tok(q, add_special_tokens=False).input_ids)
        row = []
        for c in cs:
            f = tok(q + c, add_special_tokens=False).input_ids
            ids = torch.tensor([d + f])
            logp = lm.model(ids).logits[0].float().log_softmax(-1)
            row.append(sum(float(logp[len(d) + i - 1, f[i]]) for i in range(s, len(f))))
        out.append(row)
    return out


def reference_tune(lm, demos, steps, eta, beta, positions):
    """An independent, literal re-implementation of the update (explicit loops, own cache handling)."""
    from transformers import DynamicCache

    ids = torch.tensor([lm.tokenizer(demos).input_ids])
    L = ids.shape[1]
    with torch.no_grad():
        c = kv.output_cache(lm.model(ids, use_cache=True))
        K = [layer.keys.clone() for layer in c.layers]
        V = [layer.values.clone() for layer in c.layers]
        mK = mV = None
        for _ in range(steps - 1):
            past = DynamicCache(config=lm.model.config)
            for i, layer in enumerate(past.layers):
                if getattr(layer, "is_sliding", False):
                    layer.activate_past_recording()
                layer.update(K[i], V[i])
            kw = {"position_ids": torch.arange(L)[None]} if positions == "aligned" else {}
            mask = torch.ones(1, 2 * L, dtype=torch.long)
            out = kv.output_cache(lm.model(ids, attention_mask=mask, **kv.cache_kwarg(lm.model, past), **kw))
            Kt = [layer.keys[:, :, L:2 * L] for layer in out.layers]
            Vt = [layer.values[:, :, L:2 * L] for layer in out.layers]
            gK = [a - b for a, b in zip(Kt, K)]
            gV = [a - b for a, b in zip(Vt, V)]
            mK = gK if mK is None else [g + beta * m for g, m in zip(gK, mK)]
            mV = gV if mV is None else [g + beta * m for g, m in zip(gV, mV)]
            K = [k + eta * m for k, m in zip(K, mK)]
            V = [v + eta * m for v, m in zip(V, mV)]
    return K, V


def plain_greedy(lm, demos, prompt, n):
    """Greedy decoding of demos + prompt as one token sequence, every step a full forward without a cache."""
    ids = lm.tokenizer(demos).input_ids + lm.tokenizer(prompt, add_special_tokens=False).input_ids
    new = []
    with torch.no_grad():
        for _ in range(n):
            new.append(int(lm.model(torch.tensor([ids + new])).logits[0, -1].argmax()))
    return new


def as_format_1(meta: dict) -> dict:
    """A context.json as deepthink wrote it before contexts carried their digest and task (format 1)."""
    meta = {k: v for k, v in meta.items() if k not in ("json_sha256", "task")}
    meta["format_version"] = 1
    return meta
