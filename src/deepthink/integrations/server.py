"""Serve tuned contexts over HTTP: tune once, then score, predict and generate for many clients.

    deepthink serve --context sst2=ctx/sst2 --port 8000          # see docs/serve.md

A tuned context is a compiled few-shot model; inference servers that cache prefixes by token hash cannot take
a modified key/value cache as a prefix, so this one does. FastAPI + uvicorn (`pip install deepthink[serve]`).

- Each distinct model is loaded once; every context is loaded and verified (`TunedContext.load`) at start-up.
  Clients name contexts, never paths.
- All model work runs in ONE worker thread (no concurrent forward passes). Score and predict requests wait in
  an asyncio queue; the batcher gathers what arrives within `batch_wait_ms` (up to `max_batch` queries), and
  runs each context's share as one shared-prefix `TunedContext.predict` call, then hands every request its
  own rows - the same rows it would get alone (to float32 rounding; tested). If a gathered call fails on one
  request's input, each request is run alone, so only the bad one gets the error.
- The OpenAI API (openai_api.py: /v1/models, /v1/completions, /v1/chat/completions) on the same worker, batcher,
  limits and guards; each context is a model named by its name.
- Errors are JSON: {"error": {"status", "type", "message", ...}}, whatever the cause (on the OpenAI API's paths
  OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and 400 where this list says 422). Limits: body
  bytes (413), queries, choices per query and query-choice pairs per request (413), characters per query, checked
  before any tokenising, then tokens per query, counted on a tokeniser thread (413), max_new_tokens (422); unknown
  context (404, lists the names); malformed JSON or invalid UTF-8 (400); invalid fields, lone surrogates, sampling
  parameters out of range, labels that are not integers (422, naming the field); missing or wrong API key (401).
- The connection guards (`serve`): at most --max-connections open (one more: 503, closed at once), request
  headers and then the body due within --read-timeout (closed, or 408), SIGTERM waits --graceful-timeout for the
  requests in flight (a second signal exits at once), repeated warnings logged at most once per 10 s.
"""
from __future__ import annotations

import asyncio
import hmac
import http
import json
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Annotated, Literal, Union

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..context import TunedContext
from ..version import __version__
from .openai_api import is_openai_path, openai_error
from .serving import (API_KEY_ENV, NAME, ServeConfig, load_contexts, parse_context_specs,  # noqa: F401 (re-exported)
                      cut_at_stop, samplable, text_problem)

OPEN_PATHS = ("/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")   # no API key needed
CLIENT_CLOSED = 499     # the status recorded in /metrics for a client that went away before its answer (nginx's)
ENDPOINTS = ("/v1/contexts", "/v1/score", "/v1/predict", "/v1/generate", "/healthz", "/metrics", "/v1/models",
             "/v1/completions", "/v1/chat/completions")
BACKLOG = 128               # listen backlog: asyncio accepts up to this many connections at once, before closing any
DRAIN_GRACE = 1.0           # seconds a body still arriving when shutdown begins gets before its 503
MAX_MESSAGE_CHARS = 1000    # error messages are cut here, and a name a client sent at 80 characters: never echo a body
LOG = logging.getLogger("uvicorn.error.deepthink")   # a child of uvicorn's logger: its format, level and handlers


def _short(text, limit: int = 80) -> str:
    """repr(text), cut to about `limit` characters (a client's string in an error message)."""
    r = repr(text)
    return r if len(r) <= limit else f"{r[:limit]}... ({len(text)} characters)"


def _valid_text(s: str) -> str:
    problem = text_problem(s)
    if problem:
        raise ValueError(problem)
    return s


def _non_empty_text(s: str) -> str:
    if not s:
        raise ValueError("must not be empty")
    return _valid_text(s)


Text = Annotated[str, AfterValidator(_valid_text)]     # a string the tokeniser can take (no lone surrogate)
NonEmptyText = Annotated[str, AfterValidator(_non_empty_text)]  # (pydantic's min_length would refuse a surrogate
#                                                                  with a message that names no cause)


def _bad_text_in(value, limit: int = 100_000) -> str | None:
    """Where in a JSON value (a row) the first string the tokeniser cannot take is, and why; None if none."""
    stack = [("", value)]
    while stack and limit > 0:
        limit -= 1
        where, v = stack.pop()
        if isinstance(v, str):
            problem = text_problem(v)
            if problem:
                return f"{where or 'the row'}: {problem}"
        elif isinstance(v, dict):
            for k, x in reversed(list(v.items())):
                if text_problem(k):
                    return f"a field name in {where or 'the row'}: {text_problem(k)}"
                stack.append((f"{where}.{k}" if where else f"field {k!r}", x))
        elif isinstance(v, list):
            stack += [(f"{where}[{i}]" if where else f"[{i}]", x) for i, x in reversed(list(enumerate(v)))]
    return None


