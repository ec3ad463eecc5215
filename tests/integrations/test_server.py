"""`deepthink serve`: the HTTP API on a tiny random Llama context (TestClient), then a real uvicorn process."""
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'deepthink[serve]'")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import deepthink  # noqa: E402
from deepthink.cli import main  # noqa: E402
from deepthink.integrations.server import RepeatFilter, ScoreRequest, ServeConfig, create_app  # noqa: E402
from deepthink.infer import task_queries  # noqa: E402
from conftest import CHOICES, DEMOS, MULTI, QUERIES, approx, free_port, tiny_lm, wait_in_flight  # noqa: E402

DEMO_TEST = Path(deepthink.__file__).parent / "demo_data" / "sentiment_test.jsonl"
ROWS = [json.loads(line) for line in DEMO_TEST.read_text().splitlines()]
LIMITS = ServeConfig(max_body_bytes=20_000, max_queries=8, max_choices=8, max_request_choices=20,
                     max_query_chars=2_000, max_query_tokens=100, max_new_tokens=50, batch_wait_ms=100)
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def ctx():
    c = deepthink.tune(tiny_lm("llama"), DEMOS, deepthink.TuningConfig(steps=3, step_size=0.1))
    c.origin = {"task": "sentiment-demo", "seed": 0, "shots": 1}
    return c


@pytest.fixture(scope="module")
def client(ctx):
    plain = deepthink.tune(tiny_lm("gpt2"), DEMOS, deepthink.TuningConfig(steps=2, step_size=0.1))
    plain.origin = {"task": None, "demos_file": "demos.txt"}
    with TestClient(create_app({"sent": ctx, "plain": plain}, LIMITS)) as c:
        yield c


def score(client, queries, choices=CHOICES, context="sent", **kw):
    r = client.post("/v1/score", json={"context": context, "queries": queries, "choices": choices, **kw})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def error(response, status, kind):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["status"] == status and err["type"] == kind and err["message"], err
    return err


def batch_metrics(client) -> tuple[int, int]:
    """(model calls, requests they served) so far, from /metrics."""
    text = client.get("/metrics").text
    count = int(re.search(r"^deepthink_batch_requests_count (\d+)$", text, re.M)[1])
    total = float(re.search(r"^deepthink_batch_requests_sum (\S+)$", text, re.M)[1])
    return count, int(total)


# ---------------------------------------------------------------- the endpoints

def test_health_and_contexts(client, ctx):
    assert client.get("/healthz").json() == {"status": "ok", "contexts": 2}
    info = {c["name"]: c for c in client.get("/v1/contexts").json()}
    assert set(info) == {"sent", "plain"}
    s = info["sent"]
    assert s["model"] == {"name": "tiny-llama"} and s["dtype"] == "float32"       # a name, never a path
    assert s["tokens"] == ctx.length and s["steps"] == 3 and s["tuning"]["step_size"] == 0.1
    assert s["origin"]["task"] == "sentiment-demo" and s["stopped"] is None


def test_score_equals_the_library(client, ctx):
    assert score(client, QUERIES) == ctx.predict(QUERIES, CHOICES)        # one request = one predict call, exactly
    rows = score(client, QUERIES, MULTI, normalize=True)                  # one choice list per query
    want = ctx.predict(QUERIES, MULTI, normalize=True)
    assert rows == want
    assert [r["answer"] for r in rows] == [cs[r["prediction_normalized"]] for cs, r in zip(MULTI, rows)]


def test_predict_applies_the_task_layout(client, ctx):
    rows = ROWS[:6] + ["an unlabelled plain-text review"]
    r = client.post("/v1/predict", json={"context": "sent", "rows": rows})
    assert r.status_code == 200, r.text
    body = r.json()
    queries, choices, labels = task_queries("sentiment-demo", rows)
    want = ctx.predict(queries, choices)
    assert body["task"] == "sentiment-demo" and body["accuracy"] is None     # one row has no label
    assert [x["index"] for x in body["results"]] == list(range(7))
    assert [x["label"] for x in body["results"]] == labels == [row["label"] for row in ROWS[:6]] + [None]
    assert [{k: x[k] for k in want[0]} for x in body["results"]] == want
    labelled = client.post("/v1/predict", json={"context": "sent", "rows": ROWS[:4]}).json()
    right = sum(x["prediction"] == x["label"] for x in labelled["results"])
    assert labelled["accuracy"] == right / 4


