"""What every generating route shares: reading and validating a request body safely, submitting engine
requests (one per choice), turning their token events into text / tool-call / logprob pieces, running
them to the end or streaming them as SSE, and usage.

Bodies are read chunk by chunk and refused (413) as soon as they pass the limit, whether or not the
client sent a Content-Length (chunked uploads included), so a huge body is never held in memory.
Validation, chat rendering and tokenising run on the server's worker threads (`ServerState.blocking`),
never on the event loop that serves every other client.

Each engine request reports tokens through a callback on the engine thread, which copies what it needs
(the tokens and, when asked for, their log-probabilities) and hops onto the event loop
(`call_soon_threadsafe`). A request whose client disconnects, or whose stop string matched, is cancelled,
so its cache slot is freed before the next decode step.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from nanoseek.infer.engine import EngineError, QueueFull
from nanoseek.infer.sampling import SamplingError, SamplingParams
from nanoseek.infer.text import TextStream
from nanoseek.infer.tools import ToolCallParser


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# ----------------------------------------------------------------------------- bodies
async def read_body(request: Request, limit: int) -> bytes:
    """The body, counted while it arrives: 413 as soon as it passes `limit` bytes (chunked bodies too)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_request(request: Request, model: type[BaseModel]):
    """(server state, validated body, arrival time) of a generating request: the body read under the size
    limit, parsed on a worker thread, and its model checked."""
    state = request.app.state.nanoseek
    started = time.perf_counter()
    raw = await read_body(request, state.max_body_bytes)
    body = await state.blocking(parse, raw, model)
    state.check_model(body.model)
    return state, body, started


def validation_error(errors: list) -> APIError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # Union members show up in the location ("str", "list[TextPart]"): not fields the client wrote.
    loc = [x for x in loc if not (x[:1].islower() and ("[" in x or x in ("str", "int", "float", "bool")))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unsupported parameter {param!r}: this server does not implement it "
                             "(docs/serving.md lists what is supported)", param=param, code="unsupported_parameter")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def parse(raw: bytes, model: type[BaseModel]):
    """A validated request model from a JSON body (runs on a worker thread: large bodies take a while)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(raw)  # JSON mode: an integer counts as a float, nothing else converts
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None
    except RecursionError:
        raise APIError(400, "the request nests JSON too deeply", code="invalid_json") from None


# ----------------------------------------------------------------------------- running choices
@dataclass
class Piece:
    """What one engine event adds to a choice: text, tool-call deltas, and (token id, logprob, tops) rows."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    tokens: list[tuple[int, float, list]] = field(default_factory=list)


@dataclass
class Choice:
    """One running engine request and the text made from its tokens."""
    index: int
    req: object
    queue: asyncio.Queue
    text: TextStream
    tools: ToolCallParser | None = None
    first_only: bool = False  # parallel_tool_calls false in auto mode: only the first call counts
    finish_reason: str | None = None
    logprobs: list[tuple[int, float, list]] = field(default_factory=list)

    def tool_result(self) -> tuple[str, list[dict]]:
        if self.tools is None:
            return self.text.content, []
        content, calls = self.tools.result()
        return content, calls[:1] if self.first_only else calls


@dataclass
class Plan:
    """How to run one prompt: the engine request's settings beyond the body's sampling fields."""
    prompt: list[int]
    think_opened: bool = False
    split: bool = True  # reasoning / answer split (chat) or raw text (completions)
    make_matcher: Callable[[], object] | None = None  # a fresh grammar matcher per choice
    tool_names: list[str] | None = None  # parse tool calls (auto / required / named)
    first_only: bool = False
    bias: dict[int, float] = field(default_factory=dict)


def start(state, plan: Plan, body, index_base: int = 0) -> list[Choice]:
    """Submit body.n engine requests for one prompt; 400 / 429 / 503 on what the engine refuses."""
    engine = state.engine
    if not engine.running:
        raise APIError(503, "the engine is not running", "service_unavailable", code="engine_stopped")
    prompt = plan.prompt
    # The context, or less when the whole paged cache holds fewer tokens (Engine.capacity).
    room = engine.capacity - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt has {len(prompt)} tokens, more than the context of {engine.capacity} "
                            "tokens allows", param="messages", code="context_length_exceeded")
    limit = body.token_limit
    if limit is not None and limit > room:
        raise APIError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({limit}) exceeds the context of "
                            f"{engine.capacity} tokens", param="max_tokens", code="context_length_exceeded")
    if isinstance(body.logprobs, bool):  # chat: logprobs true/false, top_logprobs 0-20
        want_lp, top = body.logprobs, body.top_logprobs or 0
    else:  # completions: logprobs = how many alternatives (0-5), None for none
        want_lp, top = body.logprobs is not None, body.logprobs or 0
    loop = asyncio.get_running_loop()
    choices: list[Choice] = []
    try:
        for i in range(body.n):
            params = SamplingParams(max_tokens=limit or room, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, seed=None if body.seed is None else body.seed + i,
                                    stop_token_ids=[] if body.ignore_eos else list(state.tokenizer.eos_ids),
                                    logprobs=want_lp, top_logprobs=top, presence_penalty=body.presence_penalty,
                                    frequency_penalty=body.frequency_penalty, logit_bias={**plan.bias, **body.bias})
            queue: asyncio.Queue = asyncio.Queue()

            def on_event(req, tokens, finished, q=queue, lp=want_lp):
                n = len(tokens)
                rows = [(t, req.logprobs[-n + k], req.top_logprobs[-n + k] if req.params.top_logprobs else [])
                        for k, t in enumerate(tokens)] if lp and n else [(t, 0.0, []) for t in tokens]
                loop.call_soon_threadsafe(q.put_nowait, (rows, finished))

            matcher = plan.make_matcher() if plan.make_matcher else None
            req = engine.submit(prompt, params, on_event, matcher=matcher)
            parser = ToolCallParser(plan.tool_names) if plan.tool_names is not None else None
            choices.append(Choice(index_base + i, req, queue, state.tokenizer.stream(plan.think_opened, body.stop,
                                                                                     plan.split),
                                  parser, plan.first_only))
    except QueueFull as e:
        cancel(choices)
        raise APIError(429, f"{e}; retry later", "rate_limit_error", code="queue_full") from None
    except (EngineError, SamplingError) as e:
        cancel(choices)
        raise APIError(400, str(e), code="invalid_value") from None
    return choices