# ---------------------------------------------------------------- request and response bodies

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)    # "yes" is not a bool, 1.5 and true are not ints


class ScoreRequest(_Body):
    context: Text = Field(description="name of a served context (GET /v1/contexts lists them)")
    queries: list[Text] = Field(min_length=1, description="query texts, each placed right after the tuned prefix")
    choices: Union[list[Text], list[list[Text]]] = Field(
        description="the continuations to score: one list shared by every query, or one list per query; a choice "
                    "is the exact text appended to its query (e.g. \" positive\", with its leading space)")
    normalize: bool = Field(False, description="pick `answer` by per-token log-probability instead of the sum")


class ScoreResult(BaseModel):
    query: str = Field(description="the query as given")
    choices: list[str] = Field(description="its choices as scored")
    logprob: list[float] = Field(description="summed log-probability of each choice's tokens")
    normalized: list[float] = Field(description="per-token log-probability of each choice (sum / token count)")
    prediction: int = Field(description="index of the choice with the highest summed log-probability")
    prediction_normalized: int = Field(description="index of the choice with the highest per-token log-probability")
    answer: str = Field(description="the predicted choice's text (by `normalized` when normalize is true)")


class ScoreResponse(BaseModel):
    context: str = Field(description="the context that scored the queries")
    results: list[ScoreResult] = Field(description="one result per query, in request order")


class PredictRequest(_Body):
    context: Text = Field(description="name of a served context that was tuned on a task")
    rows: list[Union[dict, str]] = Field(
        min_length=1, description="rows in the context's task layout (like its eval.jsonl; the label field is "
                                  "optional), or plain strings for tasks whose query is one field")
    normalize: bool = Field(False, description="pick `answer` by per-token log-probability instead of the sum")

    @field_validator("rows")
    @classmethod
    def _rows_are_text(cls, rows):
        for i, row in enumerate(rows):
            problem = _bad_text_in(row)
            if problem:
                raise ValueError(f"row {i}, {problem}")
        return rows


class PredictResult(ScoreResult):
    index: int = Field(description="0-based position of the row in the request")
    label: int | None = Field(None, description="the row's gold label index, when the row has one")


class PredictResponse(BaseModel):
    context: str = Field(description="the context that scored the rows")
    task: str = Field(description="the task whose template and choices formatted the rows")
    results: list[PredictResult] = Field(description="one result per row, in request order")
    accuracy: float | None = Field(None, description="fraction of rows predicted right, when every row has a label")


class GenerateRequest(_Body):
    context: Text = Field(description="name of a served context")
    prompt: NonEmptyText = Field(description="text to continue, placed right after the tuned prefix")
    max_new_tokens: int = Field(64, ge=1, description="at most this many new tokens (the server caps it: "
                                                       "--max-new-tokens)")
    temperature: float = Field(0.0, description="0 = greedy; else sampling, between 0.001 and 100")
    top_p: float = Field(1.0, description="nucleus sampling mass, between 0.001 and 1")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="seed for sampling, 0 to 2**63-1; the same "
                                                                   "seed gives the same text")
    stop: list[Text] = Field([], max_length=16, description="cut the text before the first occurrence of any of "
                             "these strings (at most 16; generation itself ends at max_new_tokens or end-of-sequence)")
    stop_at_eos: bool = Field(True, description="end at the end-of-sequence token")

    _samplable = field_validator("temperature", "top_p")(samplable)


class GenerateResponse(BaseModel):
    context: str = Field(description="the context that generated the text")
    text: str = Field(description="the continuation only (without the prompt or the end-of-sequence token)")
    tokens: int = Field(description="number of tokens generated")
    finish_reason: Literal["stop", "eos", "length"] = Field(
        description="stop: cut at a stop string; eos: the model ended; length: max_new_tokens reached")


class ContextInfo(BaseModel):
    name: str = Field(description="the name clients use for this context (from --context NAME=DIR)")
    model: dict = Field(description="name of the model the context was tuned with (never a path on disk)")
    dtype: str = Field(description="dtype of the model and the tuned keys/values, e.g. float32")
    tokens: int = Field(description="prefix length L (tuned demonstration tokens)")
    steps: int = Field(description="forward-tuning steps done")
    tuning: dict | None = Field(description="the TuningConfig it was tuned with (null for a zero-shot context)")
    method: str | None = Field(default=None, description="the method that made it when not forward tuning: grad_kv, "
                               "ct_kv or a peft baseline (lora, lora_icl, ia3: served with the adapter in the model)")
    origin: dict | None = Field(description="where the demonstrations came from (task, seed, shots or file)")
    stopped: str | None = Field(description="why tuning stopped early, if it did")


# ---------------------------------------------------------------- errors

class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, **extra):
        self.status, self.kind, self.message, self.extra = status, kind, message, extra