def test_generate_equals_the_library(client, ctx):
    req = {"context": "sent", "prompt": "Review: witty\nSentiment:", "max_new_tokens": 12, "stop_at_eos": False}
    r = client.post("/v1/generate", json=req).json()
    ids = ctx.generate_tokens(req["prompt"], 12, stop_at_eos=False)
    assert r == {"context": "sent", "text": ctx.lm.tokenizer.decode(ids), "tokens": 12, "finish_reason": "length"}
    sampled = [client.post("/v1/generate", json=req | {"temperature": 1.0, "top_p": 0.9, "seed": 7}).json()["text"]
               for _ in range(2)]
    assert sampled[0] == sampled[1] == ctx.generate(req["prompt"], 12, 1.0, 0.9, seed=7, stop_at_eos=False)
    stop = r["text"][3:5]                                                  # cut at a string the text holds
    cut = client.post("/v1/generate", json=req | {"stop": ["never-there", stop]}).json()
    assert cut["finish_reason"] == "stop" and cut["text"] == r["text"][:r["text"].find(stop)]


# ---------------------------------------------------------------- dynamic batching

def concurrently(fns):
    out = [None] * len(fns)

    def go(i):
        out[i] = fns[i]()
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_concurrent_requests_are_batched_and_answered_as_alone(client, ctx):
    requests = [([q], CHOICES) for q in QUERIES] + [(QUERIES[:2], MULTI[:2]), (QUERIES, CHOICES)]
    alone = [score(client, q, c) for q, c in requests]
    with TestClient(create_app({"sent": ctx}, ServeConfig(batch_wait_ms=500))) as patient:   # a wide window
        together = concurrently([lambda q=q, c=c: score(patient, q, c) for q, c in requests])
        calls, served = batch_metrics(patient)
    assert served == len(requests) and calls < len(requests)         # some requests shared a model call
    for got, want in zip(together, alone):
        # a different batch (padding width, batch size) changes float32 rounding only
        assert [r["logprob"] for r in got] == approx([r["logprob"] for r in want], abs=1e-5)
        assert [r["normalized"] for r in got] == approx([r["normalized"] for r in want], abs=1e-5)
        assert [(r["query"], r["choices"], r["answer"]) for r in got] == [(r["query"], r["choices"], r["answer"])
                                                                         for r in want]


def test_bad_and_oversized_requests_among_good_ones_do_not_disturb_them(client):
    good = [QUERIES[i % 3] for i in range(6)]
    alone = [score(client, [q])[0] for q in good]
    bad = [
        lambda: client.post("/v1/score", json={"context": "sent", "queries": ["x"], "choices": [" a", " a"]}),
        lambda: client.post("/v1/score", content=b'{"context": "sent", "queries": [', headers={"content-type":
                                                                                                 "application/json"}),
        lambda: client.post("/v1/score", json={"context": "sent", "queries": ["y" * 30_000], "choices": CHOICES}),
        lambda: client.post("/v1/score", json={"context": "sent", "queries": ["z" * 500], "choices": CHOICES}),
    ]
    goods = [lambda q=q: client.post("/v1/score", json={"context": "sent", "queries": [q], "choices": CHOICES})
             for q in good]
    out = concurrently([f for pair in zip(goods, bad + bad[:2]) for f in pair])
    got, errs = out[0::2], out[1::2]
    assert [e.status_code for e in errs] == [422, 400, 413, 413, 422, 400]
    for r, want in zip(got, alone):
        assert r.status_code == 200
        row = r.json()["results"][0]
        assert row["logprob"] == approx(want["logprob"], abs=1e-5) and row["answer"] == want["answer"]


