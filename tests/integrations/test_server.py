"""`deepthink serve`: the HTTP API on a tiny random Llama context (TestClient), then a real uvicorn process."""
import json
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
from deepthink.integrations.server import ScoreRequest, ServeConfig, create_app  # noqa: E402
from deepthink.infer import task_queries  # noqa: E402
from conftest import CHOICES, DEMOS, MULTI, QUERIES, approx, tiny_lm  # noqa: E402

DEMO_TEST = Path(deepthink.__file__).parent / "demo_data" / "sentiment_test.jsonl"
ROWS = [json.loads(line) for line in DEMO_TEST.read_text().splitlines()]
LIMITS = ServeConfig(max_body_bytes=20_000, max_queries=8, max_query_tokens=100, max_new_tokens=50, batch_wait_ms=100)


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
    assert s["model"]["name"] == "tiny-llama" and s["dtype"] == "float32"
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
    assert "/v1/score" in error(client.post("/v1/predict", json={"context": "plain", "rows": ["r"]}),
                                422, "no_task")["message"]
    assert "row 1: missing field 'sentence'" in error(client.post("/v1/predict", json={"context": "sent", "rows": [ROWS[0], {"text": 1}]}),
                              422, "invalid_row")["message"]
    assert "row 0" in error(client.post("/v1/predict", json={"context": "sent", "rows": [{"sentence": "x",
                                                                                            "label": 5}]}),
                              422, "invalid_row")["message"]
    error(client.get("/v1/nothing"), 404, "not_found")
    error(client.get("/v1/score"), 405, "method_not_allowed")


def test_api_key(ctx):
    with TestClient(create_app({"sent": ctx}, api_key="s3cret")) as c:
        body = {"context": "sent", "queries": QUERIES[:1], "choices": CHOICES}
        assert "Authorization: Bearer" in error(c.post("/v1/score", json=body), 401, "unauthorized")["message"]
        error(c.post("/v1/score", json=body, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        error(c.get("/metrics"), 401, "unauthorized")
        assert c.post("/v1/score", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/contexts", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/openapi.json").status_code == 200


def test_metrics_and_openapi(client):
    score(client, QUERIES[:1])
    text = client.get("/metrics").text
    assert re.search(r'^deepthink_requests_total\{endpoint="/v1/score",status="200"\} [1-9]\d*$', text, re.M)
    assert re.search(r'^deepthink_request_seconds_bucket\{endpoint="/v1/score",le="\+Inf"\} [1-9]', text, re.M)
    assert re.search(r"^deepthink_batch_queries_count [1-9]", text, re.M)
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
                       (["--context", "a=x", "--max-batch", "0"], "--max-batch must be a positive integer")]:
        assert main(["serve", *argv]) == 2
        assert says in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "ctx"
    assert main(["tune", "--model", str(tiny_model_dir), "--task", "sentiment-demo", "--steps", "2",
                 "--method", "forward", "--step-size", "0.1", "--out", str(out)]) == 0
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "deepthink", "serve", "--context", f"sent={out}",
                             "--port", str(port), "--batch-wait-ms", "300", "--max-new-tokens", "2000",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    time.sleep(0.15)
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

