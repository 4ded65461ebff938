"""The DeepSeek / OpenAI API features of `nanoseek serve`, through the real `openai` client against a real
server process (the session's `chat_server`): JSON output, tool calls (required, named, none; streamed
deltas; tool results sent back), thinking on/off, n, logprobs, penalties, logit_bias, prefix completion,
prompt lists, text parts, and the hostile inputs (unsupported parameters, images, deep JSON, chunked and
huge bodies, route-template metric labels)."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from conftest import CHAT_ANSWER, CHAT_REASONING, SERVER_API_KEY, require_module

openai = require_module("openai", "pip install openai (in the [dev] extra)")
jsonschema = require_module("jsonschema", "pip install jsonschema (in the [dev] extra)")
MODEL = "nanoseek-tiny"
HI = [{"role": "user", "content": "Hi"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}, "required": ["zone"]}}}
OFF = {"thinking": {"type": "disabled"}}


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=chat_server + "/v1", api_key=SERVER_API_KEY, max_retries=0, timeout=120)


def auth() -> dict:
    return {"Authorization": f"Bearer {SERVER_API_KEY}"}


def person_format(strict=True):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


# ----------------------------------------------------------------------------- JSON output
def test_json_schema_after_the_reasoning(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=100,
                                       response_format=person_format())
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"].strip() == CHAT_REASONING  # thinking stays free
    jsonschema.validate(json.loads(msg.content), PERSON)
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_object_and_schema_with_thinking_off(client, temperature):
    for fmt, schema in (({"type": "json_object"}, {"type": "object"}), (person_format(), PERSON)):
        r = client.chat.completions.create(model=MODEL, messages=HI, temperature=temperature, seed=3, max_tokens=100,
                                           response_format=fmt, extra_body=OFF, n=2)
        for c in r.choices:
            assert c.message.model_extra.get("reasoning_content") is None
            jsonschema.validate(json.loads(c.message.content), schema)


def test_json_streamed(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=100,
                                                 response_format=person_format(), stream=True, extra_body=OFF))
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), PERSON)


# ----------------------------------------------------------------------------- tools
def test_required_tool_call(client):
    # One call (parallel_tool_calls=False) with bounded strings: the grammar ends the reply whatever this tiny
    # model prefers (with parallel calls allowed, it may keep calling until max_tokens on some CPUs).
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       temperature=0, max_tokens=120, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False, extra_body=OFF)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    for call in c.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
    # the reply sent back as the client library dumps it, with the tool's result: accepted and rendered
    history = [{"role": "user", "content": "Weather in Paris?"}, c.message.model_dump(exclude_none=True),
               *[{"role": "tool", "tool_call_id": t.id, "content": '{"ok": true}'} for t in c.message.tool_calls]]
    again = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME], max_tokens=4)
    assert again.usage.prompt_tokens > r.usage.prompt_tokens


def test_named_tool_call_streamed_equals_plain(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Time?"}], temperature=0, max_tokens=120,
              tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
              parallel_tool_calls=False, extra_body=OFF)
    plain = client.chat.completions.create(**kw).choices[0]
    assert [t.function.name for t in plain.message.tool_calls] == ["get_time"]
    jsonschema.validate(json.loads(plain.message.tool_calls[0].function.arguments), TIME["function"]["parameters"])
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_time" and deltas[0].index == 0
    assert "".join(d.function.arguments or "" for d in deltas) == plain.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_tool_results(client, chat_model_dir):
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=60, tools=[WEATHER],
                                       tool_choice="none")
    # No call is parsed and none is reported. (Whether the reply ends within 60 tokens is the model's affair:
    # it never saw tools in its prompt, so "length" is a fair ending too.)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    # a tool result sent back: the prompt is rendered with the call and its result, no error
    from nanoseek.infer.text import ChatTokenizer

    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": '{"city": "Paris", "unit": "C"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=8)
    tok = ChatTokenizer(chat_model_dir)
    ids, _ = tok.chat_prompt([{**m, "content": m["content"] or ""} for m in history], [WEATHER])
    assert r.usage.prompt_tokens == len(ids)
    assert tok.decode(ids).endswith("<｜tool▁output▁begin｜>{\"temp\": 21}<｜tool▁output▁end｜>")


def test_bad_tools_are_400(client):
    for kw, param in ((dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools"),
                      (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
                       "tool_choice"),
                      (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
                       "response_format"),
                      (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}),
                       "response_format")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=HI, **kw)
        assert e.value.body["param"].startswith(param), (kw, e.value.body)


# ----------------------------------------------------------------------------- thinking, prefix, parts
def test_thinking_switch_both_spellings(client):
    a = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=30, extra_body=OFF)
    b = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=30,
                                       extra_body={"chat_template_kwargs": {"thinking": False}})
    on = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=30)
    assert a.choices[0].message.model_extra.get("reasoning_content") is None
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == on.usage.prompt_tokens - 1  # "</think>" vs "<think>\n"
    assert on.choices[0].message.model_extra["reasoning_content"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, extra_body={
            "thinking": {"type": "enabled"}, "chat_template_kwargs": {"thinking": False}})
    assert e.value.body["param"] == "thinking"


def test_prefix_completion_and_text_parts(client, chat_model_dir):
    prefix = [*HI, {"role": "assistant", "content": "Hello **", "prefix": True}]
    r = client.chat.completions.create(model=MODEL, messages=prefix, temperature=0, max_tokens=20, extra_body=OFF)
    from nanoseek.infer.text import ChatTokenizer

    ids, opened = ChatTokenizer(chat_model_dir).chat_prompt(prefix, thinking=False)
    assert r.usage.prompt_tokens == len(ids) and not opened
    assert r.choices[0].finish_reason in ("stop", "length")
    parts = [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}]
    assert client.chat.completions.create(model=MODEL, messages=parts, temperature=0).choices[0].message.content == CHAT_ANSWER
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert "images are not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "x", "prefix": True}, *HI])


# ----------------------------------------------------------------------------- sampling parameters
def test_n_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0.8, seed=5, max_tokens=6, n=3,
                                       logprobs=True, top_logprobs=4, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        content = c.logprobs.content
        assert len(content) == 6
        for e in content:
            assert len(e.top_logprobs) == 4 and e.logprob <= 0
            assert e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob and e.logprob <= e.top_logprobs[0].logprob + 1e-6
            assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=6, logprobs=True,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) == 6
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HI, top_logprobs=2)  # needs logprobs


def test_logit_bias_and_penalties(client, chat_model_dir):
    from nanoseek.infer.text import ChatTokenizer

    tok = ChatTokenizer(chat_model_dir)
    x = tok.encode_plain("x")[0]
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=5, extra_body=OFF,
                                       logit_bias={str(x): 100})
    assert r.choices[0].message.content == "x" * 5
    base = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=40)
    pen = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=40, frequency_penalty=2.0,
                                         presence_penalty=2.0)
    assert pen.choices[0].message != base.choices[0].message  # the learned answer repeats tokens: penalised
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, logit_bias={"99999": 5})
    assert "out of range" in e.value.body["message"]


def test_completions_prompt_list_and_fim_unsupported(client):
    one = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0).choices[0].text
           for p in ("the quick", "Hello")]
    r = client.completions.create(model=MODEL, prompt=["the quick", "Hello"], max_tokens=5, temperature=0, n=2, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [one[0], one[0], one[1], one[1]]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens // 4
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="def f(", suffix="return x", max_tokens=5)
    assert e.value.body["param"] == "suffix" and "fill-in-the-middle" in e.value.body["message"]


# ----------------------------------------------------------------------------- hostile input
def test_unsupported_parameters_are_named(client, chat_server):
    for extra in ({"frobnicate": 1}, {"audio": {"voice": "x"}}, {"modalities": ["audio"]}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=HI, extra_body=extra)
        assert e.value.body["param"] == next(iter(extra)) and e.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", best_of=2)
    assert e.value.body["param"] == "best_of"


def test_deep_json_chunked_and_huge_bodies(chat_server):
    url = chat_server + "/v1/chat/completions"
    hdr = {**auth(), "Content-Type": "application/json"}
    deep = b'{"model": "nanoseek-tiny", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    r = httpx.post(url, content=deep, headers=hdr)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"

    def chunks():  # 50 MB without a Content-Length: chunked transfer encoding
        for _ in range(50):
            yield b" " * (1 << 20)

    r = httpx.post(url, content=chunks(), headers=hdr, timeout=120)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # a legal-size body with a prompt far beyond the context: refused before it is tokenised
    big = {"model": MODEL, "messages": [{"role": "user", "content": "word " * (3 << 18)}]}
    r = httpx.post(url, json=big, headers=auth(), timeout=120)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(chat_server + "/health").json()["status"] == "ok"


def test_metrics_use_route_templates(chat_server):
    httpx.get(chat_server + "/v1/models/some-model-that-does-not-exist", headers=auth())
    httpx.get(chat_server + "/no/such/path/12345")
    text = httpx.get(chat_server + "/metrics").text
    assert 'route="/v1/models/{model_id:path}"' in text and 'route="other"' in text
    assert "some-model-that-does-not-exist" not in text and "12345" not in text
    assert re.search(r'nanoseek_http_errors_total\{code="404",route="/v1/models/\{model_id:path\}"\} [1-9]', text)
    for name in ("nanoseek_time_to_first_token_seconds_bucket", "nanoseek_inter_token_latency_seconds_count",
                 "nanoseek_e2e_request_latency_seconds_sum", "nanoseek_queue_depth", "nanoseek_batch_size",
                 "nanoseek_free_slots", "nanoseek_generation_tokens_per_second"):
        assert re.search(rf"^{name}(\{{[^}}]*\}})? ", text, re.M), name