# ---------------------------------------------------------------- errors and limits

@pytest.mark.parametrize("body, status, kind, says", [
    ({"context": "nope", "queries": ["q"], "choices": CHOICES}, 404, "unknown_context", "plain, sent"),
    ({"context": "sent", "queries": ["q"]}, 422, "invalid_request", "choices: Field required"),
    ({"context": "sent", "queries": ["q"], "choices": CHOICES, "top_k": 3}, 422, "invalid_request", "top_k"),
    ({"context": "sent", "queries": [], "choices": CHOICES}, 422, "invalid_request", "queries"),
    ({"context": "sent", "queries": ["q"] * 9, "choices": CHOICES}, 413, "too_many_queries", "at most 8"),
    ({"context": "sent", "queries": ["word " * 100], "choices": CHOICES}, 413, "query_too_long", "at most 100"),
    ({"context": "sent", "queries": ["a", "b"], "choices": [[" x"]]}, 422, "invalid_request", "2 queries but 1"),
    ({"context": "sent", "queries": ["a"], "choices": [[]]}, 422, "invalid_request", "no choices"),
    ({"context": "sent", "queries": ["a"], "choices": [""]}, 422, "invalid_request", "adds no tokens"),
    ({"context": "sent", "queries": ["q"], "choices": [f" c{i}" for i in range(9)]}, 413, "too_many_choices",
     "at most 8 per query (--max-choices)"),
    ({"context": "sent", "queries": ["a", "b", "c"], "choices": [f" c{i}" for i in range(7)]}, 413,
     "too_many_choices", "21 query-choice pairs in one request; this server takes at most 20 (--max-request-choices)"),
    ({"context": "sent", "queries": ["x " * 1500], "choices": CHOICES}, 413, "query_too_long",
     "3009 characters; this server takes at most 2000 (--max-query-chars)"),
    ({"context": "sent", "queries": ["q"], "choices": CHOICES, "normalize": "yes"}, 422, "invalid_request",
     "normalize: Input should be a valid boolean"),
    ({"context": "sent", "queries": ["q"], "choices": CHOICES, "normalize": 1}, 422, "invalid_request", "normalize"),
])
def test_score_errors(client, body, status, kind, says):
    assert says in error(client.post("/v1/score", json=body), status, kind)["message"]


def test_other_errors(client):
    bad_json = client.post("/v1/score", content=b"{not json", headers={"content-type": "application/json"})
    assert "not valid JSON" in error(bad_json, 400, "invalid_json")["message"]
    big = client.post("/v1/score", content=b" " * 20_001, headers={"content-type": "application/json"})
    assert "20000 bytes" in error(big, 413, "body_too_large")["message"]
    assert error(client.post("/v1/score", json={"context": "nope", "queries": ["q"], "choices": CHOICES}),
                 404, "unknown_context")["contexts"] == ["plain", "sent"]
    gen = {"context": "sent", "prompt": "Review:"}
    assert "limit of 50" in error(client.post("/v1/generate", json=gen | {"max_new_tokens": 51}), 422,
                                  "max_new_tokens_too_large")["message"]
    error(client.post("/v1/generate", json=gen | {"top_p": 0}), 422, "invalid_request")
    error(client.post("/v1/generate", json=gen | {"prompt": ""}), 422, "invalid_request")
    assert "the prompt is 2001 characters; this server takes at most 2000 (--max-query-chars)" in error(
        client.post("/v1/generate", json=gen | {"prompt": "x" * 2001, "max_new_tokens": 8}), 413, "query_too_long")["message"]
    assert re.search(r"the prompt is \d+ tokens; this server takes at most 100 \(--max-query-tokens\)", error(
        client.post("/v1/generate", json=gen | {"prompt": "word " * 100, "max_new_tokens": 8}), 413, "query_too_long")["message"])
    assert "/v1/score" in error(client.post("/v1/predict", json={"context": "plain", "rows": ["r"]}),
                                422, "no_task")["message"]
    assert "row 1: missing field 'sentence'" in error(client.post("/v1/predict", json={"context": "sent", "rows": [ROWS[0], {"text": 1}]}),
                              422, "invalid_row")["message"]
    assert "row 0" in error(client.post("/v1/predict", json={"context": "sent", "rows": [{"sentence": "x",
                                                                                            "label": 5}]}),
                              422, "invalid_row")["message"]
    error(client.get("/v1/nothing"), 404, "not_found")
    error(client.get("/v1/score"), 405, "method_not_allowed")


