"""Shared fixtures and the strict mode. Append new fixtures; keep each generic and cheap.

Strict mode (NANOSEEK_STRICT=1, set by .ci/run): a test skipped because a dependency is missing (the C++
kernels did not build, no Chromium, playwright/openai/transformers/pyarrow not installed) FAILS instead,
so CI cannot be green with part of the project untested. Tests declare such dependencies with
`require(ok, what)` / `require_module(name, install)` (inside a test, a fixture or at module level) or
the `requires(ok, what)` mark; `pytest.importorskip` is treated the same way. Other skips (a feature
this torch build lacks, say) stay skips.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

# ----------------------------------------------------------------------------- strict mode
STRICT = os.environ.get("NANOSEEK_STRICT", "") not in ("", "0")
MISSING = "missing dependency: "
_IMPORTORSKIP = "could not import "  # the reason pytest.importorskip gives


def require(available: bool, what: str) -> None:
    """Skip the calling test, fixture or module unless `available`; `what` names the dependency and how
    to get it ("Chromium at /usr/bin/chromium (make browser)"). A failure in strict mode."""
    if not available:
        pytest.skip(MISSING + what, allow_module_level=True)


def require_module(name: str, install: str) -> ModuleType:
    """The imported module, or a skip (a failure in strict mode) naming how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.skip(f"{MISSING}{name} is not importable ({e}); {install}", allow_module_level=True)


def requires(available: bool, what: str) -> pytest.MarkDecorator:
    """`require` as a mark: `pytestmark = requires(kernels.load() is not None, "the C++ kernels ...")`."""
    return pytest.mark.skipif(not available, reason=MISSING + what)


def _skip_reason(rep) -> str | None:
    if rep.skipped and isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3:
        return str(rep.longrepr[2]).removeprefix("Skipped: ")
    return None


def _fail_if_missing_dependency(rep) -> None:
    reason = _skip_reason(rep)
    if STRICT and reason and (reason.startswith(MISSING) or reason.startswith(_IMPORTORSKIP)):
        rep.outcome = "failed"
        rep.longrepr = f"NANOSEEK_STRICT=1 turns this skip into a failure: {reason}"


def pytest_configure(config):
    if STRICT:  # a module that fails for a missing dependency must not hide the others: list them all
        config.option.continue_on_collection_errors = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_missing_dependency(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_if_missing_dependency(outcome.get_result())


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
    from nanoseek.data.chat import END_THINK, EOS
    from nanoseek.data.tokenizer import train_tokenizer
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
    def memorised() -> bool:
        """Every reply token is the argmax after its teacher-forced prefix, by a clear margin: then greedy
        decoding reproduces the reply on any CPU, whatever order its kernels add in."""
        with torch.no_grad():
            logits = model(x)
        mask = y != -100
        target = logits.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        runner_up = logits.scatter(-1, y.clamp(min=0).unsqueeze(-1), float("-inf")).amax(-1)
        return bool(((target - runner_up)[mask] > 1.0).all())

    try:
        # 150 steps memorise the replies on the AVX2 machines; CPUs that add in another order (AVX-512)
        # may need more. The check, not a step count, decides.
        for step in range(600):
            loss = model.forward_train(x, y, mtp_weight=0.3).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step + 1 >= 150 and (step + 1) % 25 == 0:
                model.eval()
                done = memorised()
                model.train()
                if done:
                    break
        else:
            raise AssertionError("the chat fixture did not memorise its replies in 600 steps")
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


@contextlib.contextmanager
def running_server(model_dir: Path, log: Path, *extra_args: str, start_timeout: float = 400):
    """A real `nanoseek serve` process on a free loopback port (API key SERVER_API_KEY); yields its base URL
    once /health answers, and stops it on exit. extra_args go to the command line as they are."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--api-key", SERVER_API_KEY, *extra_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the server did not start in {start_timeout:.0f} s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def chat_server(chat_model_dir, tmp_path_factory):
    """A real `nanoseek serve` process on loopback (API key SERVER_API_KEY); yields its base URL."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(chat_model_dir, log, "--model-name", "nanoseek-tiny", "--max-batch-size", "4",
                        "--max-queue", "4", "--max-len", "1024", "--block-size", "16", "--log-level", "warning") as url:
        yield url


@pytest.fixture(scope="module", autouse=True)
def _torch_threads_restored():
    """Whatever a module's tests do to torch's thread count (in-process CLI runs such as `speedrun` set
    it), the next module starts with the count it would have had alone."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: extra threads gain nothing there and, on a
    shared 2-core machine, spin against the other processes (seen 30-100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def paged_rows():
    """make(model, rows, max_len, block_size=4) -> (cache, view): a nanoseek.infer.cache.PagedCache where
    each of `rows` sequences owns ceil(max_len / block_size) blocks, handed out in a scrambled order (so
    reads really gather through the block table), and view(row_ids [B], start_pos [B], n_new) opens a
    forward on those rows, the way the engine does."""
    from nanoseek.infer.cache import PagedCache

    def make(model, rows: int, max_len: int, block_size: int = 4, dtype=torch.float32):
        per_row = -(-max_len // block_size)
        cache = PagedCache.for_model(model, rows * per_row, block_size, dtype, "cpu")
        order = torch.randperm(rows * per_row, generator=torch.Generator().manual_seed(rows)).tolist()
        tables = [order[r * per_row:(r + 1) * per_row] for r in range(rows)]

        def view(row_ids: torch.Tensor, start_pos: torch.Tensor, n_new: int):
            return cache.view([tables[r] for r in row_ids.tolist()], start_pos, n_new)

        return cache, view

    return make


# ----------------------------------------------------------------------------- the quick speedrun, once
@pytest.fixture(scope="session")
def speedrun_quick(tmp_path_factory) -> Path:
    """The output folder of one `nanoseek speedrun --quick` (~1 minute, built once per session): report,
    plots, pretrain/final, sft/, grpo/ and the exported model/. Tests must not write into it."""
    from nanoseek.cli import main

    out = tmp_path_factory.mktemp("speedrun") / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["speedrun", "--out", str(out), "--quick", "--no-progress", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out