def _error_body(status: int, kind: str, message: str, openai: bool = False, **extra) -> dict:
    """This server's error body; with openai=True (the OpenAI API's paths) OpenAI's: {"error": {"message", "type",
    "param", "code"}}, this server's type as the code."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + f"... ({len(message)} characters)"
    if openai:
        return openai_error(status, kind, message, extra.get("param"))
    return {"error": {"status": status, "type": kind, "message": message, **extra}}


def _raw_response(status: int, kind: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response, for the connection guards (which run below the ASGI app)."""
    body = json.dumps(_error_body(status, kind, message)).encode()
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def _validation_error(exc: RequestValidationError, openai: bool = False) -> JSONResponse:
    """422 naming the fields; on the OpenAI API's paths 400 (OpenAI's status for a bad request), the first field
    as `param`."""
    errors = exc.errors()
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        ctx = bad_json[0].get("ctx") or {}
        where = f" at position {bad_json[0]['loc'][1]}" if len(bad_json[0].get("loc", ())) > 1 else ""
        return JSONResponse(_error_body(400, "invalid_json", f"the request body is not valid JSON{where}: "
                                        f"{ctx.get('error', bad_json[0].get('msg'))}", openai), 400)
    details = [{"field": ".".join(str(x) for x in e.get("loc", ())[1:])[:200] or "body",
                "message": e.get("msg", "")[:MAX_MESSAGE_CHARS], "type": e.get("type", "")} for e in errors[:20]]
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
    if openai:
        return JSONResponse(_error_body(400, "invalid_request", message, True, param=details[0]["field"]), 400)
    return JSONResponse(_error_body(422, "invalid_request", message, details=details), 422)


# ---------------------------------------------------------------- metrics

class _Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, x: float) -> None:
        for i, b in enumerate(self.buckets):
            if x <= b:
                self.counts[i] += 1
        self.sum += x
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        brace = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{brace} {self.sum:.6g}", f"{name}_count{brace} {self.count}"]


