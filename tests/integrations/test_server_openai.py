"""`deepthink serve` speaks the OpenAI API (issue 30), checked with the real clients against a live uvicorn server
on a tiny random Llama: the official `openai` package, and lm-evaluation-harness's `local-completions` against
the in-process adapter (`deepthink lm-eval`) with the same context."""
import json
import textwrap
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'deepthink[serve]'")
openai = pytest.importorskip("openai", reason="the serve extra is not installed: pip install 'deepthink[serve]'")
import httpx  # noqa: E402
import uvicorn  # noqa: E402

import deepthink  # noqa: E402
from deepthink.integrations.server import ServeConfig, _guarded_protocol, create_app  # noqa: E402
from conftest import free_port  # noqa: E402

KEY = "sk-test-key"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
LIMITS = ServeConfig(max_query_chars=2_000, max_query_tokens=100, max_new_tokens=50, max_queries=8)
REVIEWS = [("a gorgeous, witty, seductive movie.", 1), ("the plot is nothing but boilerplate clichés.", 0),
           ("witty and gorgeous", 1), ("boilerplate", 0), ("a movie.", 1), ("nothing but clichés", 0)]


@pytest.fixture(scope="module")
def server(tiny_model_dir, ctx_dir):
    """A live uvicorn server (in a thread, with the server's own connection guards) serving the context twice:
    `sent` on a model given a chat template, `plain` on a second copy of the model without one."""
    chat_lm, plain_lm = deepthink.load_model(str(tiny_model_dir)), deepthink.load_model(str(tiny_model_dir))
    chat_lm.tokenizer.chat_template = TEMPLATE
    contexts = {"sent": deepthink.TunedContext.load(ctx_dir, chat_lm),
                "plain": deepthink.TunedContext.load(ctx_dir, plain_lm)}
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(contexts, LIMITS, KEY), host="127.0.0.1", port=port,
                                       log_level="warning", http=_guarded_protocol(LIMITS)))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert uv.started
    yield {"url": f"http://127.0.0.1:{port}", "contexts": contexts}
    uv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=30)


def test_models_list_and_retrieve(client, server):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"sent", "plain"}
    m = models["sent"]
    assert m.object == "model" and m.owned_by == "deepthink" and m.created > 0
    assert m.model_extra["method"] == "forward" and m.model_extra["context_tokens"] == server["contexts"]["sent"].length
    assert m.model_extra["base_model"] == server["contexts"]["sent"].lm.name
    assert client.models.retrieve("plain").id == "plain"


