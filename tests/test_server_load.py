"""Load: 64 concurrent clients against a real `nanoseek serve` (8 batch rows, a queue of 128, a paged cache in
blocks of 16: some clients ask for several choices), mixing streamed and plain chats, forced tool calls,
JSON output, prompts that share a long prefix (read from the prefix cache), completions and mid-stream
disconnects. Every request succeeds, nothing leaks (no cache block held afterwards, the server's RSS
bounded), /health is fine afterwards."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest

from conftest import SERVER_API_KEY, require_module, running_server

openai = require_module("openai", "pip install openai (in the [dev] extra)")
pytestmark = pytest.mark.slow
MODEL = "load"
SYSTEM = "You are a helpful assistant. " * 20  # a shared prefix
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "maxLength": 8}}, "required": ["q"]}}}
OFF = {"thinking": {"type": "disabled"}}


def rss_kib(port: int) -> int:
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmd and str(port).encode() in cmd:
            status = (proc / "status").read_text()
            return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS:")))
    raise AssertionError("server process not found")


async def one(client: "openai.AsyncOpenAI", url: str, i: int) -> str:
    kind = i % 8
    user = [{"role": "user", "content": f"Hi {i}"}]
    if kind == 0:
        r = await client.chat.completions.create(model=MODEL, messages=user, max_tokens=24)
        assert r.choices[0].finish_reason in ("stop", "length")
    elif kind == 1:
        text = ""
        async for c in await client.chat.completions.create(model=MODEL, messages=user, max_tokens=24, stream=True):
            text += (c.choices[0].delta.content or "") if c.choices else ""
    elif kind == 2:
        r = await client.chat.completions.create(model=MODEL, messages=user, max_tokens=60, tools=[TOOL],
                                                 tool_choice="required", extra_body=OFF)
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments)["q"] is not None
    elif kind == 3:
        r = await client.chat.completions.create(model=MODEL, messages=user, max_tokens=60, extra_body=OFF,
                                                 response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    elif kind == 4:
        r = await client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": SYSTEM}, *user],
                                                 max_tokens=16, temperature=0)
        assert r.usage.prompt_tokens > 100
    elif kind == 5:  # disconnect mid-stream
        body = {"model": MODEL, "messages": user, "stream": True, "max_tokens": 200, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=300) as h:
            async with h.stream("POST", url + "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {SERVER_API_KEY}"}) as resp:
                assert resp.status_code == 200
                n = 0
                async for _ in resp.aiter_lines():
                    n += 1
                    if n > 6:
                        break
    elif kind == 6:
        r = await client.completions.create(model=MODEL, prompt=["the quick", "brown"], max_tokens=8, n=2)
        assert len(r.choices) == 4
    else:
        r = await client.chat.completions.create(model=MODEL, messages=user, max_tokens=12, n=2, logprobs=True,
                                                 top_logprobs=2)
        assert all(c.logprobs.content for c in r.choices)
    return "ok"


def test_64_concurrent_clients(chat_model_dir, tmp_path):
    with running_server(chat_model_dir, tmp_path / "server.log", "--model-name", MODEL, "--max-batch-size", "8",
                        "--max-queue", "128", "--max-len", "1024", "--block-size", "16", "--log-level", "warning") as url:
        port = int(url.rsplit(":", 1)[1])

        async def main():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=SERVER_API_KEY, max_retries=0, timeout=600)
            return await asyncio.gather(*[one(client, url, i) for i in range(64)], return_exceptions=True)

        warm = rss_kib(port)
        results = asyncio.run(main())
        assert [r for r in results if r != "ok"] == []
        first = rss_kib(port)
        results = asyncio.run(main())  # a second wave: memory must not keep growing
        assert [r for r in results if r != "ok"] == []
        health = None
        for _ in range(100):  # the engine reaps cancelled requests at its next step
            health = httpx.get(url + "/health").json()
            if health["free_slots"] == 8:
                break
            asyncio.run(asyncio.sleep(0.1))
        assert health["status"] == "ok" and health["free_slots"] == 8
        assert health["batch_size"] == 0 and health["queue_depth"] == 0
        metrics = httpx.get(url + "/metrics").text
        assert "nanoseek_cache_blocks_used 0.0" in metrics  # every block back in the pool (cached or free)
        hits = re.search(r"^nanoseek_cache_prefix_hit_tokens ([0-9.e+]+)$", metrics, re.M)
        assert hits and float(hits.group(1)) > 0  # the shared system prompt came from the prefix cache
        second = rss_kib(port)
        assert second - first < max(first - warm, 0) + 200 * 1024, (warm, first, second)
