"""The OpenAI-compatible HTTP server (FastAPI) and the web chat page, over one shared `infer.Engine`.

Endpoints: GET /v1/models, POST /v1/chat/completions and /v1/completions (streamed as SSE or not),
POST /tokenize (vLLM's: the token count of a chat, which the web chat sizes max_tokens by), GET /health,
GET /metrics (Prometheus text, serve/metrics.py), GET / (the web chat in static/). The routes
are plain functions on one router; each reads the server's state (engine, tokenizer, model name, API key,
request counters) from the app that received the request.

Each HTTP request becomes engine requests; the engine thread reports tokens through a callback that hops
onto the event loop (`call_soon_threadsafe`). Text is produced incrementally (infer.text.TextStream):
reasoning goes to `reasoning_content`, stop sequences cut the answer only, and a request whose client
disconnects, or whose stop sequence matched, is cancelled so its cache slot is freed before the next
decode step. Bad input is always a 4xx in OpenAI's error shape, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.infer.engine import Engine, EngineError, QueueFull
from nanoseek.infer.sampling import SamplingError, SamplingParams
from nanoseek.infer.text import ChatTokenizer, TextError, TextStream
from nanoseek.serve.metrics import prometheus_text
from nanoseek.serve.protocol import (ChatCompletionRequest, CompletionRequest, ModelCard, ModelList,
                                     TokenizeRequest, new_id, now)

STATIC = Path(__file__).parent / "static"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


@dataclass
class ServerState:
    engine: Engine
    tokenizer: ChatTokenizer
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    created: int = field(default_factory=now)
    requests: Counter = field(default_factory=Counter)  # (path, status) -> count


@dataclass
class Choice:
    """One running engine request and the text made from its tokens."""
    index: int
    req: object
    queue: asyncio.Queue
    text: TextStream
    finish_reason: str | None = None


def create_app(engine: Engine, tokenizer: ChatTokenizer, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 4 << 20, start_engine: bool = True) -> FastAPI:
    """The FastAPI app. With start_engine the app runs the engine on a background thread for its lifetime;
    `nanoseek serve` passes False and runs it on the main thread itself (see Engine.serve_forever)."""

    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start()
        yield
        if start_engine:
            engine.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.nanoseek = ServerState(engine, tokenizer, model_name, api_key, max_body_bytes)
    app.middleware("http")(_guard)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(routes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _state(request: Request) -> ServerState:
    return request.app.state.nanoseek


# ----------------------------------------------------------------------------- guard and errors
async def _guard(request: Request, call_next):
    """Body-size limit and API key before any route runs; counts every response by path and status."""
    state = _state(request)
    path = request.url.path
    try:
        size = int(request.headers.get("content-length") or 0)
    except ValueError:
        size = 0
    if size > state.max_body_bytes:
        resp = error_response(413, f"request body of {size} bytes exceeds the limit of "
                                   f"{state.max_body_bytes} bytes", code="request_too_large")
    elif state.api_key and _protected(path) and not _authorized(request, state.api_key):
        resp = error_response(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                              "authentication_error", code="invalid_api_key")
    else:
        resp = await call_next(request)
    state.requests[(path if path.startswith("/v1/") or path in ("/health", "/metrics", "/tokenize") else "other",
                    resp.status_code)] += 1
    return resp


async def _api_error(request: Request, e: APIError):
    return error_response(e.status, e.message, e.type, e.param, e.code)


async def _validation_error(request: Request, e: RequestValidationError):
    return _validation_response(e.errors())


async def _http_error(request: Request, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(e.status_code, str(e.detail), kind)


async def _internal_error(request: Request, e: Exception):
    return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")


# ----------------------------------------------------------------------------- routes
routes = APIRouter()


@routes.get("/health")
async def health(request: Request):
    state = _state(request)
    ok = state.engine.running
    body = {"status": "ok" if ok else "stopped", "model": state.model_name,
            "queue_depth": state.engine.queue_depth(), "batch_size": state.engine.batch_size()}
    return JSONResponse(body, status_code=200 if ok else 503)


@routes.get("/metrics")
async def metrics(request: Request):
    state = _state(request)
    return PlainTextResponse(prometheus_text(state.engine, state.requests), media_type="text/plain; version=0.0.4")


@routes.get("/v1/models")
async def models(request: Request):
    state = _state(request)
    card = ModelCard(id=state.model_name, created=state.created, max_model_len=state.engine.max_len)
    return ModelList(data=[card]).model_dump()


@routes.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    state = _state(request)
    _check_model(state, model_id)
    return ModelCard(id=state.model_name, created=state.created, max_model_len=state.engine.max_len).model_dump()


@routes.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = _state(request)
    body = await _parse(request, ChatCompletionRequest)
    _check_model(state, body.model)
    try:
        prompt, think_opened = state.tokenizer.chat_prompt(_chat_messages(body.messages))
    except TextError as e:
        raise APIError(400, str(e), param="messages") from None
    choices = _start(state, prompt, body, think_opened=think_opened, split=True)
    if body.stream:
        return _sse(_chat_stream(state, body, choices, len(prompt)), choices)
    await _run_to_end(request, choices)
    out = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": state.model_name,
           "choices": [{"index": c.index, "logprobs": None, "finish_reason": c.finish_reason,
                        "message": {"role": "assistant", "content": c.text.content,
                                    "reasoning_content": c.text.reasoning or None}} for c in choices],
           "usage": _usage(len(prompt), choices)}
    return JSONResponse(out)


@routes.post("/v1/completions")
async def completions(request: Request):
    state = _state(request)
    body = await _parse(request, CompletionRequest)
    _check_model(state, body.model)
    prompt = body.prompt if isinstance(body.prompt, list) else state.tokenizer.encode(body.prompt)
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    choices = _start(state, prompt, body, think_opened=False, split=False)
    echo = state.tokenizer.decode(prompt) if body.echo else ""
    if body.stream:
        return _sse(_text_stream(state, body, choices, len(prompt), echo), choices)
    await _run_to_end(request, choices)
    out = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": state.model_name,
           "choices": [{"index": c.index, "text": echo + c.text.content, "logprobs": None,
                        "finish_reason": c.finish_reason} for c in choices],
           "usage": _usage(len(prompt), choices)}
    return JSONResponse(out)


@routes.post("/tokenize")
async def tokenize(request: Request):
    """Token count of a chat or prompt and the room it leaves (vLLM's /tokenize shape, plus `room`)."""
    state = _state(request)
    body = await _parse(request, TokenizeRequest)
    if body.model is not None:
        _check_model(state, body.model)
    if body.messages is not None:
        try:
            ids, _ = state.tokenizer.chat_prompt(_chat_messages(body.messages))
        except TextError as e:
            raise APIError(400, str(e), param="messages") from None
    else:
        ids = state.tokenizer.encode(body.prompt)
    n = state.engine.max_len
    return {"count": len(ids), "max_model_len": n, "room": max(n - len(ids), 0), "tokens": ids}


@routes.get("/")
async def index():
    return FileResponse(STATIC / "index.html")


# ----------------------------------------------------------------------------- request handling
def _protected(path: str) -> bool:
    return path.startswith("/v1/") or path == "/tokenize"


def _authorized(request: Request, key: str) -> bool:
    given = request.headers.get("authorization", "")
    token = given[7:].strip() if given.lower().startswith("bearer ") else ""
    return hmac.compare_digest(token.encode(), key.encode())


def _validation_response(errors: list) -> JSONResponse:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON", code="invalid_json")
    msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return error_response(400, msg, param=param, code="invalid_value")


async def _parse(request: Request, model: type[BaseModel]):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        resp = _validation_response(e.errors(include_url=False))
        err = json.loads(resp.body)["error"]
        raise APIError(400, err["message"], param=err["param"], code=err["code"]) from None


def _chat_messages(messages) -> list[dict]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


def _start(state: ServerState, prompt: list[int], body, *, think_opened: bool, split: bool) -> list[Choice]:
    engine = state.engine
    if not engine.running:
        raise APIError(503, "the engine is not running", "service_unavailable", code="engine_stopped")
    room = engine.max_len - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt has {len(prompt)} tokens, more than the context of {engine.max_len} "
                            "tokens allows", param="messages", code="context_length_exceeded")
    limit = body.token_limit
    if limit is not None and limit > room:
        raise APIError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({limit}) exceeds the context of "
                            f"{engine.max_len} tokens", param="max_tokens", code="context_length_exceeded")
    eos = state.tokenizer.eos_id
    loop = asyncio.get_running_loop()
    choices: list[Choice] = []
    try:
        for i in range(body.n):
            params = SamplingParams(max_tokens=limit or room, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, seed=None if body.seed is None else body.seed + i,
                                    stop_token_ids=[] if body.ignore_eos else [eos])
            queue: asyncio.Queue = asyncio.Queue()

            def on_event(req, tokens, finished, q=queue):
                loop.call_soon_threadsafe(q.put_nowait, (tokens, finished))

            req = engine.submit(prompt, params, on_event)
            choices.append(Choice(i, req, queue, state.tokenizer.stream(think_opened, body.stop, split)))
    except QueueFull as e:
        _cancel(choices)
        raise APIError(429, f"{e}; retry later", "rate_limit_error", code="queue_full") from None
    except (EngineError, SamplingError) as e:
        _cancel(choices)
        raise APIError(400, str(e), code="invalid_value") from None
    return choices


