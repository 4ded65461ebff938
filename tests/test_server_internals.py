"""Server internals that a real client cannot reach: a 500 never echoes the exception, chat rendering runs
on a worker thread (not the event loop), and the paged cache's gauges reach /metrics through
Engine.cache_metrics."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import require_module

require_module("fastapi", "pip install 'nanoseek[serve]'")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def app(chat_model_dir):
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.generate import load_model
    from nanoseek.infer.text import ChatTokenizer
    from nanoseek.serve.app import create_app

    torch.manual_seed(0)
    engine = Engine(load_model(str(chat_model_dir), None), max_batch_size=2, max_len=256)
    return create_app(engine, ChatTokenizer(chat_model_dir), "m")


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


BODY = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def test_a_500_says_nothing_about_the_exception(app, client, monkeypatch, caplog):
    tok = app.state.nanoseek.tokenizer

    def broken(*a, **k):
        raise RuntimeError("secret-token-123 at /srv/private/path")

    monkeypatch.setattr(tok, "chat_prompt", broken)
    with caplog.at_level("ERROR", logger="nanoseek.serve"):
        r = client.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 500 and r.json()["error"] == {"message": "internal server error", "type": "server_error",
                                                           "param": None, "code": "internal_error"}
    assert "secret" not in r.text and "RuntimeError" not in r.text
    assert "secret-token-123" in caplog.text  # the log has it
    assert 'nanoseek_http_errors_total{code="500",route="/v1/chat/completions"} 1.0' in client.get("/metrics").text


def test_rendering_runs_off_the_event_loop(app, client, monkeypatch):
    tok = app.state.nanoseek.tokenizer
    real, seen = tok.chat_prompt, []

    def spy(*a, **k):
        seen.append(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(tok, "chat_prompt", spy)
    assert client.post("/v1/chat/completions", json=BODY).status_code == 200
    assert seen and seen[0].startswith("nanoseek-io")


def test_cache_gauges_come_from_the_paged_cache(app, client, monkeypatch):
    engine = app.state.nanoseek.engine
    monkeypatch.setattr(engine.stats, "prompt_cache_hit_tokens", 5)
    monkeypatch.setattr(engine.stats, "prompt_cache_query_tokens", 20)
    text = client.get("/metrics").text
    assert f"nanoseek_cache_blocks_total {float(engine.cache.num_blocks)}" in text
    assert f"nanoseek_cache_block_size {float(engine.block_size)}" in text and "nanoseek_cache_blocks_used 0.0" in text
    assert "nanoseek_cache_prefix_hit_tokens 5.0" in text and "nanoseek_prefix_cache_hit_rate 0.25" in text