class Metrics:
    """Counters and histograms in Prometheus' text format (GET /metrics)."""

    LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
    SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        self.batch_requests = _Histogram(self.SIZES)
        self.batch_queries = _Histogram(self.SIZES)

    def begin_request(self, endpoint: str) -> None:
        with self.lock:
            self.in_flight[endpoint] += 1

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """A request's end: counted by status, its latency observed, and no longer in flight."""
        with self.lock:
            self.in_flight[endpoint] -= 1
            self.requests[endpoint, status] += 1
            self.latency.setdefault(endpoint, _Histogram(self.LATENCY)).observe(seconds)

    def observe_batch(self, n_requests: int, n_queries: int) -> None:
        with self.lock:
            self.batch_requests.observe(n_requests)
            self.batch_queries.observe(n_queries)

    def render(self) -> str:
        import psutil

        with self.lock:
            out = ["# HELP deepthink_requests_total HTTP requests by endpoint and status code.",
                   "# TYPE deepthink_requests_total counter"]
            out += [f'deepthink_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP deepthink_requests_in_flight HTTP requests begun and not yet answered, by endpoint.",
                    "# TYPE deepthink_requests_in_flight gauge"]
            out += [f'deepthink_requests_in_flight{{endpoint="{e}"}} {n}' for e, n in sorted(self.in_flight.items())]
            out += ["# HELP deepthink_request_seconds Request latency by endpoint.",
                    "# TYPE deepthink_request_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                out += h.lines("deepthink_request_seconds", f'endpoint="{e}"')
            out += ["# HELP deepthink_batch_requests Requests gathered into one model call.",
                    "# TYPE deepthink_batch_requests histogram", *self.batch_requests.lines("deepthink_batch_requests"),
                    "# HELP deepthink_batch_queries Queries in one model call.",
                    "# TYPE deepthink_batch_queries histogram", *self.batch_queries.lines("deepthink_batch_queries")]
        out += ["# HELP process_resident_memory_bytes Resident memory of the server process.",
                "# TYPE process_resident_memory_bytes gauge",
                f"process_resident_memory_bytes {psutil.Process().memory_info().rss}"]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------- the model worker and the batcher

@dataclass
class _Job:
    context: str
    queries: list            # query texts; for a logprobs job, token id sequences
    choices: list[list[str]] | None
    future: asyncio.Future
    top_k: int | None = None     # a logprobs job (TunedContext.token_logprobs) with this many alternatives


class Worker:
    """One thread for all model work; score jobs gathered per context into one `predict` call.

    A second thread counts tokens for the length checks, so that neither the event loop (which must keep
    answering /healthz) nor the model thread waits on a large request's tokenising."""

    def __init__(self, contexts: dict[str, TunedContext], config: ServeConfig, metrics: Metrics):
        self.contexts, self.config, self.metrics = contexts, config, metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepthink-model")
        self.tokenizer_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepthink-tokenize")
        self.aborting = threading.Event()       # set at shutdown: a generation still running stops at its next token
        self.queue: asyncio.Queue[_Job] | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._batcher())

    async def stop(self) -> None:
        self.aborting.set()
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.tokenizer_executor.shutdown(wait=True, cancel_futures=True)
        self.executor.shutdown(wait=True, cancel_futures=True)   # a model call already running ends first

    async def call(self, fn, *args, **kwargs):
        """Run fn on the model thread (after the model work queued before it)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args, **kwargs))

    async def tokenize(self, fn, *args):
        """Run fn on the tokeniser thread."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_executor, partial(fn, *args))

    async def score(self, context: str, queries: list[str], choices: list[list[str]]) -> list[dict]:
        """TunedContext.predict rows (normalize=False), computed in a batch with other requests'."""
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(context, queries, choices, fut))
        return await fut

    async def logprobs(self, context: str, seqs: list[list[int]], top_k: int) -> list[dict]:
        """TunedContext.token_logprobs rows, computed in a batch with other requests' (OpenAI echo + logprobs)."""
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(context, seqs, None, fut, top_k))
        return await fut

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self.config.batch_wait_ms / 1000
        while True:
            jobs = [await self.queue.get()]
            n = len(jobs[0].queries)
            deadline = loop.time() + wait
            while n < self.config.max_batch:
                try:
                    job = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self.queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                jobs.append(job)
                n += len(job.queries)
            by_context: dict[tuple[str, int | None], list[_Job]] = {}
            for job in jobs:
                if not job.future.done():               # a client that went away is not computed for
                    by_context.setdefault((job.context, job.top_k), []).append(job)
            for (name, _), group in by_context.items():
                for chunk in self._chunks(group):
                    await self._run(name, chunk)

    def _chunks(self, jobs: list[_Job]):
        chunk, n = [], 0
        for job in jobs:
            if chunk and n + len(job.queries) > self.config.max_batch:
                yield chunk
                chunk, n = [], 0
            chunk.append(job)
            n += len(job.queries)
        if chunk:
            yield chunk

    async def _run(self, name: str, jobs: list[_Job]) -> None:
        ctx = self.contexts[name]
        queries = [q for j in jobs for q in j.queries]
        try:
            rows = await self.call(*self._model_call(ctx, jobs[0].top_k, queries, [c for j in jobs for c in j.choices
                                                                                     or ()]))
        except ValueError as e:
            if len(jobs) == 1:
                _settle(jobs[0].future, error=e)
                return
            for job in jobs:                            # one request's input is bad: only it should fail
                await self._run_alone(ctx, job)
            return
        except Exception as e:      # noqa: BLE001  (handed to every waiting request, which answers 500)
            for job in jobs:
                _settle(job.future, error=e)
            return
        self.metrics.observe_batch(len(jobs), len(queries))
        k = 0
        for job in jobs:
            _settle(job.future, rows[k:k + len(job.queries)])
            k += len(job.queries)

    def _model_call(self, ctx: TunedContext, top_k: int | None, queries: list, choices) -> tuple:
        if top_k is None:
            return partial(ctx.predict, batch_size=self.config.batch_size), queries, choices
        return partial(ctx.token_logprobs, top_k=top_k, batch_size=self.config.batch_size), queries

    async def _run_alone(self, ctx: TunedContext, job: _Job) -> None:
        if job.future.done():
            return
        try:
            rows = await self.call(*self._model_call(ctx, job.top_k, job.queries, job.choices))
        except Exception as e:      # noqa: BLE001
            _settle(job.future, error=e)
            return
        self.metrics.observe_batch(1, len(job.queries))
        _settle(job.future, rows)