def cancel(choices: list[Choice]) -> None:
    for c in choices:
        c.req.cancel()


async def events(c: Choice, metrics=None, started: float | None = None) -> AsyncIterator[Piece]:
    """The pieces of one choice until it ends; sets c.finish_reason."""
    last = None
    try:
        while True:
            rows, finished = await c.queue.get()
            if rows and metrics is not None:
                t = time.perf_counter()
                if last is None:
                    metrics.first_token(t - (started or t))
                else:
                    metrics.inter_token((t - last) / len(rows), len(rows))
                last = t
            d = c.text.feed([r[0] for r in rows], final=finished)
            piece = Piece(d.reasoning, d.content, tokens=rows)
            if c.tools is not None:
                td = c.tools.feed(d.content)
                if finished or d.stopped:
                    end = c.tools.finish()
                    td.content += end.content
                    td.tool_calls += end.tool_calls
                piece.content = td.content
                piece.tool_calls = [tc for tc in td.tool_calls if not (c.first_only and tc["index"] > 0)]
            c.logprobs += rows
            if piece.reasoning or piece.content or piece.tool_calls or piece.tokens:
                yield piece
            if d.stopped or finished:
                reason = "stop" if d.stopped else c.req.finish_reason
                c.finish_reason = reason if reason in ("length", "error") else "stop"
                if c.finish_reason == "stop" and c.tool_result()[1]:
                    c.finish_reason = "tool_calls"
                return
    finally:
        c.req.cancel()  # a no-op when finished; frees the slot at once after a stop string or a disconnect


async def merged(choices: list[Choice], metrics=None, started: float | None = None
                 ) -> AsyncIterator[tuple[Choice, Piece | None]]:
    """Pieces of all choices interleaved as they come: (choice, piece), and (choice, None) when it ends."""
    out: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            async for p in events(c, metrics, started):
                await out.put((c, p))
        finally:
            await out.put((c, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        for _ in range(len(choices)):
            while True:
                item = await out.get()
                yield item
                if item[1] is None:
                    break
    finally:
        for t in tasks:
            t.cancel()
        cancel(choices)


async def run_to_end(request: Request, choices: list[Choice], metrics=None, started: float | None = None) -> None:
    async def watch() -> None:
        while True:
            await asyncio.sleep(0.2)
            if await request.is_disconnected():
                cancel(choices)
                return

    watcher = asyncio.create_task(watch())
    try:
        async for _ in merged(choices, metrics, started):
            pass
    finally:
        watcher.cancel()


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    """OpenAI's usage, with DeepSeek's context-caching fields (requests report `cached_tokens` when the
    engine's cache reused part of the prompt; 0 otherwise)."""
    completion = sum(len(c.text.ids) for c in choices)
    cached = max((int(getattr(c.req, "cached_tokens", 0) or 0) for c in choices), default=0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt_tokens - cached,
            "completion_tokens_details": {"reasoning_tokens": sum(c.text.reasoning_tokens for c in choices)}}


def sse(gen: AsyncIterator[dict], choices: list[Choice], on_close: Callable[[], None] | None = None
        ) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in gen:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            cancel(choices)  # the client went away (the generator is closed) or we finished
            if on_close is not None:
                on_close()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ----------------------------------------------------------------------------- logprobs in OpenAI's shapes
def chat_logprobs(tokenizer, rows: list[tuple[int, float, list]]) -> dict:
    """`choices[i].logprobs` of a chat completion (or of one stream chunk)."""
    def entry(t: int, lp: float) -> dict:
        text, b = tokenizer.token_text(t)
        return {"token": text, "logprob": lp, "bytes": b}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in tops]} for t, lp, tops in rows],
            "refusal": None}


def completion_logprobs(tokenizer, rows: list[tuple[int, float, list]], offset: int = 0) -> dict:
    """`choices[i].logprobs` of a text completion: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets, pos = [], [], offset
    for t, _, _ in rows:
        text = tokenizer.token_text(t)[0]
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
    tops = [{tokenizer.token_text(i)[0]: v for i, v in top} for _, _, top in rows]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in rows], "top_logprobs": tops,
            "text_offset": offsets}