class SpyTokenizer:
    """The context's tokenizer, noting the thread and the longest text of every call."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, texts, **kw):
        longest = len(texts) if isinstance(texts, str) else max(map(len, texts))
        self.calls.append((threading.current_thread().name, longest))
        return self.tokenizer(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_lengths_are_checked_by_characters_first_then_tokens_off_the_event_loop(client, ctx, monkeypatch):
    """Issue 26: a 200 KB query with 100 choices was tokenised (20 MB of text) on the event loop before the limit."""
    spy = SpyTokenizer(ctx.lm.tokenizer)
    monkeypatch.setattr(ctx.lm, "tokenizer", spy)
    huge = {"context": "sent", "queries": ["x " * 100_000], "choices": [f" c{i}" for i in range(8)]}
    with TestClient(create_app({"sent": ctx}, ServeConfig(max_choices=8))) as c:
        r = c.post("/v1/score", json=huge)
        assert "200003 characters; this server takes at most 20000 (--max-query-chars)" in error(
            r, 413, "query_too_long")["message"]
        assert spy.calls == []                                   # refused before any tokenising
        r = c.post("/v1/score", json={"context": "sent", "queries": ["word " * 600], "choices": CHOICES})
        assert "(--max-query-tokens)" in error(r, 413, "query_too_long")["message"]
        assert spy.calls and all(thread.startswith("deepthink-tokenize") for thread, _ in spy.calls)
        assert c.post("/v1/score", json={"context": "sent", "queries": QUERIES, "choices": CHOICES}).status_code == 200
    assert not [thread for thread, _ in spy.calls if not thread.startswith("deepthink-")]    # never the event loop


@pytest.mark.parametrize("path, body, says", [
    ("/v1/score", {"context": "sent", "queries": ["a\ud800"], "choices": CHOICES},
     "queries.0: Value error, contains a lone surrogate U+D800 at character 1"),
    ("/v1/score", {"context": "sent", "queries": ["a"], "choices": [" x", "\udfff"]}, "lone surrogate U+DFFF"),
    ("/v1/score", {"context": "s\ud800", "queries": ["a"], "choices": CHOICES}, "context: Value error"),
    ("/v1/predict", {"context": "sent", "rows": [ROWS[0], {"sentence": "bad \ud800"}]},
     "row 1, field 'sentence': contains a lone surrogate U+D800 at character 4"),
    ("/v1/predict", {"context": "sent", "rows": ["plain \udc00"]}, "row 0, the row: contains a lone surrogate"),
    ("/v1/generate", {"context": "sent", "prompt": "go \ud800"}, "prompt: Value error, contains a lone surrogate"),
    ("/v1/generate", {"context": "sent", "prompt": "\ud800"}, "prompt: Value error, contains a lone surrogate"),
    ("/v1/generate", {"context": "sent", "prompt": "x", "stop": ["\ud800"]}, "stop.0: Value error, contains"),
    ("/v1/generate", {"context": "sent", "prompt": "x", "temperature": 1e-45}, "temperature: Value error, must be 0 "
                                                                              "(greedy) or between 0.001 and 100"),
    ("/v1/generate", {"context": "sent", "prompt": "x", "temperature": 1.0, "top_p": 1e-300}, "top_p: Value error, "
                                                                                             "must be between 0.001"),
    ("/v1/generate", {"context": "sent", "prompt": "x", "temperature": 1e300}, "temperature: Value error"),
    ("/v1/generate", {"context": "sent", "prompt": "x", "temperature": True}, "temperature: Input should be a valid "
                                                                             "number"),
    ("/v1/generate", {"context": "sent", "prompt": "x", "seed": 10 ** 30}, "seed: Input should be less than or equal"),
    ("/v1/generate", {"context": "sent", "prompt": "x", "max_new_tokens": "5"}, "max_new_tokens: Input should be a "
                                                                               "valid integer"),
])
def test_input_the_model_cannot_take_is_422_naming_the_field(client, path, body, says):
    """Issue 26: lone surrogates and extreme sampling parameters were 500 internal_error with a traceback."""
    r = client.post(path, content=json.dumps(body).encode(), headers=JSON)      # \ud800 goes as an escape
    assert says in error(r, 422, "invalid_request")["message"]


@pytest.mark.parametrize("label", [1.5, True, 1.0, [1]])
def test_a_label_must_be_an_integer(client, label):
    """Issue 26: `label: 1.5` and `true` were silently read as 1."""
    r = client.post("/v1/predict", json={"context": "sent", "rows": [ROWS[0], {"sentence": "fine", "label": label}]})
    assert "row 1: field 'label' must be an integer from 0, got " in error(r, 422, "invalid_row")["message"]
    ok = client.post("/v1/predict", json={"context": "sent", "rows": [{"sentence": "fine", "label": 1},
                                                                      {"sentence": "fine", "label": "0"}]})
    assert ok.status_code == 200 and [x["label"] for x in ok.json()["results"]] == [1, 0]


def test_every_error_has_the_documented_shape(client, ctx):
    """Issue 26: invalid UTF-8 and a 5000-digit number gave FastAPI's {"detail": ...}; a 900 KB context name was
    echoed whole in the 404."""
    utf8 = client.post("/v1/score", content=b'{"context": "sent", "queries": ["\xff\xfe"], "choices": [" a"]}',
                       headers=JSON)
    assert "'utf-8' codec can't decode byte 0xff" in error(utf8, 400, "invalid_json")["message"]
    digits = client.post("/v1/generate", content=b'{"context": "sent", "prompt": "x", "seed": ' + b"9" * 5000 + b"}",
                         headers=JSON)
    assert "value has 5000 digits" in error(digits, 400, "invalid_json")["message"]
    deep = client.post("/v1/score", content=b"[" * 10_000, headers=JSON)
    assert "recursion" in error(deep, 400, "invalid_json")["message"]
    for r in (utf8, digits, deep):
        assert set(r.json()) == {"error"}
    with TestClient(create_app({"sent": ctx})) as c:             # the default 1 MB body limit
        r = c.post("/v1/score", json={"context": "n" * 900_000, "queries": ["q"], "choices": CHOICES})
        err = error(r, 404, "unknown_context")
        assert len(r.content) < 1000 and "(900000 characters)" in err["message"] and err["contexts"] == ["sent"]


def test_repeated_warnings_are_logged_once_per_interval():
    """Issue 26: a flood of clients filled the log (195 MB in 40 s, 'socket.accept() out of system resource')."""
    now = [0.0]
    f = RepeatFilter(10, clock=lambda: now[0])

    def record(msg, *args, level=logging.WARNING):
        return logging.LogRecord("asyncio", level, __file__, 1, msg, args, None)
    let_through = []
    for i in range(100):
        now[0] = i / 20                                              # 100 records in 5 s
        let_through += [f.filter(record("socket.accept() out of system resource\nsocket: fd=%d", i))]
    assert let_through == [True] + [False] * 99
    assert all(f.filter(record("an info line %d", i, level=logging.INFO)) for i in range(50))
    assert f.filter(record("another warning"))                       # each message template has its own count
    now[0] = 12.0
    late = record("socket.accept() out of system resource\nsocket: fd=%d", 7)
    assert f.filter(late)
    assert late.getMessage() == "socket.accept() out of system resource\nsocket: fd=7 (99 more like this in the " \
                                "last 12 s, not shown)"


def test_api_key(ctx):
    with TestClient(create_app({"sent": ctx}, api_key="s3cret")) as c:
        body = {"context": "sent", "queries": QUERIES[:1], "choices": CHOICES}
        assert "Authorization: Bearer" in error(c.post("/v1/score", json=body), 401, "unauthorized")["message"]
        error(c.post("/v1/score", json=body, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        error(c.get("/metrics"), 401, "unauthorized")
        assert c.post("/v1/score", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/contexts", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/openapi.json").status_code == 200
    for empty in ("", "  "):        # issue 26: an empty key silently turned authentication off
        with pytest.raises(ValueError, match="empty"):
            create_app({"sent": ctx}, api_key=empty)


def test_serve_refuses_an_empty_key(capsys, tmp_path, monkeypatch):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "key").write_text("s3cret\n")
    for argv, env, says in [(["--api-key", ""], None, "--api-key is empty"),
                            ([], "", "$DEEPTHINK_API_KEY is empty"),
                            (["--api-key-file", tmp_path / "empty"], None, "is empty"),
                            (["--api-key-file", tmp_path / "nope"], None, "cannot read it"),
                            (["--api-key", "a", "--api-key-file", tmp_path / "key"], None, "not both")]:
        if env is None:
            monkeypatch.delenv("DEEPTHINK_API_KEY", raising=False)
        else:
            monkeypatch.setenv("DEEPTHINK_API_KEY", env)
        assert main(["serve", "--context", "a=x", *map(str, argv)]) == 2
        assert says in capsys.readouterr().err


def test_metrics_and_openapi(client):
    score(client, QUERIES[:1])
    text = client.get("/metrics").text
    assert re.search(r'^deepthink_requests_total\{endpoint="/v1/score",status="200"\} [1-9]\d*$', text, re.M)
    assert re.search(r'^deepthink_request_seconds_bucket\{endpoint="/v1/score",le="\+Inf"\} [1-9]', text, re.M)
    assert re.search(r"^deepthink_batch_queries_count [1-9]", text, re.M)
    assert re.search(r'^deepthink_requests_in_flight\{endpoint="/v1/score"\} 0$', text, re.M)    # answered
    assert re.search(r'^deepthink_requests_in_flight\{endpoint="/metrics"\} 1$', text, re.M)     # this one
    assert re.search(r"^process_resident_memory_bytes [1-9]\d+$", text, re.M)
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("ScoreRequest", "ScoreResult", "ScoreResponse", "PredictRequest", "PredictResult",
                 "PredictResponse", "GenerateRequest", "GenerateResponse", "ContextInfo"):
        undocumented = [f for f, spec in schemas[name]["properties"].items() if not spec.get("description")]
        assert not undocumented, (name, undocumented)
    assert set(ScoreRequest.model_fields) == set(schemas["ScoreRequest"]["properties"])


# ---------------------------------------------------------------- the command, a real uvicorn process

def test_serve_command_errors(capsys, tmp_path):
    for argv, says in [(["--context", "noequals"], "expected NAME=DIR"),
                       (["--context", "a=x", "--context", "a=y"], "given twice"),
                       (["--context", "bad name=x"], "must be 1-64"),
                       (["--context", f"a={tmp_path}"], "context 'a': "),
                       (["--context", "a=x", "--max-batch", "0"], "--max-batch must be a positive integer"),
                       (["--context", "a=x", "--read-timeout", "0"], "--read-timeout must be a number > 0"),
                       (["--context", "a=x", "--graceful-timeout", "-1"], "--graceful-timeout must be a number >= 0"),
                       (["--context", "a=x", "--max-connections", "0"], "--max-connections must be a positive")]:
        assert main(["serve", *argv]) == 2
        assert says in capsys.readouterr().err


@pytest.mark.parametrize("flags, says", [
    (["--temperature", "1e-45"], "--temperature must be 0 (greedy) or between 0.001 and 100, got 1e-45"),
    (["--temperature", "1", "--top-p", "1e-300"], "--top-p must be between 0.001 and 1"),
    (["--temperature", "nan"], "--temperature must be"),
    (["--prompt", "not UTF-8: \udcff"], "--prompt contains a lone surrogate U+DCFF at character 11"),
])
def test_generate_command_refuses_what_it_cannot_sample(ctx_dir, capsys, flags, says):
    """Issue 26: these exited 1 with a traceback (the last --prompt given is the one used)."""
    assert main(["generate", "--context", str(ctx_dir), "--prompt", "Review:", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and "Traceback" not in err


@pytest.fixture(scope="module")
def server(ctx_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "deepthink", "serve", "--context", f"sent={ctx_dir}",
                             "--port", str(port), "--batch-wait-ms", "300", "--max-new-tokens", "2000",
                             "--graceful-timeout", "60", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_disconnected_clients_do_not_stall_the_batch(server):
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"context": "sent", "queries": QUERIES, "choices": CHOICES}).encode()
    alone = httpx.post(url + "/v1/score", json=json.loads(body)).json()["results"]

    def hang_up(partial: bool):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + (body[:10] if partial else body))
        return "closed"

    def good():
        return httpx.post(url + "/v1/score", json=json.loads(body), timeout=20)

    def served() -> tuple[int, int]:
        text = httpx.get(url + "/metrics").text
        closed = re.search(r'^deepthink_requests_total\{endpoint="/v1/score",status="499"\} (\d+)$', text, re.M)
        return int(closed[1]) if closed else 0, int(float(re.search(r"^deepthink_batch_queries_sum (\S+)$", text,
                                                                    re.M)[1]))

    closed, queries = served()
    start = time.monotonic()
    out = concurrently([lambda: hang_up(False), good, lambda: hang_up(True), good, good])
    assert time.monotonic() - start < 15
    for r in out[1::2] + out[4:]:
        assert r.status_code == 200
        assert [x["logprob"] for x in r.json()["results"]] == approx([x["logprob"] for x in alone], abs=1e-5)
    assert httpx.get(url + "/healthz").status_code == 200
    # both hang-ups are recorded as 499 and their queries were never computed (the batch waits 300 ms)
    assert served() == (closed + 2, queries + 3 * len(QUERIES))


def test_sigterm_finishes_requests_in_flight(server):
    url, proc = server
    # the longest generation the server allows (512 tokens): seconds on the tiny model, even on a fast machine
    req = {"context": "sent", "prompt": "Review: witty\nSentiment:", "max_new_tokens": 512, "stop_at_eos": False}
    out = {}

    def slow():
        out["response"] = httpx.post(url + "/v1/generate", json=req, timeout=60)
        out["done"] = time.monotonic()
    t = threading.Thread(target=slow)
    t.start()
    wait_in_flight(url, "/v1/generate", finished=lambda: "response" in out)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert proc.wait(30) in (0, -signal.SIGTERM)     # uvicorn re-raises the signal after its graceful shutdown
    assert out["done"] > signalled, "the request finished before SIGTERM: make it longer"
    assert out["response"].status_code == 200 and out["response"].json()["tokens"] == 512
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/healthz", timeout=2)


def test_a_gradient_tuned_context_is_served_unchanged(tiny_model_dir, tmp_path):
    """A context saved by `deepthink tune` (gradient KV tuning, its default) scores over HTTP as it does in Python."""
    assert main(["tune", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--shots", "2", "--steps", "3",
                 "--selection", "last", "--out", str(tmp_path / "g")]) == 0
    ctx = deepthink.TunedContext.load(tmp_path / "g", deepthink.load_model(str(tiny_model_dir)))
    assert ctx.method["name"] == "grad_kv"
    with TestClient(create_app({"g": ctx}, LIMITS)) as c:
        r = c.post("/v1/score", json={"context": "g", "queries": QUERIES[:3], "choices": CHOICES})
        assert r.status_code == 200, r.text
        got = [res["logprob"] for res in r.json()["results"]]
    assert got == approx(ctx.score(QUERIES[:3], CHOICES).logprob, abs=1e-5)

