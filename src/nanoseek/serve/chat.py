"""POST /v1/chat/completions: messages (text parts, tool results, a prefix to continue), the thinking switch,
JSON output (`response_format`), function calling (`tools`, `tool_choice`), logprobs, streamed or not.

`chat_plan` (on a worker thread) renders and tokenises the chat and compiles the constraint:
- thinking on (the default) opens `<think>` at the generation prompt; the grammar of `response_format` or
  of a forced tool call then starts after `</think>` (its token is the matcher's trigger), so the model
  reasons freely and only the answer is constrained. Thinking off (`thinking: {"type": "disabled"}` or
  `chat_template_kwargs: {"thinking": false}`) constrains from the first token.
- `tool_choice`: "auto" parses tool-call markup out of the answer; "required" or a named function
  constrains the answer to calls of those functions with arguments matching their schemas
  (nanoseek.infer.tools.tool_call_grammar); "none" keeps the tools in the prompt but bans the tokens that
  open a call, so the model answers in text.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from nanoseek.infer.grammar import GrammarError, Matcher, response_format_grammar
from nanoseek.infer.text import TextError
from nanoseek.infer.tools import resolve_tool_choice, tool_call_grammar, validate_tools
from nanoseek.serve.generation import (APIError, Plan, chat_logprobs, merged, read_request, run_to_end, sse,
                                       start, usage)
from nanoseek.serve.protocol import ChatCompletionRequest, new_id, now

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state, body, started = await read_request(request, ChatCompletionRequest)
    _early_length_check(state, body)
    plan = await state.blocking(chat_plan, state, body)
    choices = start(state, plan, body)
    if body.stream:
        return sse(_stream(state, body, choices, len(plan.prompt), started), choices)
    await run_to_end(request, choices, state.metrics, started)
    state.metrics.finished(time.perf_counter() - started)
    out = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": state.model_name,
           "choices": [{"index": c.index, "finish_reason": c.finish_reason, "message": _message(c),
                        "logprobs": chat_logprobs(state.tokenizer, c.logprobs) if body.logprobs else None}
                       for c in choices],
           "usage": usage(len(plan.prompt), choices)}
    return JSONResponse(out)


def _early_length_check(state, body: ChatCompletionRequest) -> None:
    """Refuse a chat that cannot fit before rendering or tokenising it: characters / the longest token's
    byte length is a lower bound on its token count."""
    chars = sum(len(m.text()) for m in body.messages)
    if chars // state.tokenizer.max_token_bytes > state.engine.max_len:
        raise APIError(400, f"the messages hold {chars} characters, at least "
                            f"{chars // state.tokenizer.max_token_bytes} tokens, more than the context of "
                            f"{state.engine.max_len} tokens allows", param="messages", code="context_length_exceeded")


def template_messages(body: ChatCompletionRequest) -> list[dict]:
    out = []
    for m in body.messages:
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.role == "assistant" and m.content is None:
            d["content"] = ""
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": c.function.arguments}}
                               for c in m.tool_calls]
        if m.prefix:
            d["prefix"] = True
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def chat_plan(state, body: ChatCompletionRequest) -> Plan:
    """Render and tokenise the chat and build its constraint (a worker thread runs this)."""
    tok = state.tokenizer
    try:
        thinking = tok.thinking(body.thinking.model_dump() if body.thinking else None, body.chat_template_kwargs)
        functions = validate_tools(body.tools)
        mode, allowed = resolve_tool_choice(body.tool_choice, functions)
        grammar = response_format_grammar(body.response_format)
    except (TextError, GrammarError) as e:  # ToolError is a GrammarError
        raise APIError(400, str(e), param=e.param) from None
    if grammar is not None and functions and mode != "none":
        raise APIError(400, "response_format cannot be combined with tools unless tool_choice is \"none\"",
                       param="response_format")
    try:
        prompt, think_opened = tok.chat_prompt(template_messages(body), body.tools if functions else None, thinking)
    except TextError as e:
        raise APIError(400, str(e), param=e.param or "messages") from None
    plan = Plan(prompt, think_opened=think_opened)
    if mode != "none":
        plan.tool_names = [f.name for f in functions]
        plan.first_only = mode == "auto" and not body.parallel_tool_calls
    elif functions:  # the tools stay in the prompt, but no call may start
        plan.bias = {i: -100.0 for i in tok.call_opening_ids}
    try:
        if mode == "required":
            gtok = tok.grammar_tokenizer(state.engine.config.vocab_size)
            grammar = tool_call_grammar(allowed, gtok, parallel=body.parallel_tool_calls)
        elif grammar is not None:
            gtok = tok.grammar_tokenizer(state.engine.config.vocab_size)
            grammar = gtok.compile(grammar)
    except GrammarError as e:
        raise APIError(400, str(e), param=e.param) from None
    except ValueError as e:  # a tokenizer the grammar engine cannot read
        raise APIError(400, f"structured output is not available for this model: {e}",
                       param="tools" if mode == "required" else "response_format") from None
    if grammar is not None:
        trigger = []
        if think_opened:
            if tok.end_think_id is None:
                raise APIError(400, "this model's tokenizer has no </think> token, so a constrained answer cannot "
                                    "follow its reasoning: turn thinking off (thinking: {\"type\": \"disabled\"})",
                               param="thinking")
            trigger = [tok.end_think_id]
        plan.make_matcher = lambda: Matcher(gtok, grammar, trigger_ids=trigger)
    return plan


def _message(c) -> dict:
    content, calls = c.tool_result()
    msg = {"role": "assistant", "content": content if content or not calls else None,
           "reasoning_content": c.text.reasoning or None}
    if calls:
        msg["tool_calls"] = calls
    return msg


async def _stream(state, body: ChatCompletionRequest, choices, prompt_tokens: int, started: float):
    cid, created = new_id("chatcmpl"), now()
    usage_field = {"usage": None} if body.include_usage else {}
    pending: dict[int, list] = {c.index: [] for c in choices}  # logprob rows not yet sent with a chunk

    def chunk(c, delta: dict, finish: str | None = None) -> dict:
        lp = None
        if body.logprobs and (pending[c.index] or finish):
            lp, pending[c.index] = chat_logprobs(state.tokenizer, pending[c.index]), []
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                "choices": [{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish}],
                **usage_field}

    try:
        for c in choices:
            yield chunk(c, {"role": "assistant", "content": ""})
        async for c, piece in merged(choices, state.metrics, started):
            if piece is None:
                yield chunk(c, {}, c.finish_reason)
                continue
            pending[c.index] += piece.tokens
            if piece.reasoning:
                yield chunk(c, {"reasoning_content": piece.reasoning})
            if piece.content:
                yield chunk(c, {"content": piece.content})
            if piece.tool_calls:
                yield chunk(c, {"tool_calls": piece.tool_calls})
        if body.include_usage:
            yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                   "choices": [], "usage": usage(prompt_tokens, choices)}
    finally:
        state.metrics.finished(time.perf_counter() - started)
