"""The README and docs/ run as written: every shell command of their code blocks is run or, where it
cannot run in a test, at least parsed, so a renamed path, flag or config key fails here.

What is extracted: every line of a ```bash block (continuations joined, comments dropped) and every
`$ ` line of a plain ``` block (the lines under it are its expected output, compared exactly), from
README.md, docs/serving.md and docs/structured-output.md. Python blocks are compiled; the ones in
RUN_PYTHON are run too.

How each command is checked, in document order, in a scratch folder where `configs/` is the repository's
and `runs/speedrun` is the session's `nanoseek speedrun --quick` output (what `make run` leaves, smaller):
* `nanoseek ...` runs as a real process, as written plus CHEAP[command] (appended, so argparse's last
  value wins: fewer problems, steps, samples; the paths and flags are the documented ones) and
  `--threads 1`. `serve` starts a real server (the documented `--port` swapped for a free one) that the
  curl lines and RUN_PYTHON snippets after it talk to. `chat` gets a message and /exit on stdin.
* PARSE_ONLY commands (long training, multi-node torchrun, binding every interface, the reader's own
  files) are parsed by nanoseek's own argparse (torchrun's flags by torch's parser), and a `--config` that
  exists is loaded and checked; each entry says why it is not run.
* `make TARGET` is checked with `make -n` (the target exists), `bash FILE` by the file existing, and each
  `python -m benchmarks.NAME` the README names by its module existing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/serving.md", "docs/structured-output.md"]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# Appended to a documented command so that it runs in seconds (the flags the docs give stay; these win).
CHEAP = {
    "sft": ["--n", "16", "--steps", "2", "--batch-size", "4"],
    "eval": ["--n", "4", "--k", "1", "--max-new-tokens", "16"],
    "grpo": ["--steps", "1", "--G", "2", "--prompts-per-step", "2", "--max-new-tokens", "16"],
    "distill": ["--n", "4", "--k", "2", "--steps", "1", "--max-new-tokens", "16"],
}
THREADS = {"train", "sft", "eval", "grpo", "distill", "generate", "chat", "serve", "speedrun"}

# (a substring of the command, why it is parsed and not run). Each must match at least one command.
PARSE_ONLY = [
    ("--config configs/small.toml --out runs/small", "trains the `small` preset for minutes"),
    ("--set data.source=my_texts/", "the reader's own folder of text (tests/test_shards.py trains on a folder)"),
    ("torchrun --nproc_per_node 2", "two processes for minutes (tests/test_parallel.py runs torchrun)"),
    ("torchrun --nproc_per_node 4", "four processes (tests/test_pipeline.py runs pp=2 x ep=2 under torchrun, slow)"),
    ("torchrun --nnodes 2", "two nodes of 8 GPUs"),
    ("--host 0.0.0.0", "binds every interface; the tests serve on loopback only"),
    ("--preset gpu --out runs/speedrun-gpu", "the GPU speedrun needs CUDA (tests/test_speedrun_gpu.py runs its "
     "stages shrunk on the CPU, and the real preset under make test-gpu)"),
    ("--model runs/small/final --to v3.2", "converts the `small` run trained above (tests/test_dsa_train.py "
     "converts a trained model with the real CLI)"),
]
# Python blocks run as well as compiled: (a substring of the block, {text: replacement}).
RUN_PYTHON = [
    ('nanoseek.load("path/to/deepseek_v3_dir"', {"path/to/deepseek_v3_dir": "runs/speedrun/model"}),
    ("from openai import OpenAI", {}),
]


@dataclass
class Command:
    doc: str
    line: int
    argv: list[str]
    expected: list[str] | None = None  # the output shown under a `$ ` line

    @property
    def text(self) -> str:
        return shlex.join(self.argv)

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    lines: list[str] = field(default_factory=list)


def blocks(doc: str) -> list[Block]:
    """Fenced blocks: opened by a line ```LANG, closed by a line that is exactly ``` (so fences shown
    inside a block, like ```json in docs/structured-output.md, stay content)."""
    out, cur = [], None
    for i, line in enumerate((REPO / doc).read_text(encoding="utf-8").splitlines(), 1):
        if cur is None:
            m = re.fullmatch(r"```(\w*)\s*", line)
            if m:
                cur = Block(doc, i + 1, m.group(1))
        elif line.strip() == "```":
            out.append(cur)
            cur = None
        else:
            cur.lines.append(line)
    return out


def commands(block: Block) -> list[Command]:
    out: list[Command] = []
    if block.lang == "bash":
        pending, start = "", 0
        for i, line in enumerate(block.lines):
            if not pending:
                start = i
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            argv = shlex.split(pending + line, comments=True)
            pending = ""
            if argv:
                out.append(Command(block.doc, block.line + start, argv))
    elif block.lang == "":
        for i, line in enumerate(block.lines):
            if line.startswith("$ "):
                out.append(Command(block.doc, block.line + i, shlex.split(line[2:]), []))
            elif out and out[-1].expected is not None:
                out[-1].expected.append(line.rstrip())
    return out


def all_commands() -> list[Command]:
    return [c for doc in DOCS for b in blocks(doc) for c in commands(b)]


def parse_only_reason(cmd: Command) -> str | None:
    why = next((why for needle, why in PARSE_ONLY if needle in cmd.text), None)
    assert why or cmd.argv[0] != "torchrun", f"{cmd}: a torchrun command needs a PARSE_ONLY entry (tests/test_docs.py)"
    return why


# ----------------------------------------------------------------------------- the extraction itself
def test_the_docs_have_the_commands_this_test_checks():
    """Guard against a vacuous pass: the extraction finds what the docs show."""
    texts = [c.text for c in all_commands()]
    for needle in ("nanoseek train --config configs/tiny.toml", "nanoseek generate --model runs/speedrun/model",
                   "nanoseek serve --model runs/speedrun/model", "nanoseek sft --model runs/speedrun/pretrain/final",
                   "nanoseek params --preset deepseek-v3", "curl http://127.0.0.1:8000/v1/chat/completions",
                   "torchrun --nnodes 2", "make test"):
        assert any(t.startswith(needle) for t in texts), (needle, texts)
    for needle, _ in PARSE_ONLY:
        assert any(needle in t for t in texts), f"PARSE_ONLY entry {needle!r} matches no documented command"
    assert not [t for t in texts if "runs/speedrun/final" in t]  # the speedrun writes runs/speedrun/model


def test_parse_only_commands_parse():
    from torch.distributed.run import get_args_parser

    from nanoseek.cli import build_parser

    checked = 0
    for cmd in all_commands():
        if not parse_only_reason(cmd):
            continue
        argv = cmd.argv
        if argv[0] == "torchrun":
            cut = argv.index("nanoseek")
            get_args_parser().parse_args(argv[1:cut] + ["nanoseek"])  # torchrun's own flags, checked by torch
            assert "--no-python" in argv[1:cut], cmd
            argv = argv[cut:]
        assert argv[0] == "nanoseek", cmd
        args = build_parser(argv[1:]).parse_args(argv[1:])  # SystemExit on an unknown flag or bad value
        if args.command == "train" and (REPO / args.config).is_file():
            from nanoseek.train.config import load_run_config

            load_run_config(REPO / args.config, [s for s in args.sets if "data.source" not in s])
        checked += 1
    assert checked >= len(PARSE_ONLY)


def test_python_blocks_compile():
    n = 0
    for doc in DOCS:
        for b in blocks(doc):
            if b.lang == "python":
                compile("\n".join(b.lines), f"{doc}:{b.line}", "exec")
                n += 1
    assert n >= 5


def test_named_benchmarks_and_make_targets_exist():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    names = set(re.findall(r"python -m benchmarks\.(\w+)", text))
    assert names and all((REPO / "benchmarks" / f"{n}.py").is_file() for n in names), names
    for doc in DOCS:  # scripts and pictures named in prose
        body = (REPO / doc).read_text(encoding="utf-8")
        for script in re.findall(r"\bscripts/[\w.-]+", body):
            assert (REPO / script).is_file(), (doc, script)
        for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)|<img src=\"([^\"]+)\"", body):
            picture = picture[0] or picture[1]
            assert (REPO / doc).parent.joinpath(picture).is_file(), (doc, picture)
    for cmd in all_commands():
        if cmd.argv[0] == "make":
            r = subprocess.run(["make", "-n", *cmd.argv[1:]], cwd=REPO, capture_output=True, text=True)
            assert r.returncode == 0, (str(cmd), r.stderr)
        elif cmd.argv[0] == "bash":
            assert (REPO / cmd.argv[1]).is_file(), str(cmd)


