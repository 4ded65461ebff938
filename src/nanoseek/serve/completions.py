"""POST /v1/completions: raw text completion of one prompt or a list of prompts (strings or token ids),
echo, logprobs, and fill in the middle (FIM) with `suffix`, streamed or not.

A string prompt is encoded as it is, special-token strings included (a raw completion's client writes the
whole prompt, markup and all); token-id prompts go to the engine unchanged. With a list of P prompts and
n choices each, choice `index` is `prompt_index * n + j`, as OpenAI numbers them.

FIM renders the model's own fill-in-the-middle tokens in prefix-suffix-middle order, prompt and suffix as
plain text (special-token strings in them stay text), and the completion is the middle:
    DeepSeek (V3, Coder):   <bos><｜fim▁begin｜>PROMPT<｜fim▁hole｜>SUFFIX<｜fim▁end｜>
    StarCoder / Qwen style: <bos><fim_prefix>PROMPT<fim_suffix>SUFFIX<fim_middle>   (or <|fim_prefix|> ...)
A tokenizer with neither set (the small models nanoseek trains have none) answers 400 naming `suffix`.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from nanoseek.serve.generation import (APIError, Plan, cancel, completion_logprobs, merged, read_request,
                                       run_to_end, sse, start, usage)
from nanoseek.serve.protocol import CompletionRequest, new_id, now

router = APIRouter()

# (prefix, hole/suffix, middle) tokens, in the order they are looked for.
FIM_TOKENS = [("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
              ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
              ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")]


@router.post("/v1/completions")
async def completions(request: Request):
    state, body, started = await read_request(request, CompletionRequest)
    for p in body.prompts:
        text = p if isinstance(p, str) else ""
        if (len(text) + len(body.suffix or "")) // state.tokenizer.max_token_bytes > state.engine.max_len:
            raise APIError(400, f"a prompt of {len(text)} characters is longer than the context of "
                                f"{state.engine.max_len} tokens allows", param="prompt", code="context_length_exceeded")
    plans = await state.blocking(completion_plans, state, body)
    choices = []
    try:
        for k, plan in enumerate(plans):
            choices += start(state, plan, body, index_base=k * body.n)
    except APIError:
        cancel(choices)
        raise
    echoes = {c.index: (state.tokenizer.decode(plans[c.index // body.n].prompt) if body.echo else "")
              for c in choices}
    prompt_tokens = sum(len(p.prompt) for p in plans)
    if body.stream:
        return sse(_stream(state, body, choices, prompt_tokens, echoes, started), choices)
    await run_to_end(request, choices, state.metrics, started)
    state.metrics.finished(time.perf_counter() - started)
    out = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": state.model_name,
           "choices": [{"index": c.index, "text": echoes[c.index] + c.text.content, "finish_reason": c.finish_reason,
                        "logprobs": completion_logprobs(state.tokenizer, c.logprobs) if body.logprobs is not None
                        else None} for c in choices],
           "usage": usage(prompt_tokens, choices)}
    return JSONResponse(out)


def fim_prompt(tokenizer, prefix: str, suffix: str) -> list[int]:
    """Prefix-suffix-middle ids with the model's FIM tokens (the module docstring shows the layouts)."""
    hf = tokenizer.tok.hf
    for names in FIM_TOKENS:
        ids = [hf.token_to_id(t) for t in names]
        if all(i is not None for i in ids):
            bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
            return (bos + [ids[0]] + tokenizer.encode_plain(prefix) + [ids[1]] + tokenizer.encode_plain(suffix)
                    + [ids[2]])
    raise APIError(400, "this model's tokenizer has no fill-in-the-middle tokens (<｜fim▁begin｜>, <｜fim▁hole｜>, "
                        "<｜fim▁end｜> or <|fim_prefix|>, ...), so suffix is not supported", param="suffix")


def completion_plans(state, body: CompletionRequest) -> list[Plan]:
    """One plan per prompt (a worker thread runs this: tokenising can take a while)."""
    plans = []
    for p in body.prompts:
        if body.suffix is not None:
            if not isinstance(p, str):
                raise APIError(400, "suffix needs a text prompt, not token ids", param="suffix")
            ids = fim_prompt(state.tokenizer, p, body.suffix)
        else:
            ids = p if isinstance(p, list) else state.tokenizer.encode(p)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        plans.append(Plan(list(ids), split=False, bias=body.bias))
    return plans


async def _stream(state, body: CompletionRequest, choices, prompt_tokens: int, echoes: dict, started: float):
    cid, created = new_id("cmpl"), now()
    usage_field = {"usage": None} if body.include_usage else {}
    offsets = {c.index: len(echoes[c.index]) for c in choices}

    def chunk(c, text: str, rows: list, finish: str | None = None) -> dict:
        lp = None
        if body.logprobs is not None:
            lp = completion_logprobs(state.tokenizer, rows, offsets[c.index])
            offsets[c.index] += sum(len(t) for t in lp["tokens"])
        return {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": [{"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}],
                **usage_field}

    try:
        for c in choices:
            if echoes[c.index]:
                yield chunk(c, echoes[c.index], [])
        async for c, piece in merged(choices, state.metrics, started):
            if piece is None:
                yield chunk(c, "", [], c.finish_reason)
            else:
                yield chunk(c, piece.content, piece.tokens)
        if body.include_usage:
            yield {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                   "choices": [], "usage": usage(prompt_tokens, choices)}
    finally:
        state.metrics.finished(time.perf_counter() - started)