def _cancel(choices: list[Choice]) -> None:
    for c in choices:
        c.req.cancel()


async def _events(c: Choice) -> AsyncIterator[tuple[str, str]]:
    """(reasoning delta, content delta) pairs of one choice until it ends; sets c.finish_reason."""
    try:
        while True:
            tokens, finished = await c.queue.get()
            d = c.text.feed(tokens, final=finished)
            if d.reasoning or d.content:
                yield d.reasoning, d.content
            if d.stopped:
                c.finish_reason = "stop"
                return
            if finished:
                reason = c.req.finish_reason
                c.finish_reason = reason if reason in ("length", "error") else "stop"
                return
    finally:
        c.req.cancel()  # a no-op when finished; frees the slot at once after a stop string or a disconnect


async def _merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, str, str, bool]]:
    """Events of all choices interleaved as they come: (choice, reasoning, content, finished)."""
    out: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice) -> None:
        async for r, t in _events(c):
            await out.put((c, r, t, False))
        await out.put((c, "", "", True))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        for _ in range(len(choices)):
            while True:
                item = await out.get()
                yield item
                if item[3]:
                    break
    finally:
        for t in tasks:
            t.cancel()
        _cancel(choices)


async def _run_to_end(request: Request, choices: list[Choice]) -> None:
    async def watch() -> None:
        while True:
            await asyncio.sleep(0.2)
            if await request.is_disconnected():
                _cancel(choices)
                return

    watcher = asyncio.create_task(watch())
    try:
        async for _ in _merged(choices):
            pass
    finally:
        watcher.cancel()


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(len(c.text.ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "completion_tokens_details": {"reasoning_tokens": sum(c.text.reasoning_tokens for c in choices)}}


def _sse(gen: AsyncIterator[dict], choices: list[Choice]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in gen:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            _cancel(choices)  # the client went away (the generator is closed) or we finished

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chat_stream(state: ServerState, body: ChatCompletionRequest, choices: list[Choice],
                       prompt_tokens: int) -> AsyncIterator[dict]:
    cid, created = new_id("chatcmpl"), now()
    usage_field = {"usage": None} if body.include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None = None) -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
                **usage_field}

    for c in choices:
        yield chunk(c.index, {"role": "assistant", "content": ""})
    async for c, reasoning, content, finished in _merged(choices):
        if finished:
            yield chunk(c.index, {}, c.finish_reason)
            continue
        if reasoning:
            yield chunk(c.index, {"reasoning_content": reasoning})
        if content:
            yield chunk(c.index, {"content": content})
    if body.include_usage:
        yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
               "choices": [], "usage": _usage(prompt_tokens, choices)}


async def _text_stream(state: ServerState, body: CompletionRequest, choices: list[Choice], prompt_tokens: int,
                       echo: str) -> AsyncIterator[dict]:
    cid, created = new_id("cmpl"), now()
    usage_field = {"usage": None} if body.include_usage else {}

    def chunk(index: int, text: str, finish: str | None = None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
                **usage_field}

    if echo:
        for c in choices:
            yield chunk(c.index, echo)
    async for c, _, content, finished in _merged(choices):
        yield chunk(c.index, "", c.finish_reason) if finished else chunk(c.index, content)
    if body.include_usage:
        yield {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
               "choices": [], "usage": _usage(prompt_tokens, choices)}