# ----------------------------------------------------------------------------- running them
class Runner:
    """Runs the documented commands of one doc in order, in `work`, with at most one server at a time."""

    def __init__(self, work: Path, log: Path):
        self.work, self.log = work, log
        self.server: subprocess.Popen | None = None
        self.port: int | None = None
        self.ran: list[str] = []

    def env(self) -> dict:
        return {**os.environ, **ENV}

    def nanoseek(self, cmd: Command) -> subprocess.CompletedProcess:
        argv = list(cmd.argv[1:])
        sub = argv[0]
        if sub == "serve":
            return self.serve(cmd, argv)
        argv += CHEAP.get(sub, []) + (["--threads", "1"] if sub in THREADS else [])
        stdin = "Make 10 from 2 3 5\n/exit\n" if sub == "chat" else None
        r = subprocess.run([sys.executable, "-m", "nanoseek.cli", *argv], cwd=self.work, input=stdin,
                           capture_output=True, text=True, env=self.env(), timeout=900)
        if sub == "distill" and r.returncode == 1:  # the quick model is a weak teacher: no trace may verify
            assert "nothing to train on" in r.stderr, (str(cmd), r.stderr[-2000:])
            return r
        assert r.returncode == 0, (str(cmd), r.stderr[-3000:])
        if cmd.expected is not None:
            assert [ln.rstrip() for ln in r.stdout.rstrip("\n").splitlines()] == cmd.expected, (str(cmd), r.stdout)
        if sub in ("generate", "chat"):
            assert "on cpu" in r.stderr, r.stderr  # the device reached the model (the default, auto, here)
        return r

    def serve(self, cmd: Command, argv: list[str]) -> subprocess.CompletedProcess:
        import httpx

        self.stop()
        self.port = free_port()
        argv[argv.index("--port") + 1] = str(self.port)
        logf = open(self.log, "w")
        self.server = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", *argv, "--threads", "1",
                                        "--log-level", "warning"], cwd=self.work, stdout=logf,
                                       stderr=subprocess.STDOUT, env=self.env())
        deadline = time.time() + 300
        while True:
            assert self.server.poll() is None, (str(cmd), self.log.read_text())
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    break
            assert time.time() < deadline, (str(cmd), self.log.read_text())
            time.sleep(0.3)
        return subprocess.CompletedProcess(argv, 0, "", "")

    def local(self, text: str) -> str:
        assert self.port, "a client command before any documented `nanoseek serve`"
        return text.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")

    def curl(self, cmd: Command) -> None:
        argv = [self.local(a) for a in cmd.argv] + ["--silent", "--show-error", "--fail-with-body"]
        r = subprocess.run(argv, cwd=self.work, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (str(cmd), r.stdout, r.stderr)
        body = json.loads(r.stdout)
        assert "error" not in body, (str(cmd), body)

    def python(self, code: str, where: str) -> None:
        r = subprocess.run([sys.executable, "-c", code], cwd=self.work, capture_output=True, text=True,
                           env=self.env(), timeout=300)
        assert r.returncode == 0, (where, r.stderr[-3000:])

    def stop(self) -> None:
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
            self.server = None

    def run_doc(self, doc: str) -> None:
        for b in blocks(doc):
            if b.lang == "python":
                for needle, subs in RUN_PYTHON:
                    code = "\n".join(b.lines)
                    if needle in code:
                        for old, new in subs.items():
                            code = code.replace(old, new)
                        self.python(self.local(code) if "127.0.0.1:8000" in code else code, f"{doc}:{b.line}")
                        self.ran.append(f"{doc}:{b.line}: python block")
                continue
            for cmd in commands(b):
                if parse_only_reason(cmd) or cmd.argv[0] in ("make", "bash", "torchrun"):
                    continue
                if cmd.argv[0] == "nanoseek":
                    self.nanoseek(cmd)
                elif cmd.argv[0] == "curl":
                    self.curl(cmd)
                else:
                    raise AssertionError(f"{cmd}: no rule for {cmd.argv[0]!r} (add one to tests/test_docs.py)")
                self.ran.append(str(cmd))


@pytest.fixture
def work(speedrun_quick, tmp_path) -> Path:
    """A scratch folder laid out as a clone after `make run`: configs/ and runs/speedrun."""
    w = tmp_path / "clone"
    (w / "runs").mkdir(parents=True)
    (w / "configs").symlink_to(REPO / "configs")
    (w / "runs" / "speedrun").symlink_to(speedrun_quick)
    return w


@pytest.mark.parametrize("doc", DOCS)
def test_the_documented_commands_run(doc, work, tmp_path):
    runner = Runner(work, tmp_path / "server.log")
    try:
        runner.run_doc(doc)
    finally:
        runner.stop()
    expected_runs = {"README.md": 12, "docs/serving.md": 5, "docs/structured-output.md": 0}[doc]
    assert len(runner.ran) >= expected_runs, runner.ran