def _settle(fut: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if fut.done():                  # cancelled: the client disconnected
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _first_too_long(tokenizer, queries: list[str], choices: list[list[str]], limit: int,
                    chunk: int = 64) -> tuple[int, int] | None:
    """(query index, tokens) of the first query that, with one of its choices, is over `limit` tokens; else None.

    Tokenised `chunk` pairs at a time, so that memory stays small whatever the request holds."""
    pairs = ((i, q + c) for i, (q, cs) in enumerate(zip(queries, choices)) for c in cs)
    while batch := list(islice(pairs, chunk)):
        ids = tokenizer([text for _, text in batch], add_special_tokens=False).input_ids
        for (i, _), x in zip(batch, ids):
            if len(x) > limit:
                return i, len(x)
    return None


# ---------------------------------------------------------------- the app

class _Drain:
    """Set when the server starts to shut down: requests still reading their body are answered 503 at once."""

    def __init__(self):
        self.event: asyncio.Event | None = None     # made in the serving loop (lifespan start-up)

    def start(self) -> None:
        if self.event is not None:
            self.event.set()


class _Front:
    """ASGI middleware before routing: API key, body size limit, body read timeout, request metrics."""

    def __init__(self, app, config: ServeConfig, metrics: Metrics, api_key: str | None, drain: _Drain):
        self.app, self.config, self.metrics, self.api_key, self.drain = app, config, metrics, api_key, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status, started = [500], False

        async def send_noting(message):
            nonlocal started
            if message["type"] == "http.response.start":
                status[0], started = message["status"], True
            await send(message)

        openai = is_openai_path(path)
        self.metrics.begin_request(endpoint)
        try:
            if self.api_key is not None and path not in OPEN_PATHS and not self._authorized(scope):
                return await _send_json(send_noting, 401, _error_body(
                    401, "unauthorized" if not openai else "invalid_api_key",
                    "missing or wrong API key: send the header 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                    openai), [(b"www-authenticate", b"Bearer")])
            body = await self._read_body(scope, receive)
            if body is None:        # the client went away while sending
                status[0] = CLIENT_CLOSED
                return
            if isinstance(body, tuple):     # refused before the body was whole: answer and close the connection
                code, kind, message = body
                return await _send_json(send_noting, code, _error_body(code, kind, message, openai),
                                        [(b"connection", b"close")])
            try:
                if not await self._run_watched(scope, receive, send_noting, body) and not started:
                    status[0] = CLIENT_CLOSED
            except asyncio.CancelledError:
                if started or not (self.drain.event and self.drain.event.is_set()):
                    raise
                # uvicorn cancels what outlasts --graceful-timeout: say so in JSON (it would answer a bare 500)
                await _send_json(send_noting, 503, _error_body(
                    503, "shutting_down", "the server shut down before this request was answered "
                                          "(--graceful-timeout): send it again later", openai),
                    [(b"connection", b"close")])
        finally:
            self.metrics.observe_request(endpoint, status[0], time.perf_counter() - start)

    async def _run_watched(self, scope, receive, send, body: bytes) -> bool:
        """Run the app on the body read; cancel it if the client disconnects first (False then).

        A cancelled handler cancels its batcher future, so queued work for a client that went away is dropped.
        """
        gone = asyncio.Event()
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        app = asyncio.ensure_future(self.app(scope, replay, send))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({app, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not app.done():          # the client went away first
                app.cancel()
        try:
            await app
        except asyncio.CancelledError:
            if not gone.is_set():       # we are being cancelled ourselves (shutdown)
                raise
            return False
        return True

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"").decode("latin-1")
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    async def _read_body(self, scope, receive):
        """The whole body; None if the client went away; (status, type, message) if it is refused."""
        limit, timeout = self.config.max_body_bytes, self.config.read_timeout
        too_big = (413, "body_too_large", f"the request body is larger than this server's limit of {limit} bytes "
                                          "(--max-body-bytes): send fewer or shorter queries per request")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return too_big
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        stopping = asyncio.ensure_future(self.drain.event.wait() if self.drain.event else loop.create_future())
        chunks, n = [], 0
        try:
            while True:
                get = asyncio.ensure_future(receive())
                waits = {get} if stopping.done() else {get, stopping}
                done, _ = await asyncio.wait(waits, timeout=max(0.0, deadline - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done and stopping in done:    # shutdown began: a body in transit gets one more second
                    deadline = min(deadline, loop.time() + DRAIN_GRACE)
                    done, _ = await asyncio.wait({get}, timeout=max(0.0, deadline - loop.time()))
                if get not in done:
                    get.cancel()
                    if stopping.done():
                        return 503, "shutting_down", "the server is shutting down: send the request again later"
                    LOG.warning("408: a request body did not arrive within %g s (--read-timeout)", timeout)
                    return 408, "request_timeout", (f"the request body did not arrive within {timeout:g} s "
                                                    "(--read-timeout): send it whole, without pauses")
                message = get.result()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                n += len(chunk)
                if n > limit:
                    return too_big
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        finally:
            stopping.cancel()


async def _send_json(send, status: int, body: dict, headers=()):
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def create_app(contexts: dict[str, TunedContext], config: ServeConfig | None = None,
               api_key: str | None = None) -> FastAPI:
    """The ASGI app serving `contexts` (name -> loaded TunedContext). Run it with uvicorn, or `serve`."""
    config = config or ServeConfig()
    if not contexts:
        raise ValueError("create_app needs at least one context")
    for name in contexts:
        if not NAME.fullmatch(name):
            raise ValueError(f"context name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("api_key is empty: an empty key would turn authentication off; give a key, or None")
    metrics = Metrics()
    worker = Worker(contexts, config, metrics)
    drain = _Drain()

    @asynccontextmanager
    async def lifespan(app):
        drain.event = asyncio.Event()
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()

    app = FastAPI(title="deepthink", version=__version__, lifespan=lifespan,
                  description="Score, predict and generate with forward-tuned contexts (few-shot demonstrations "
                              "compiled into a key/value cache). Errors are JSON: "
                              '{"error": {"status", "type", "message"}}.')
    app.state.contexts, app.state.config, app.state.metrics, app.state.worker = contexts, config, metrics, worker
    app.state.drain = drain

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        openai = is_openai_path(request.url.path)
        return JSONResponse(_error_body(exc.status, exc.kind, exc.message, openai, **exc.extra), exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc, is_openai_path(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        """FastAPI's and Starlette's own errors ({"detail": ...}), in this server's shape."""
        code, path = exc.status_code, _short(request.url.path)
        openai = is_openai_path(request.url.path)
        if code == 404:
            return JSONResponse(_error_body(404, "not_found", f"no endpoint {path}; see /docs", openai), 404)
        if code == 405:
            return JSONResponse(_error_body(405, "method_not_allowed",
                                            f"{request.method} is not allowed on {path}; see /docs", openai), 405)
        if code == 400 and exc.__cause__ is not None:   # the body did not parse: invalid UTF-8, a 5000-digit number
            why = str(exc.__cause__).split("; use sys.set_int_max_str_digits")[0]
            return JSONResponse(_error_body(400, "invalid_json", f"the request body is not valid JSON: {why}",
                                            openai), 400)
        try:
            kind = http.HTTPStatus(code).phrase.lower().replace(" ", "_")
        except ValueError:
            kind = "http_error"
        return JSONResponse(_error_body(code, kind, str(exc.detail), openai), code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return JSONResponse(_error_body(500, "internal_error", f"{type(exc).__name__}: {exc}",
                                        is_openai_path(request.url.path)), 500)

    def get(name: str) -> TunedContext:
        if name not in contexts:
            raise ApiError(404, "unknown_context", f"no context named {_short(name)}; this server has: "
                           f"{', '.join(sorted(contexts))}", contexts=sorted(contexts))
        return contexts[name]

    def check_count(n: int, what: str) -> None:
        if n > config.max_queries:
            raise ApiError(413, "too_many_queries", f"{n} {what} in one request; this server takes at most "
                           f"{config.max_queries} (--max-queries): split the request")

    def check_choices(choices: list[list[str]]) -> None:
        most = max(range(len(choices)), key=lambda i: len(choices[i]))
        if len(choices[most]) > config.max_choices:
            raise ApiError(413, "too_many_choices", f"query {most} has {len(choices[most])} choices; this server "
                           f"takes at most {config.max_choices} per query (--max-choices)")
        pairs = sum(map(len, choices))
        if pairs > config.max_request_choices:
            raise ApiError(413, "too_many_choices", f"{pairs} query-choice pairs in one request; this server takes "
                           f"at most {config.max_request_choices} (--max-request-choices): split the request")

    async def check_length(ctx: TunedContext, queries: list[str], choices: list[list[str]]) -> None:
        """Characters first (no tokenising), then tokens, counted on the tokeniser thread. choices [[""]]: a prompt."""
        prompt = choices == [[""]]
        for i, (q, cs) in enumerate(zip(queries, choices)):
            n = len(q) + max(map(len, cs))
            if n > config.max_query_chars:
                what = "the prompt is" if prompt else f"query {i} with its longest choice is"
                raise ApiError(413, "query_too_long", f"{what} {n} characters; this server takes at most "
                               f"{config.max_query_chars} (--max-query-chars): shorten it")
        long = await worker.tokenize(_first_too_long, ctx.lm.tokenizer, queries, choices, config.max_query_tokens)
        if long is not None:
            what = "the prompt is" if prompt else f"query {long[0]} with one of its choices is"
            raise ApiError(413, "query_too_long", f"{what} {long[1]} tokens; this server takes at most "
                           f"{config.max_query_tokens} (--max-query-tokens): shorten it")

    async def score(name: str, ctx: TunedContext, queries: list[str], choices: list[list[str]], normalize: bool):
        check_choices(choices)
        await check_length(ctx, queries, choices)
        try:
            rows = await worker.score(name, queries, choices)
        except ValueError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        except Exception as e:      # noqa: BLE001
            raise ApiError(500, "model_error", f"{type(e).__name__}: {e}") from None
        if normalize:
            rows = [r | {"answer": r["choices"][r["prediction_normalized"]]} for r in rows]
        return rows

    @app.get("/healthz", summary="liveness: answers while the server runs (no API key needed)")
    async def healthz():
        return {"status": "ok", "contexts": len(contexts)}

    @app.get("/metrics", response_class=PlainTextResponse,
             summary="Prometheus text: requests by endpoint and status, latency histogram, batch sizes, memory")
    async def metrics_page():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/contexts", response_model=list[ContextInfo], summary="the served contexts")
    async def list_contexts():
        return [ContextInfo(name=name, model={"name": c.lm.name},
                            dtype=str(c.lm.dtype).removeprefix("torch."), tokens=c.length, steps=c.steps_done,
                            tuning=c.config.to_dict() if c.config else None, origin=c.origin, stopped=c.stopped,
                            method=(c.method or {}).get("name"))
                for name, c in contexts.items()]

    @app.post("/v1/score", response_model=ScoreResponse,
              summary="log-probability of each choice after each query, and the prediction")
    async def score_endpoint(req: ScoreRequest):
        ctx = get(req.context)
        check_count(len(req.queries), "queries")
        if req.choices and all(isinstance(c, str) for c in req.choices):
            choices = [list(req.choices)] * len(req.queries)
        else:
            choices = [list(c) for c in req.choices]
        if len(choices) != len(req.queries):
            raise ApiError(422, "invalid_request", f"got {len(req.queries)} queries but {len(choices)} choice lists: "
                           "give one list per query, or one list of strings shared by all")
        empty = [i for i, cs in enumerate(choices) if not cs]
        if empty:
            raise ApiError(422, "invalid_request", f"query {empty[0]} has no choices: give at least one")
        rows = await score(req.context, ctx, list(req.queries), choices, req.normalize)
        return {"context": req.context, "results": rows}

    @app.post("/v1/predict", response_model=PredictResponse,
              summary="rows in the context's task layout: the task's template and choices applied, then scored")
    async def predict_endpoint(req: PredictRequest):
        from ..infer import task_queries

        ctx = get(req.context)
        check_count(len(req.rows), "rows")
        task = (ctx.origin or {}).get("task")
        if task is None:
            raise ApiError(422, "no_task", f"context {req.context!r} was not tuned on a task (its demonstrations "
                           "came from a file), so it has no row layout: use /v1/score with queries and choices")
        bad_label = _label_problem(task, req.rows)
        if bad_label:
            raise ApiError(422, "invalid_row", bad_label)
        try:
            queries, choices, labels = task_queries(task, list(req.rows))
        except (ValueError, KeyError) as e:
            raise ApiError(422, "invalid_row", str(e)) from None
        if not all(choices):
            raise ApiError(422, "invalid_row", f"row {choices.index([])} has no choices")
        rows = await score(req.context, ctx, queries, choices, req.normalize)
        key = "prediction_normalized" if req.normalize else "prediction"
        results = [{"index": i, **r, "label": label} for i, (r, label) in enumerate(zip(rows, labels))]
        accuracy = (sum(r[key] == r["label"] for r in results) / len(results)
                    if all(label is not None for label in labels) else None)
        return {"context": req.context, "task": task, "results": results, "accuracy": accuracy}

    @app.post("/v1/generate", response_model=GenerateResponse, summary="continue a prompt after the tuned context")
    async def generate_endpoint(req: GenerateRequest):
        ctx = get(req.context)
        if req.max_new_tokens > config.max_new_tokens:
            raise ApiError(422, "max_new_tokens_too_large", f"max_new_tokens {req.max_new_tokens} is above this "
                           f"server's limit of {config.max_new_tokens} (--max-new-tokens)")
        if any(not s for s in req.stop):
            raise ApiError(422, "invalid_request", "stop strings must be non-empty")
        await check_length(ctx, [req.prompt], [[""]])
        gone = threading.Event()        # the client went away, or shutdown ran out of time: stop generating

        def stop(ids) -> bool:
            return gone.is_set() or worker.aborting.is_set()
        try:
            ids = await worker.call(ctx.generate_tokens, req.prompt, max_new_tokens=req.max_new_tokens,
                                    temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                    stop_at_eos=req.stop_at_eos, stop=stop)
        except ValueError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        except asyncio.CancelledError:
            gone.set()
            raise
        text, cut = cut_at_stop(ctx.lm.tokenizer.decode(ids), req.stop)
        reason = "stop" if cut else "length" if len(ids) == req.max_new_tokens else "eos"
        return {"context": req.context, "text": text, "tokens": len(ids), "finish_reason": reason}

    from . import openai_api

    openai_api.register(app, contexts, config, worker, ApiError, check_count, check_length)
    app.add_middleware(_Front, config=config, metrics=metrics, api_key=api_key, drain=drain)
    return app


def _label_problem(task_name: str, rows: list) -> str | None:
    """Why a row's label is not one the task can read exactly (1.5 and true are not the label 1); None if fine."""
    from ..tasks import get_task

    task = get_task(task_name)
    for i, row in enumerate(rows):
        value = row
        for key in task.label_field.split("."):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            if task.label_format == "letter":
                ok = isinstance(value, str)
                want = "a letter string, e.g. \"A\""
            else:
                ok = (isinstance(value, int) and not isinstance(value, bool)) or (
                    isinstance(value, str) and value.isascii() and value.isdigit())
                want = "an integer" + (" from 1" if task.label_format == "one_based" else " from 0")
            if not ok:
                return f"row {i}: field {task.label_field!r} must be {want}, got {_short(value, 40)}"
    return None


def serve(contexts: dict[str, TunedContext], config: ServeConfig | None = None, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM: requests in flight get --graceful-timeout seconds to finish."""
    config = config or ServeConfig()
    app = create_app(contexts, config, api_key)
    _ensure_open_files(config.max_connections)
    uv = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=_guarded_protocol(config),
                        backlog=BACKLOG, timeout_graceful_shutdown=config.graceful_timeout)
    limit_repeated_warnings()           # after uvicorn.Config, which configures logging
    _Server(uv, app.state.drain).run()


class _Server(uvicorn.Server):
    """uvicorn's server, and: shutdown tells the app first (bodies still arriving get 503); a second signal exits
    at once (uvicorn's own force-exit on a second Ctrl-C still waits for a model call in progress)."""

    def __init__(self, config: uvicorn.Config, drain: _Drain):
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig, frame):
        if self.should_exit and sig in (signal.SIGINT, signal.SIGTERM):
            LOG.warning("a second %s: exiting now, without the requests in flight", signal.Signals(sig).name)
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None):
        self.drain.start()
        await super().shutdown(sockets)


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with two guards below the ASGI app, where a connection that never sends a whole
    request can be seen: at most --max-connections open (one more is answered 503 and closed at once), and the
    request headers due within --read-timeout of the connection or of their first byte (else 408, closed).
    uvicorn's own limit_concurrency answers only once a request's headers are in, so it can do neither."""

    limits = ServeConfig()          # set per server by _guarded_protocol
    refused = False
    header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        if len(self.connections) >= self.limits.max_connections:
            self.refused, self.transport = True, transport
            LOG.warning("refused a connection: %d are open (--max-connections)", len(self.connections))
            transport.write(_raw_response(503, "too_many_connections", f"this server has {len(self.connections)} "
                                          "connections open (--max-connections): try again shortly"))
            transport.close()
            return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc):
        self._disarm()
        if not self.refused:
            super().connection_lost(exc)

    def data_received(self, data):
        if self.refused:
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self.header_timer is None:       # the first bytes of a request: its headers are now due
                self._arm()
        else:
            self._disarm()

    def _arm(self):
        self._disarm()
        self.header_timer = self.loop.call_later(self.limits.read_timeout, self._headers_late)

    def _disarm(self):
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_late(self):
        self.header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            t = self.limits.read_timeout
            LOG.warning("closed a connection whose request headers did not arrive within %g s (--read-timeout)", t)
            self.transport.write(_raw_response(408, "request_timeout", f"the request headers did not arrive within "
                                               f"{t:g} s (--read-timeout)"))
            self.transport.close()


def _guarded_protocol(config: ServeConfig) -> type:
    return type("GuardedH11Protocol", (_GuardedH11,), {"limits": config})


def _ensure_open_files(max_connections: int) -> None:
    """Raise the soft open-file limit to what --max-connections needs (up to the hard limit), or refuse to start."""
    try:
        import resource
    except ImportError:         # not on this platform (Windows): nothing to check
        return
    open_now = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    # a burst of BACKLOG accepted at once while the previous burst's refused sockets are still closing: 2 x BACKLOG
    # (with one burst only, OMP_NUM_THREADS=1 and =2 runs of the flood test still ran out of files)
    needed = open_now + max_connections + 2 * BACKLOG + 32
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    except (ValueError, OSError):
        pass
    if soft < needed:
        raise ValueError(f"--max-connections {max_connections} needs about {needed} open files, but this process "
                         f"may open {soft} (ulimit -n): lower --max-connections or raise the limit")


class RepeatFilter(logging.Filter):
    """At most one warning per `interval` seconds for each (logger, level, message template); the next one let
    through says how many were dropped. Records below WARNING pass untouched. `clock` is for tests."""

    def __init__(self, interval: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.interval, self.clock = interval, clock
        self.seen: dict[tuple, list] = {}           # key -> [time let through, dropped since]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg).split("\n", 1)[0][:200])
        now = self.clock()
        last = self.seen.get(key)
        if last is not None and now - last[0] < self.interval:
            last[1] += 1
            return False
        if last is not None and last[1]:
            record.msg = (f"{record.getMessage()} ({last[1]} more like this in the last {now - last[0]:.0f} s, "
                          "not shown)")
            record.args = None
        if len(self.seen) >= 1000:
            self.seen.clear()
        self.seen[key] = [now, 0]
        return True


def limit_repeated_warnings(interval: float = 10.0) -> None:
    """RepeatFilter on the loggers a flood of bad clients fills: asyncio's (accept() out of files), uvicorn's, ours."""
    for name in ("asyncio", "uvicorn.error", LOG.name):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter(interval))
