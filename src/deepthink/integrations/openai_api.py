"""The OpenAI HTTP API over the served contexts: a tuned context is a "model" named by its context name.

    GET  /v1/models, /v1/models/{model}     every served context (id = its name; base model and method beside)
    POST /v1/completions                    prompt (text, token ids, or a list of either) continued after the
                                            context; `echo` + `logprobs` give the prompt tokens' log-probabilities
                                            (what lm-evaluation-harness's local-completions scores with)
    POST /v1/chat/completions               messages rendered with the model's own chat template, after the context

Registered on the app by `server.create_app`; the server's limits, API key and connection guards apply as to its
own endpoints. Errors on these paths have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

A prompt token's log-probability is the model's with the tuned context as prefix and the prompt tokens before it.
The first prompt token has none (null, as OpenAI reports it): the context holds keys and values only, not the
logits of its last position. Score requests (echo with max_tokens 0, or 1 at temperature 0: the generated token
is read from the same forward pass) go through the dynamic batcher with other requests'; generation runs one
prompt at a time on the model thread, as /v1/generate does.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Literal, Union

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..context import TunedContext
from .serving import cut_at_stop, samplable, text_problem

OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
MAX_LOGPROBS = 20       # top alternatives per token (OpenAI allows 5 on completions and 20 on chat)
STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}


def is_openai_path(path: str) -> bool:
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def openai_error(status: int, kind: str, message: str, param: str | None = None) -> dict:
    """OpenAI's error body; `kind` (this server's error type, e.g. "query_too_long") is its `code`."""
    etype = STATUS_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": etype, "param": param, "code": kind}}


# ---------------------------------------------------------------- request bodies

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)    # "5" is not a number, 1.5 not a token id

    # OpenAI fields this server does not implement: accepted at their no-op values, refused otherwise
    frequency_penalty: float = Field(0.0, description="only 0 (not implemented)")
    presence_penalty: float = Field(0.0, description="only 0 (not implemented)")
    logit_bias: dict | None = Field(None, description="only empty (not implemented)")
    user: str | None = Field(None, description="ignored")
    n: int = Field(1, description="only 1: one completion per prompt")
    stream: bool = Field(False, description="send the answer as server-sent events, ending with data: [DONE]")
    stream_options: dict | None = Field(None, description='{"include_usage": true} adds a last chunk with usage')
    temperature: float = Field(1.0, description="0 = greedy; else sampling, between 0.001 and 100 (OpenAI's default 1)")
    top_p: float = Field(1.0, description="nucleus sampling mass, between 0.001 and 1")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="seed for sampling; the same seed gives the same text")
    stop: Union[str, list[str], None] = Field(None, description="cut the text before the first of these strings "
                                                                "(at most 16, each non-empty)")

    _samplable = field_validator("temperature", "top_p")(samplable)

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _zero(cls, v):
        if v != 0:
            raise ValueError("only 0 is supported (this server does not implement penalties)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("not supported: send none or {}")
        return v

    @field_validator("n")
    @classmethod
    def _one(cls, v):
        if v != 1:
            raise ValueError(f"only n=1 is supported (one completion per prompt), got {v}: send n separate requests")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Body):
    model: str = Field(description="a served context's name (GET /v1/models lists them)")
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="text placed right after the tuned context, token ids, or a list of either (one choice each)")
    max_tokens: int | None = Field(16, ge=0, description="new tokens at most (0 only with echo: score the prompt)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="per token, its log-probability and the "
                                                                          "top k alternatives")
    echo: bool = Field(False, description="put the prompt before the completion (and its tokens in logprobs)")
    best_of: int | None = Field(None, description="only 1 (not implemented)")
    suffix: str | None = Field(None, description="not supported")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        if v not in (None, 1):
            raise ValueError("only 1 is supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v:
            raise ValueError("not supported (no insertion): send none")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)    # "5" is not a number, 1.5 not a token id
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)    # "5" is not a number, 1.5 not a token id
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Body):
    model: str = Field(description="a served context's name (GET /v1/models lists them)")
    messages: list[Message] = Field(min_length=1, description="the conversation, rendered with the model's chat "
                                                              "template after the tuned context")
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (default: the server's limit)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens (OpenAI's newer name)")
    logprobs: bool = Field(False, description="return each new token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="and this many alternatives per token")


# ---------------------------------------------------------------- the routes

class _Ctx:
    """What the routes need from create_app."""

    def __init__(self, contexts, config, worker, api_error, check_count, check_length):
        self.contexts, self.config, self.worker = contexts, config, worker
        self.ApiError, self.check_count, self.check_length = api_error, check_count, check_length
        self.created = int(time.time())


def register(app: FastAPI, contexts: dict[str, TunedContext], config, worker, api_error, check_count,
             check_length) -> None:
    s = _Ctx(contexts, config, worker, api_error, check_count, check_length)

    def model_card(name: str) -> dict:
        c = contexts[name]
        method = (c.method or {}).get("name") or ("forward" if c.config is not None else "icl")
        return {"id": name, "object": "model", "created": s.created, "owned_by": "deepthink",
                "base_model": c.lm.name, "method": method, "context_tokens": c.length}

    def get(name) -> TunedContext:
        if name not in contexts:
            raise api_error(404, "model_not_found", f"no model (context) named {name[:80]!r}; this server has: "
                            f"{', '.join(sorted(contexts))}", param="model")
        return contexts[name]

    @app.get("/v1/models", summary="OpenAI API: the served contexts, each as a model")
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in contexts]}

    @app.get("/v1/models/{model}", summary="OpenAI API: one served context as a model")
    async def get_model(model: str):
        get(model)
        return model_card(model)

    @app.post("/v1/completions", summary="OpenAI API: continue (or, with echo, score) prompts after a context")
    async def completions(req: CompletionRequest):
        ctx = get(req.model)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        _check_max_tokens(s, max_tokens)
        if max_tokens == 0 and not req.echo:
            raise api_error(400, "invalid_request", "max_tokens 0 generates nothing: give max_tokens >= 1, or "
                            "echo: true to score the prompt", param="max_tokens")
        prompts = await _prompt_ids(s, ctx, req.prompt)
        if req.stream:
            if len(prompts) != 1 or req.echo or req.logprobs is not None:
                raise api_error(400, "invalid_request", "stream takes one prompt, without echo or logprobs",
                                param="stream")
            _check_positions(s, ctx, prompts[0][1], max_tokens)
            return _stream(s, ctx, req, prompts[0][1], max_tokens, chat=False)
        for _, ids in prompts:
            _check_positions(s, ctx, ids, max_tokens)
        k = req.logprobs
        scored = None
        if req.echo and k is not None:
            try:
                scored = await worker.logprobs(req.model, [ids for _, ids in prompts], k)
            except ValueError as e:
                raise api_error(400, "invalid_request", str(e), param="prompt") from None
        choices, n_new = [], 0
        for i, (text, ids) in enumerate(prompts):
            if max_tokens == 0:
                new, eos = [], False
            elif scored is not None and max_tokens == 1 and req.temperature == 0 and not req.stops():
                nxt = int(scored[i]["next"].argmax())
                lp = scored[i]["next"]
                new = [(nxt, float(lp[nxt]), _top(lp, k))]
                eos = nxt == ctx.lm.tokenizer.eos_token_id
            else:
                new, eos = await _generate(s, ctx, ids, max_tokens, req, k)
            n_new += len(new)       # the token texts are decoded on the tokeniser thread, not the event loop
            choices.append(await worker.tokenize(_completion_choice, ctx, i, text, ids, new, eos, req,
                                                 scored[i] if scored else None))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices,
                "usage": _usage(ctx, sum(len(ids) for _, ids in prompts), n_new, len(prompts))}

    @app.post("/v1/chat/completions", summary="OpenAI API: answer a conversation after a context")
    async def chat_completions(req: ChatRequest):
        ctx = get(req.model)
        asked = req.max_completion_tokens or req.max_tokens
        max_tokens = asked or config.max_new_tokens
        _check_max_tokens(s, max_tokens)
        tok = ctx.lm.tokenizer
        if not getattr(tok, "chat_template", None):
            raise api_error(400, "no_chat_template", f"model {req.model!r} ({ctx.lm.name}) has no chat template: "
                            "use /v1/completions with a prompt, or serve an instruct model", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:      # noqa: BLE001  (the template's own error, e.g. "roles must alternate")
            raise api_error(400, "invalid_messages", f"the chat template refused the messages: {e}",
                            param="messages") from None
        if ctx.length and tok.bos_token and text.startswith(tok.bos_token):
            text = text[len(tok.bos_token):]       # the context already starts the sequence
        (_, ids), = await _prompt_ids(s, ctx, text, what="the rendered conversation")
        if asked is None:           # as OpenAI: up to the limit, or what the model's positions leave
            max_tokens = max(1, min(max_tokens, _positions_left(ctx, ids)))
        _check_positions(s, ctx, ids, max_tokens)
        if req.stream:
            return _stream(s, ctx, req, ids, max_tokens, chat=True)
        k = (req.top_logprobs or 0) if req.logprobs else None
        new, eos = await _generate(s, ctx, ids, max_tokens, req, k)
        out, reason, kept = _finish(ctx, new, eos, req.stops())
        logprobs = None
        if req.logprobs:
            logprobs = {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                     "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode())}
                                                      for a, b in top.items()]}
                                    for t, lp, top in kept]}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "choices": [{"index": 0, "message": {"role": "assistant", "content": out},
                                                 "logprobs": logprobs, "finish_reason": reason}],
                "usage": _usage(ctx, len(ids), len(new), 1)}


# ---------------------------------------------------------------- helpers

def _check_max_tokens(s: _Ctx, n: int) -> None:
    if n > s.config.max_new_tokens:
        raise s.ApiError(400, "max_tokens_too_large", f"max_tokens {n} is above this server's limit of "
                         f"{s.config.max_new_tokens} (--max-new-tokens)", param="max_tokens")


def _positions_left(ctx: TunedContext, ids: list[int]) -> int:
    from .. import kv

    limit = kv.max_positions(ctx.lm.config)
    return 2**31 if limit is None else limit - ctx.length - len(ids)


def _check_positions(s: _Ctx, ctx: TunedContext, ids: list[int], max_tokens: int) -> None:
    from .. import kv

    limit = kv.max_positions(ctx.lm.config)
    if limit is not None and ctx.length + len(ids) + max_tokens > limit:
        raise s.ApiError(400, "context_length_exceeded", f"{ctx.length} context + {len(ids)} prompt + {max_tokens} "
                         f"new tokens exceed the model's {limit} positions: shorten the prompt or lower max_tokens",
                         param="prompt")


async def _prompt_ids(s: _Ctx, ctx: TunedContext, prompt, what: str = "") -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt, after the server's limits: count, characters, tokens, valid token ids."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise s.ApiError(400, "invalid_request", "prompt is empty: give a string, token ids, or a list of either",
                         param="prompt")
    s.check_count(len(prompt), "prompts")
    tok = ctx.lm.tokenizer
    vocab = ctx.lm.model.get_input_embeddings().weight.shape[0]
    out: list[tuple[str, list[int]] | None] = [None] * len(prompt)
    texts = [(i, p) for i, p in enumerate(prompt) if isinstance(p, str)]
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            continue
        where = f"prompt[{i}]" if len(prompt) > 1 else "prompt"
        if not p:
            raise s.ApiError(400, "invalid_request", f"{where} has no tokens", param="prompt")
        if len(p) > s.config.max_query_tokens:
            raise s.ApiError(413, "query_too_long", f"{where} is {len(p)} tokens; this server takes at most "
                             f"{s.config.max_query_tokens} (--max-query-tokens): shorten it", param="prompt")
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise s.ApiError(400, "invalid_request", f"{where} holds token id {bad}, outside the model's vocabulary "
                             f"(0 to {vocab - 1})", param="prompt")
        out[i] = (tok.decode(p), list(p))
    for i, p in texts:
        if not p:
            raise s.ApiError(400, "invalid_request", f"{what or f'prompt {i}'} is empty", param="prompt")
        if problem := text_problem(p):
            raise s.ApiError(400, "invalid_request", f"{what or f'prompt {i}'}: {problem}", param="prompt")
        await s.check_length(ctx, [p], [[""]])
        ids = await s.worker.tokenize(lambda text: tok(text, add_special_tokens=False).input_ids, p)
        if not ids:
            raise s.ApiError(400, "invalid_request", f"{what or f'prompt {i}'} tokenises to nothing", param="prompt")
        out[i] = (p, ids)
    return out


def _top(logp, k: int | None) -> list[tuple[int, float]]:
    if not k:
        return []
    v, j = logp.topk(k)
    return list(zip(j.tolist(), v.tolist()))


async def _generate(s: _Ctx, ctx: TunedContext, ids: list[int], max_tokens: int, req, k: int | None,
                    on_token=None) -> tuple[list[tuple[int, float, list]], bool]:
    """The new tokens as (id, log-probability, top k (id, logprob)), and whether the model ended (EOS)."""
    new: list[tuple[int, float, list]] = []
    gone = threading.Event()
    stops, tok, eos_id = req.stops(), ctx.lm.tokenizer, ctx.lm.tokenizer.eos_token_id

    def observe(t, logits):
        if k is None:
            new.append((t, 0.0, []))
        else:
            lp = logits.log_softmax(-1)
            new.append((t, float(lp[t]), _top(lp, k)))
        if on_token is not None:
            on_token(t)

    def stop(out_ids) -> bool:
        if gone.is_set() or s.worker.aborting.is_set():
            return True
        return bool(stops) and any(x in tok.decode(out_ids) for x in stops)
    try:
        await s.worker.call(ctx.generate_tokens, ids, max_new_tokens=max_tokens, temperature=req.temperature,
                            top_p=req.top_p, seed=req.seed, stop_at_eos=True, stop=stop, observe=observe)
    except ValueError as e:
        raise s.ApiError(400, "invalid_request", str(e)) from None
    except asyncio.CancelledError:
        gone.set()
        raise
    return new, bool(new) and new[-1][0] == eos_id      # generation stops right after an EOS it chose


def _pieces(tok, ids: list[int], window: int = 6) -> list[str]:
    """Each token's text as it adds to the decoded text (a character split over tokens goes to its last token):
    decoded with the few tokens before it, so that a tokenizer that drops a leading space from a lone token
    (SentencePiece) keeps it, in time linear in the length."""
    out = []
    for n in range(1, len(ids) + 1):
        a = max(0, n - window)
        before = tok.decode(ids[a:n - 1]).rstrip("\ufffd")     # an unfinished character waits for its last byte
        text = tok.decode(ids[a:n])
        text = text if n == len(ids) else text.rstrip("\ufffd")
        out.append(text[len(before):] if text.startswith(before) else tok.decode(ids[n - 1:n]))
    return out


def _finish(ctx: TunedContext, new: list, eos: bool, stops: list[str]):
    """(text, finish_reason, kept tokens as (text, logprob, {alternative text: logprob})) of a generation."""
    tok = ctx.lm.tokenizer
    ids = [t for t, _, _ in new]
    if eos:
        ids = ids[:-1]
    text, cut = cut_at_stop(tok.decode(ids), stops)
    pieces = _pieces(tok, ids)
    n_kept = len(ids)
    if cut:
        reason = "stop"
        n_kept, pos = 0, 0
        while n_kept < len(pieces) and pos < len(text):
            pos += len(pieces[n_kept])
            n_kept += 1
    else:
        reason = "stop" if eos else "length"
    kept = [(p, lp, _alternatives(tok, top)) for p, (_, lp, top) in zip(pieces[:n_kept], new[:n_kept])]
    if eos and not cut:
        t, lp, top = new[-1]
        kept.append((tok.decode([t], skip_special_tokens=False), lp, _alternatives(tok, top)))
    return text, reason, kept


def _alternatives(tok, top: list[tuple[int, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for t, lp in top:
        out.setdefault(tok.decode([t], skip_special_tokens=False), lp)
    return out


def _completion_choice(ctx: TunedContext, index: int, prompt_text: str, ids: list[int], new: list, eos: bool,
                       req: CompletionRequest, scored: dict | None) -> dict:
    tok = ctx.lm.tokenizer
    text, reason, kept = _finish(ctx, new, eos, req.stops())
    if not new:
        reason = "length"
    logprobs = None
    if req.logprobs is not None:
        tokens, lps, tops = [], [], []
        if req.echo:
            tokens = _pieces(tok, ids)
            lps = [None, *scored["logprobs"]]
            tops = [None] + ([_alternatives(tok, t) for t in scored["top"][:-1]] if scored["top"]
                             else [{} for _ in ids[1:]])
        tokens += [p for p, _, _ in kept]
        lps += [lp for _, lp, _ in kept]
        tops += [top for _, _, top in kept]
        start = 0
        offsets = []
        for p in tokens:
            offsets.append(start)
            start += len(p)
        logprobs = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
    return {"index": index, "text": (prompt_text if req.echo else "") + text, "logprobs": logprobs,
            "finish_reason": reason}


def _usage(ctx: TunedContext, prompt_tokens: int, new_tokens: int, n_prompts: int) -> dict:
    cached = ctx.length * n_prompts
    return {"prompt_tokens": cached + prompt_tokens, "completion_tokens": new_tokens,
            "total_tokens": cached + prompt_tokens + new_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def _stream(s: _Ctx, ctx: TunedContext, req, ids: list[int], max_tokens: int, chat: bool) -> StreamingResponse:
    """Server-sent events: one chunk per piece of new text (held back while it could begin a stop string), a
    last chunk with finish_reason, a usage chunk when stream_options asks, then data: [DONE]."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    tok, stops, eos_id = ctx.lm.tokenizer, req.stops(), ctx.lm.tokenizer.eos_token_id
    hold = max((len(x) for x in stops), default=1) - 1
    cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(text: str | None, reason: str | None = None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            body = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    async def events():
        task = asyncio.ensure_future(_generate(s, ctx, ids, max_tokens, req, None,
                                               on_token=lambda t: loop.call_soon_threadsafe(queue.put_nowait, t)))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        new: list[int] = []
        sent, reason = 0, None
        try:
            if chat:
                yield chunk(None, first=True)
            while (t := await queue.get()) is not None:
                if t == eos_id:
                    continue
                new.append(t)
                text, cut = cut_at_stop(tok.decode(new), stops)
                if cut:
                    reason = "stop"
                safe = len(text) if reason else len(text) - hold
                if not reason and text.endswith("\ufffd"):
                    safe = min(safe, len(text) - 1)
                if safe > sent:
                    yield chunk(text[sent:safe])
                    sent = safe
            try:
                generated, eos = await task
            except s.ApiError as e:
                yield f"data: {json.dumps(openai_error(e.status, e.kind, e.message))}\n\n"
                return
            except Exception as e:      # noqa: BLE001  (the headers are sent: the error goes in the stream)
                yield f"data: {json.dumps(openai_error(500, 'model_error', f'{type(e).__name__}: {e}'))}\n\n"
                return
            if reason is None:
                text, cut = cut_at_stop(tok.decode(new), stops)
                if len(text) > sent:
                    yield chunk(text[sent:])
                reason = "stop" if cut or eos else "length"
            yield chunk(None, reason)
            if req.include_usage():
                body = {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created, "model": req.model, "choices": [],
                        "usage": _usage(ctx, len(ids), len(generated), 1)}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():
                task.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
