"""The OpenAI-compatible HTTP server (FastAPI) and the web chat page, over one shared `infer.Engine`.

Endpoints: GET /v1/models, POST /v1/chat/completions (serve/chat.py) and /v1/completions
(serve/completions.py), streamed as SSE or not; POST /tokenize (vLLM's: the token count of a chat, which
the web chat sizes max_tokens by); GET /health, GET /metrics (Prometheus, serve/metrics.py),
GET / (the web chat in static/). Every route reads the server's state (engine, tokenizer, model name,
API key, metrics, worker threads) from the app that received the request; serve/generation.py holds what
the generating routes share.

Bad input is always a 4xx in OpenAI's error shape: an unsupported parameter names itself, a body over the
limit is a 413 while it is still arriving, JSON nested thousands deep a 400. An unexpected failure is a
500 that says only that (the exception goes to the log, never to the client). docs/serving.md documents
every parameter.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.infer.engine import Engine
from nanoseek.infer.text import ChatTokenizer, TextError
from nanoseek.serve import chat, completions
from nanoseek.serve.generation import APIError, error_response, parse, read_body, validation_error
from nanoseek.serve.metrics import CONTENT_TYPE, ServerMetrics
from nanoseek.serve.protocol import ModelCard, ModelList, TokenizeRequest, now

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("nanoseek.serve")


@dataclass
class ServerState:
    engine: Engine
    tokenizer: ChatTokenizer
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    created: int = field(default_factory=now)
    metrics: ServerMetrics | None = None
    templates: list = field(default_factory=list)  # (path regex, route template) for metric labels
    # Rendering, tokenising and validating run here, off the event loop (two threads: the machine's
    # cores belong to the engine; these only have to keep the loop free).
    workers: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="nanoseek-io"))

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = ServerMetrics(self.engine)

    async def blocking(self, fn, *args):
        """fn(*args) on a worker thread; the event loop keeps serving other clients meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, functools.partial(fn, *args))

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")


def create_app(engine: Engine, tokenizer: ChatTokenizer, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 4 << 20, start_engine: bool = True) -> FastAPI:
    """The FastAPI app. With start_engine the app runs the engine on a background thread for its lifetime;
    `nanoseek serve` passes False and runs it on the main thread itself (see Engine.serve_forever)."""
    state = ServerState(engine, tokenizer, model_name, api_key, max_body_bytes)

    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start()
        yield
        if start_engine:
            engine.stop()
        state.workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.nanoseek = state
    app.middleware("http")(_guard)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    for router in (routes, chat.router, completions.router):
        app.include_router(router)
        state.templates += [(r.path_regex, r.path) for r in router.routes]
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    state.templates.append((re.compile("^/static/"), "/static"))
    return app


def _state(request: Request) -> ServerState:
    return request.app.state.nanoseek


# ----------------------------------------------------------------------------- guard and errors
def route_template(request: Request) -> str:
    """The path template of the route this request's path matches (`/v1/models/{model_id:path}`), else "other"."""
    path = request.url.path
    for regex, template in _state(request).templates:
        if regex.match(path):
            return template
    return "other"


async def _guard(request: Request, call_next):
    """Body-size limit (declared length; the routes also count what arrives) and API key before any route
    runs; counts every response by route template and status."""
    state = _state(request)
    try:
        size = int(request.headers.get("content-length") or 0)
    except ValueError:
        size = 0
    if size > state.max_body_bytes:
        resp = error_response(413, f"request body of {size} bytes exceeds the limit of "
                                   f"{state.max_body_bytes} bytes", code="request_too_large")
    elif state.api_key and _protected(request.url.path) and not _authorized(request, state.api_key):
        resp = error_response(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                              "authentication_error", code="invalid_api_key")
    else:
        try:
            resp = await call_next(request)
        except Exception as e:  # noqa: BLE001 - counted and logged like any other response
            resp = await _internal_error(request, e)
    state.metrics.observe_response(route_template(request), request.method, resp.status_code)
    return resp


def _protected(path: str) -> bool:
    return path.startswith("/v1/") or path == "/tokenize"


def _authorized(request: Request, key: str) -> bool:
    given = request.headers.get("authorization", "")
    token = given[7:].strip() if given.lower().startswith("bearer ") else ""
    return hmac.compare_digest(token.encode(), key.encode())


async def _api_error(request: Request, e: APIError):
    return error_response(e.status, e.message, e.type, e.param, e.code)


async def _validation_error(request: Request, e: RequestValidationError):
    err = validation_error(e.errors())
    return error_response(err.status, err.message, err.type, err.param, err.code)


async def _http_error(request: Request, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(e.status_code, str(e.detail), kind)


async def _internal_error(request: Request, e: Exception):
    # The client learns only that it failed; the details (which may hold request data or paths) go to the log.
    log.error("internal error on %s %s", request.method, route_template(request), exc_info=e)
    return error_response(500, "internal server error", "server_error", code="internal_error")


# ----------------------------------------------------------------------------- plain routes
routes = APIRouter()


@routes.get("/health")
async def health(request: Request):
    state = _state(request)
    ok = state.engine.running
    body = {"status": "ok" if ok else "stopped", "model": state.model_name,
            "queue_depth": state.engine.queue_depth(), "batch_size": state.engine.batch_size(),
            "free_slots": state.engine.free_slots()}
    return JSONResponse(body, status_code=200 if ok else 503)


@routes.get("/metrics")
async def metrics(request: Request):
    return Response(_state(request).metrics.text(), media_type=CONTENT_TYPE)


@routes.get("/v1/models")
async def models(request: Request):
    state = _state(request)
    card = ModelCard(id=state.model_name, created=state.created, max_model_len=state.engine.max_len)
    return ModelList(data=[card]).model_dump()


@routes.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    state = _state(request)
    state.check_model(model_id)
    return ModelCard(id=state.model_name, created=state.created, max_model_len=state.engine.max_len).model_dump()


@routes.post("/tokenize")
async def tokenize(request: Request):
    """Token count of a chat or prompt and the room it leaves (vLLM's /tokenize shape, plus `room`)."""
    state = _state(request)
    body = await state.blocking(parse, await read_body(request, state.max_body_bytes), TokenizeRequest)
    if body.model is not None:
        state.check_model(body.model)

    def count() -> list[int]:
        if body.prompt is not None:
            return state.tokenizer.encode(body.prompt)
        try:
            return state.tokenizer.chat_prompt(chat.template_messages(body))[0]
        except TextError as e:
            raise APIError(400, str(e), param=e.param or "messages") from None

    ids = await state.blocking(count)
    n = state.engine.capacity
    return {"count": len(ids), "max_model_len": n, "room": max(n - len(ids), 0), "tokens": ids}


@routes.get("/")
async def index():
    return FileResponse(STATIC / "index.html")
