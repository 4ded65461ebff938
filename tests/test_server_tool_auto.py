"""tool_choice "auto" end to end: a model that decides by itself to call a tool, served by a real `nanoseek
serve` process and called through the real `openai` client.

The session's tiny chat model is taught one more reply for a few seconds: asked for the weather in Paris
with the weather tool offered and thinking off, it answers with DeepSeek-V3.1's tool-call markup. Nothing
constrains that answer (no grammar, as in auto mode), so the server must find the call in free text and
return it as `message.tool_calls` (and as streamed `delta.tool_calls`) with `finish_reason: "tool_calls"`;
with `tool_choice: "none"` the same prompt must give no call.
"""

from __future__ import annotations

import json

import pytest

from conftest import SERVER_API_KEY, require_module, running_server

openai = require_module("openai", "pip install openai (in the [dev] extra)")
pytestmark = pytest.mark.usefixtures("one_thread")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city", "unit"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
ARGS = '{"city": "Paris", "unit": "C"}'
OFF = {"thinking": {"type": "disabled"}}


@pytest.fixture(scope="module")
def tool_model_dir(chat_model_dir, tmp_path_factory):
    import torch

    import nanoseek
    from nanoseek.data.special_tokens import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP
    from nanoseek.infer.generate import load_model
    from nanoseek.infer.text import ChatTokenizer

    tok = ChatTokenizer(chat_model_dir)
    prompt, opened = tok.chat_prompt(ASK, [WEATHER], thinking=False)  # exactly the server's prompt
    assert not opened
    call = f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}get_weather{TOOL_SEP}{ARGS}{TOOL_CALL_END}{TOOL_CALLS_END}"
    reply = tok.tok.encode(call) + [tok.eos_id]
    ids = torch.tensor([prompt + reply])
    targets = torch.full_like(ids, -100)
    targets[0, len(prompt) - 1:-1] = torch.tensor(reply)  # learn the reply only
    torch.manual_seed(0)
    model = load_model(chat_model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(200):  # ~5 s; the reply is memorised (loss ~1e-3), so greedy decoding reproduces it
        loss = model.forward_train(ids, targets, mtp_weight=0.0).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    out = tmp_path_factory.mktemp("tool_model") / "model"
    nanoseek.save(model.eval(), out, tokenizer_dir=chat_model_dir)
    return out


@pytest.fixture(scope="module")
def client(tool_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("tool_server") / "server.log"
    with running_server(tool_model_dir, log, "--model-name", "tools", "--max-len", "512",
                        "--log-level", "warning") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=SERVER_API_KEY, max_retries=0, timeout=120)


def test_auto_finds_the_call_in_free_text(client):
    r = client.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=60,
                                       extra_body=OFF)  # tool_choice defaults to "auto" when tools are given
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}
    assert not choice.message.content


def test_auto_streams_the_call_as_deltas(client):
    chunks = list(client.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER], tool_choice="auto",
                                                 temperature=0, max_tokens=60, stream=True, extra_body=OFF))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].index == 0 and deltas[0].id and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris", "unit": "C"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_none_keeps_the_model_from_calling(client):
    r = client.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=20, extra_body=OFF)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
