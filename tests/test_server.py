"""The OpenAI-compatible server as a real process on loopback, driven by the real `openai` client (and by
raw httpx for what a well-behaved client cannot send: malformed JSON, missing keys, huge bodies)."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from conftest import CHAT_ANSWER, CHAT_REASONING, SERVER_API_KEY, require_module

openai = require_module("openai", "pip install openai (in the [dev] extra)")
MODEL = "nanoseek-tiny"
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=chat_server + "/v1", api_key=SERVER_API_KEY, max_retries=0, timeout=60)


def auth() -> dict:
    return {"Authorization": f"Bearer {SERVER_API_KEY}"}


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_models_health_metrics_and_page(client, chat_server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(chat_server + "/health").json()["status"] == "ok"
    text = httpx.get(chat_server + "/metrics").text
    for name in ("nanoseek_queue_depth", "nanoseek_batch_size", "nanoseek_generated_tokens_total",
                 "nanoseek_generation_tokens_per_second", "nanoseek_http_requests_total"):
        assert f"# TYPE {name} " in text
    page = httpx.get(chat_server + "/")
    assert page.status_code == 200 and "<script src=\"/static/app.js\">" in page.text


def test_chat_reasoning_split_usage_and_determinism(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0)
    msg = r.choices[0].message
    assert msg.content == CHAT_ANSWER
    assert msg.model_extra["reasoning_content"].strip() == CHAT_REASONING
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 < u.completion_tokens_details.reasoning_tokens < u.completion_tokens
    again = client.chat.completions.create(model=MODEL, messages=HI, temperature=0)
    assert again.choices[0].message.content == msg.content
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], temperature=1.0,
              max_tokens=20, seed=42)
    assert client.chat.completions.create(**kw).choices[0].message == client.chat.completions.create(**kw).choices[0].message


def test_stop_sequences_apply_to_the_answer_only(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, stop=["world", "greet"])
    assert r.choices[0].message.content == "Hello **"
    assert r.choices[0].message.model_extra["reasoning_content"].strip() == CHAT_REASONING  # not cut at "greet"
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_streaming_schema(client, chat_server):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens_details.reasoning_tokens > 0
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0] is chunks[-2] and finals[0].choices[0].finish_reason == "stop"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert content == CHAT_ANSWER and reasoning.strip() == CHAT_REASONING
    plain = list(client.chat.completions.create(model=MODEL, messages=HI, temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "stop"
    # the raw wire format: SSE data lines, ending with [DONE]
    body = {"model": MODEL, "messages": HI, "temperature": 0, "stream": True, "max_tokens": 4}
    with httpx.stream("POST", chat_server + "/v1/chat/completions", json=body, headers=auth()) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_completions_endpoint(client):
    r = client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 5
    r2 = client.completions.create(model=MODEL, prompt=[0, 5, 6, 7], max_tokens=6, temperature=0.8, n=2, seed=1,
                                   extra_body={"ignore_eos": True})
    assert [c.index for c in r2.choices] == [0, 1] and r2.usage.completion_tokens == 12
    streamed = list(client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=5,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_prompt_cache_usage_deepseek_and_openai_fields(client):
    """A repeated system prompt is read from the prefix cache (the server runs with --block-size 16): usage
    says so as DeepSeek does (prompt_cache_hit/miss_tokens) and as OpenAI does (prompt_tokens_details)."""
    system = {"role": "system", "content": "You answer briefly and kindly. The quick brown fox. " * 6}

    def usage_of(u):
        extra = u.model_extra
        hit, miss = extra["prompt_cache_hit_tokens"], extra["prompt_cache_miss_tokens"]
        assert hit + miss == u.prompt_tokens and u.prompt_tokens_details.cached_tokens == hit
        return hit

    first = client.chat.completions.create(model=MODEL, messages=[system, *HI], temperature=0, max_tokens=4)
    assert usage_of(first.usage) == 0  # nothing cached yet
    second = client.chat.completions.create(model=MODEL, messages=[system, {"role": "user", "content": "Hello"}],
                                            temperature=0, max_tokens=4)
    hit = usage_of(second.usage)
    assert hit >= 64 and hit % 16 == 0 and hit < second.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=[system, *HI], temperature=0, max_tokens=4,
                                                 stream=True, stream_options={"include_usage": True}))
    assert usage_of(chunks[-1].usage) >= hit  # the streamed final usage chunk, the whole prompt cached but its end
    prompt = list(range(3, 60))
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert usage_of(plain.usage) == 0
    again = list(client.completions.create(model=MODEL, prompt=prompt + [7], max_tokens=2, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    assert usage_of(again[-1].usage) == 48 and usage_of(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0).usage) == 48


BAD_BODIES = [
    ({"messages": HI}, "model"),
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": "hi"}, "messages"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"model": MODEL, "messages": [{"content": "hi"}]}, "messages"),
    ({"model": MODEL, "messages": HI, "temperature": 5}, "temperature"),
    ({"model": MODEL, "messages": HI, "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "messages": HI, "top_p": 0}, "top_p"),
    ({"model": MODEL, "messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": HI, "max_tokens": 100000}, "max_tokens"),
    ({"model": MODEL, "messages": HI, "n": 100}, "n"),
    ({"model": MODEL, "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": MODEL, "messages": HI, "seed": -1}, "seed"),
    ({"model": MODEL, "messages": HI, "stream": "yes"}, "stream"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 2000}]}, None),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_bad_requests_are_400(chat_server, body, param):
    r = httpx.post(chat_server + "/v1/chat/completions", json=body, headers=auth())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param:
        assert err["param"].split(".")[0] == param


def test_malformed_and_oversized_bodies(chat_server):
    url = chat_server + "/v1/chat/completions"
    for raw in (b"{not json", b"[1, 2]", b"", "{\"model\": \"\xff\"}".encode("latin-1")):
        r = httpx.post(url, content=raw, headers={**auth(), "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    r = httpx.post(chat_server + "/v1/completions", json={"model": MODEL, "prompt": [10**9]}, headers=auth())
    assert r.status_code == 400 and "out of range" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"x" * (5 << 20), headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(chat_server + "/v1/nothing", headers=auth())
    assert r.status_code == 404 and "error" in r.json()


def test_errors_through_the_openai_client(client, chat_server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=HI)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HI, temperature=3.5)
    for key in ("wrong-key", ""):
        bad = openai.OpenAI(base_url=chat_server + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert httpx.get(chat_server + "/v1/models").status_code == 401


def test_tokenize_counts_what_a_chat_completion_sends(client, chat_server):
    """POST /tokenize (vLLM's shape) counts a chat as the chat completion renders it, and says the room
    the context leaves; the web chat caps max_tokens with it."""
    messages = [{"role": "system", "content": "Be brief."}, *HI, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Tell me a story"}]
    r = httpx.post(chat_server + "/tokenize", json={"model": MODEL, "messages": messages}, headers=auth())
    assert r.status_code == 200, r.text
    j = r.json()
    usage = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage
    assert j["count"] == usage.prompt_tokens == len(j["tokens"])
    assert j["max_model_len"] == 1024 == client.models.list().data[0].model_extra["max_model_len"]
    assert j["room"] == 1024 - j["count"]
    p = httpx.post(chat_server + "/tokenize", json={"prompt": "Hello"}, headers=auth()).json()
    assert p["count"] == len(p["tokens"]) == client.completions.create(model=MODEL, prompt="Hello",
                                                                       max_tokens=1).usage.prompt_tokens > 0
    full = httpx.post(chat_server + "/tokenize", json={"prompt": "word " * 2000}, headers=auth()).json()
    assert full["count"] > 1024 and full["room"] == 0
    for body, status in (({"prompt": "a", "messages": HI}, 400), ({}, 400), ({"model": "gpt-4", "prompt": "a"}, 404),
                         ({"messages": [{"role": "wizard", "content": "a"}]}, 400)):
        r = httpx.post(chat_server + "/tokenize", json=body, headers=auth())
        assert r.status_code == status and "message" in r.json()["error"], (body, r.text)
    assert httpx.post(chat_server + "/tokenize", json={"prompt": "a"}).status_code == 401  # behind the key too


def test_concurrent_requests_match_sequential(client):
    prompts = [[{"role": "user", "content": q}] for q in ("Hi", "Tell me", "Say hello", "Why?", "Ok", "Hello")]
    sequential = [client.chat.completions.create(model=MODEL, messages=m, temperature=0, max_tokens=24)
                  .choices[0].message.content for m in prompts]
    results: dict[int, object] = {}

    def worker(i: int) -> None:
        try:
            results[i] = client.chat.completions.create(model=MODEL, messages=prompts[i], temperature=0,
                                                        max_tokens=24).choices[0].message.content
        except Exception as e:  # reported by the assert below
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == sequential


def test_queue_full_is_429(chat_server):
    import asyncio

    async def flood() -> list[int]:
        body = {"model": MODEL, "prompt": "the quick", "max_tokens": 300, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=120) as c:
            rs = await asyncio.gather(*[c.post(chat_server + "/v1/completions", json=body, headers=auth())
                                        for _ in range(16)])
        for r in rs:
            if r.status_code == 429:
                assert r.json()["error"]["type"] == "rate_limit_error"
        return [r.status_code for r in rs]

    codes = asyncio.run(flood())
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes  # 4 slots + 4 queued


def test_disconnect_mid_stream_frees_the_slot(chat_server):
    cancelled = metric(chat_server, "nanoseek_engine_requests_cancelled_total")
    body = {"model": MODEL, "messages": HI, "stream": True, "max_tokens": 480, "ignore_eos": True}
    with httpx.stream("POST", chat_server + "/v1/chat/completions", json=body, headers=auth()) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i > 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.time() + 10
    while metric(chat_server, "nanoseek_engine_requests_cancelled_total") <= cancelled:
        assert time.time() < deadline, "the engine never cancelled the abandoned request"
        time.sleep(0.05)
    assert metric(chat_server, "nanoseek_batch_size") == 0
