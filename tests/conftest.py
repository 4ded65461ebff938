"""Shared fixtures. Append new ones; keep each generic and cheap."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# ----------------------------------------------------------------------------- a tiny chat model on disk
CHAT_QUESTIONS = ["Hi", "Hello", "Hello there!", "Say hello", "How are you?"]
CHAT_REASONING = "The user greets me. I greet back."
CHAT_ANSWER = "Hello **world**! `x = 1`"
SERVER_API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """A saved tiny model (HF layout + tokenizer) trained for a few seconds to answer every greeting in
    CHAT_QUESTIONS with `<think>CHAT_REASONING</think>CHAT_ANSWER<eos>` under greedy decoding."""
    import torch

    import nanoseek
    from nanoseek.config import preset
    from nanoseek.data.tokenizer import END_THINK, EOS, train_tokenizer
    from nanoseek.model import Transformer

    root = tmp_path_factory.mktemp("chat_model")
    corpus = CHAT_QUESTIONS + [CHAT_REASONING, CHAT_ANSWER, "the quick brown fox jumps over the lazy dog"] * 3
    # 256 bytes + 17 special tokens + 36 merges (the merges this fixture had before the tool tokens came)
    tok = train_tokenizer(corpus * 4, 309, root / "tokenizer", min_frequency=1)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size))
    rows = []
    for q in CHAT_QUESTIONS:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        ids = tok.encode(prompt + f"{CHAT_REASONING}\n{END_THINK}\n\n{CHAT_ANSWER}{EOS}")
        n_prompt = len(tok.encode(prompt))
        rows.append((ids, n_prompt))
    T = max(len(r) for r, _ in rows)
    x = torch.full((len(rows), T), tok.pad_id)
    y = torch.full((len(rows), T), -100)
    for i, (ids, n_prompt) in enumerate(rows):
        x[i, :len(ids)] = torch.tensor(ids)
        y[i, n_prompt - 1:len(ids) - 1] = torch.tensor(ids[n_prompt:])  # learn the reply only
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add contention on a shared machine
    try:
        for _ in range(150):
            loss = model.forward_train(x, y, mtp_weight=0.3).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    out = root / "model"
    nanoseek.save(model, out, tokenizer_dir=root / "tokenizer")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def chat_server(chat_model_dir, tmp_path_factory):
    """A real `nanoseek serve` process on loopback (API key SERVER_API_KEY); yields its base URL."""
    import httpx

    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(chat_model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--api-key", SERVER_API_KEY, "--model-name", "nanoseek-tiny",
           "--max-batch-size", "4", "--max-queue", "4", "--max-len", "512", "--log-level", "warning"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the server did not start in 120 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: extra threads gain nothing there and, on a
    shared 2-core machine, spin against the other processes (seen 30-100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