def test_completion_is_the_contexts_greedy_generation(client, server):
    ctx = server["contexts"]["sent"]
    prompt = "Review: witty and gorgeous\nSentiment:"
    want_ids = ctx.generate_tokens(prompt, max_new_tokens=6)
    r = client.completions.create(model="sent", prompt=prompt, max_tokens=6, temperature=0)
    choice = r.choices[0]
    assert choice.text == ctx.lm.tokenizer.decode(want_ids)
    assert choice.finish_reason == ("length" if len(want_ids) == 6 else "stop")
    n_prompt = len(ctx.lm.tokenizer(prompt, add_special_tokens=False).input_ids)
    assert r.usage.prompt_tokens == ctx.length + n_prompt and r.usage.completion_tokens == len(want_ids) + (
        len(want_ids) < 6)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == ctx.length
    # a list of prompts: one choice each, in order; token ids are taken as given
    ids = ctx.lm.tokenizer(prompt, add_special_tokens=False).input_ids
    r2 = client.completions.create(model="sent", prompt=[prompt, "Review: boilerplate"], max_tokens=6, temperature=0)
    assert [c.index for c in r2.choices] == [0, 1] and r2.choices[0].text == choice.text
    r3 = client.completions.create(model="sent", prompt=ids, max_tokens=6, temperature=0)
    assert r3.choices[0].text == choice.text
    # sampling with a seed repeats
    a, b = (client.completions.create(model="sent", prompt=prompt, max_tokens=8, temperature=1.5, seed=7)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_echo_logprobs_are_the_prompt_tokens_after_the_context(client, server):
    ctx = server["contexts"]["sent"]
    tok = ctx.lm.tokenizer
    query, cont = "Review: witty and gorgeous\nSentiment:", " positive"
    ids = tok(query + cont, add_special_tokens=False).input_ids
    n_query = len(tok(query, add_special_tokens=False).input_ids)
    r = client.completions.create(model="sent", prompt=query + cont, max_tokens=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == query + cont
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == query + cont and lp.text_offset[0] == 0
    (want, greedy), = ctx.score_tokens([(ids[:n_query], ids[n_query:])])
    assert sum(lp.token_logprobs[n_query:]) == pytest.approx(want, abs=1e-4)
    assert ctx.score([query], [cont]).logprob[0][0] == pytest.approx(want, abs=1e-4)
    for got, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert len(top) <= 3 and max(top.values()) >= got - 1e-6
    # lm-eval's request: max_tokens 1, logprobs 1, token ids; the last entry is the new token
    r = client.completions.create(model="sent", prompt=[ids, ids[:4]], max_tokens=1, echo=True, logprobs=1,
                                  temperature=0)
    full, short = (c.logprobs for c in r.choices)
    assert len(full.token_logprobs) == len(ids) + 1 and len(short.token_logprobs) == 5
    assert sum(full.token_logprobs[n_query:-1]) == pytest.approx(want, abs=1e-4)
    assert full.token_logprobs[1:len(ids)] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    is_greedy = all(t == max(top.values()) for t, top in zip(full.token_logprobs[n_query:-1],
                                                             full.top_logprobs[n_query:-1]))
    assert is_greedy == greedy


def test_stop_and_streaming(client, server):
    ctx = server["contexts"]["sent"]
    prompt = "Review: boilerplate\nSentiment:"
    whole = client.completions.create(model="sent", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    assert len(whole) > 3
    stop = whole[2:4]
    cut = client.completions.create(model="sent", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == whole[:whole.find(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="sent", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == ctx.length
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="sent", prompt=prompt, max_tokens=12, temperature=0, stream=True, stop=[stop]) if c.choices)
    assert streamed == whole[:whole.find(stop)]
    # the raw stream ends with data: [DONE]
    with httpx.stream("POST", server["url"] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "sent", "prompt": prompt, "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"


def test_a_stream_the_client_leaves_does_not_stop_the_server(client, server):
    with httpx.stream("POST", server["url"] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "sent", "prompt": "Review:", "max_tokens": 50, "stream": True}) as r:
        assert next(r.iter_lines()).startswith("data: ")
    r = client.completions.create(model="sent", prompt="Review:", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_uses_the_models_template_after_the_context(client, server):
    ctx = server["contexts"]["sent"]
    messages = [{"role": "system", "content": "Rate reviews."}, {"role": "user", "content": "witty and gorgeous"}]
    rendered = ctx.lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = ctx.generate(rendered, max_new_tokens=8)
    r = client.chat.completions.create(model="sent", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=2)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert len(r.choices[0].logprobs.content) >= 1 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    assert r.usage.prompt_tokens_details.cached_tokens == ctx.length
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="sent", messages=messages, max_tokens=8, temperature=0, stream=True))
    assert streamed == want
    # no max_tokens: up to --max-new-tokens or what the model's positions leave, never a refusal
    r = client.chat.completions.create(model="sent", messages=messages, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError, match="no chat template") as e:
        client.chat.completions.create(model="plain", messages=messages, max_tokens=4)
    assert e.value.body["code"] == "no_chat_template" and e.value.body["param"] == "messages"


def test_errors_have_openais_shape(client, server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert e.value.body["param"] == "model" and "sent" in e.value.body["message"]
    for kw, param in [({"n": 2}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
                      ({"logprobs": 50}, "logprobs"), ({"max_tokens": 51}, "max_tokens"),
                      ({"prompt": [10**9]}, "prompt"), ({"prompt": ""}, "prompt"),
                      ({"frequency_penalty": 1.0}, "frequency_penalty")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{"model": "sent", "prompt": "hi", "max_tokens": 2, **kw})
        assert e.value.status_code == 400 and e.value.body["param"] == param, (kw, e.value.body)
        assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]
    # the server's limits apply: characters before tokens (413), prompts per request
    r = httpx.post(server["url"] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "sent", "prompt": "x" * 3000, "max_tokens": 2})
    assert r.status_code == 413 and r.json()["error"]["code"] == "query_too_long"
    r = httpx.post(server["url"] + "/v1/completions", headers={"X-API-Key": KEY},
                   json={"model": "sent", "prompt": ["hi"] * 9, "max_tokens": 2})
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server["url"] + "/v1/completions", headers={"X-API-Key": KEY},
                   json={"model": "sent", "prompt": ["x" * 1000] * 1100})               # over --max-body-bytes
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(server["url"] + "/v1/completions", headers={"X-API-Key": KEY}, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # the server's own endpoints keep their documented shape
    r = httpx.post(server["url"] + "/v1/generate", headers={"X-API-Key": KEY}, json={"context": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["status"] == 404


# ---------------------------------------------------------------- lm-evaluation-harness through the server

@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    lm_eval = pytest.importorskip("lm_eval", reason="pip install 'deepthink[lm-eval]' (make test installs it)")
    from lm_eval.tasks import TaskManager

    d = tmp_path_factory.mktemp("openai-lm-eval")
    (d / "rev.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in REVIEWS))
    (d / "tiny_rev.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_rev
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {d / 'rev.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
        doc_to_choice: ["negative", "positive"]
        doc_to_target: label
        metric_list:
          - metric: acc
        """))
    return lm_eval, TaskManager(include_path=str(d), include_defaults=False)


def test_lm_eval_local_completions_equals_the_in_process_adapter(server, ctx_dir, tiny_model_dir, tasks,
                                                                 monkeypatch):
    lm_eval, manager = tasks
    from deepthink.integrations.lm_eval import DeepThinkLM

    monkeypatch.setenv("OPENAI_API_KEY", KEY)           # local-completions sends it as Authorization: Bearer

    def run(model, **kw):
        out = lm_eval.simple_evaluate(model=model, tasks=["tiny_rev"], num_fewshot=0, task_manager=manager,
                                      log_samples=True, bootstrap_iters=0, **kw)
        samples = sorted(out["samples"]["tiny_rev"], key=lambda s: s["doc_id"])
        return out["results"]["tiny_rev"]["acc,none"], [[r[0] for r in s["resps"]] for s in samples]

    ref_acc, ref = run(DeepThinkLM(model=str(tiny_model_dir), context=str(ctx_dir)))
    acc, got = run("local-completions", model_args={
        "model": "sent", "base_url": server["url"] + "/v1/completions", "tokenizer_backend": "huggingface",
        "tokenizer": str(tiny_model_dir), "batch_size": 4, "max_retries": 1})
    assert acc == pytest.approx(ref_acc, abs=1e-4)
    assert len(got) == len(REVIEWS)
    for a, b in zip(got, ref):
        assert [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=1e-4, rel=0)
        assert [x[1] for x in a] == [x[1] for x in b]                         # is_greedy


def test_serve_load_openai_mode_runs_and_reports(tiny_model_dir, ctx_dir, tmp_path):
    """The benchmark's --openai flow on the tiny model: both phases answer every prompt with the same texts and
    the summary holds both rates and their ratio (the real-model numbers are for docs/serve.md, not for a test)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "serve_openai"
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "serve_load.py"), "--openai", "--context",
                        str(ctx_dir), "--items", "8", "--concurrency", "4", "--new-tokens", "4", "--out", str(out),
                        "--timeout", "300"], capture_output=True, text=True, env=env, timeout=360)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(out.with_suffix(".json").read_text())
    assert s["generate"]["requests"] == s["openai"]["requests"] == 8
    assert s["generate"]["failures"] == s["openai"]["failures"] == 0 and s["text_mismatches"] == 0
    assert s["generate"]["tokens"] == s["openai"]["tokens"] > 0
    assert s["ratios"]["openai_vs_generate"] == pytest.approx(s["openai"]["tokens_per_s"] /
                                                               s["generate"]["tokens_per_s"])
    assert "/v1/completions (openai client)" in out.with_suffix(".md").read_text()
    assert json.loads(r.stdout.strip().splitlines()[-1])["text_mismatches"] == 0


def test_fields_are_strict_and_named(server):
    url, auth = server["url"], {"Authorization": f"Bearer {KEY}"}
    for body, param in [({"max_tokens": "5"}, "max_tokens"), ({"prompt": [1.5, 2]}, "prompt"),
                        ({"temperature": True}, "temperature"), ({"best_of": 3}, "best_of"),
                        ({"temprature": 0.5}, "temprature"), ({"stop": [""]}, "stop"), ({"echo": "yes"}, "echo")]:
        r = httpx.post(url + "/v1/completions", headers=auth, json={"model": "sent", "prompt": "hi", **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"].split(".")[0] == param, (body, r.json())
    r = httpx.post(url + "/v1/chat/completions", headers=auth,
                   json={"model": "sent", "messages": [{"role": "robot", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0.role"), r.json()
    r = httpx.post(url + "/v1/chat/completions", headers=auth, json={"model": "sent", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_token_pieces_join_to_the_text(server):
    from deepthink.integrations.openai_api import _pieces

    tok = server["contexts"]["sent"].lm.tokenizer
    for text in ["Review: the plot is nothing but boilerplate clichés.", "ünïcödé ✓ 🎬 films", " a  b\n\nc"]:
        ids = tok(text, add_special_tokens=False).input_ids
        pieces = _pieces(tok, ids)
        assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids)
