"""The program-output task: predict what a tiny generated Python snippet prints.

A verifiable task in the spirit of R1's code rewards (arXiv 2501.12948, section 2.2.2, "compiler"
feedback), made small: the snippet is generated from templates, its output is obtained by running it in
a sandboxed subprocess (`run_sandboxed`: isolated interpreter, CPU-time, memory, file-size and process
limits via resource.setrlimit, an empty scratch working directory, plus a wall-clock timeout), and the
checker only compares the model's answer with that precomputed output. Nothing the model writes is
ever executed; the limits guard against our own snippets misbehaving, they are not a security boundary
for hostile code.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from nanoseek.data.tasks.base import Example, Task, check_exact

# Results travel on a private copy of stdout; fd 1 itself points to /dev/null so that anything a snippet
# writes around Python's sys.stdout (child processes, os.write) cannot corrupt the protocol.
# The child sets its own limits (argv: CPU seconds, address-space bytes) before it reads a snippet:
# subprocess's preexec_fn would run Python between fork and exec, which can deadlock when the parent has
# other threads (a tokenizer training on this corpus reads it from Rust threads).
_RUNNER = r"""
import contextlib, io, json, os, resource, sys
cpu_s, mem_bytes = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # no files written
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no new processes (not enforced for root)
results = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
for line in sys.stdin:
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            exec(json.loads(line), {"__builtins__": __builtins__})
        out = buf.getvalue()
    except BaseException:
        out = None
    results.write(json.dumps(out) + "\n")
    results.flush()
"""


def run_sandboxed(snippets: Sequence[str], cpu_s: int = 2, mem_mb: int = 512, wall_s: float = 10.0) -> list[str | None]:
    """Stdout of each snippet run in a limited subprocess; None where a snippet failed or hit a limit.

    Snippets share one interpreter to amortize its start-up; when one kills the process (CPU or memory
    limit), it is marked None and the rest continue in a fresh process.
    """
    results: list[str | None] = []
    pending = list(snippets)
    while pending:
        with tempfile.TemporaryDirectory() as scratch:  # an empty working directory, removed afterwards
            proc = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _RUNNER, str(cpu_s), str(mem_mb << 20)], cwd=scratch,
                input="".join(json.dumps(s) + "\n" for s in pending), capture_output=True, text=True,
                timeout=wall_s * len(pending), check=False,
            )
        done = [json.loads(x) for x in proc.stdout.splitlines()]
        results += done
        pending = pending[len(done):]
        if pending:  # the process died on pending[0]
            results.append(None)
            pending = pending[1:]
    return results


def _template(rng: random.Random, difficulty: int) -> tuple[str, list[str]]:
    """(code, reasoning lines) of one snippet; larger difficulty means longer loops and bigger numbers."""
    hi = 5 * difficulty
    kind = rng.randrange(4)
    if kind == 0:
        a, b, c = rng.randint(1, hi), rng.randint(2, 5), rng.randint(1, hi)
        return f"x={a}\nx=x*{b}+{c}\nprint(x)", [f"x={a}", f"x={a}*{b}+{c}={a * b + c}"]
    if kind == 1:
        n, k = rng.randint(2, 2 + difficulty), rng.randint(1, 3)
        lines, s = [], 0
        for i in range(n):
            s += i * k
            lines.append(f"i={i} s={s}")
        return f"s=0\nfor i in range({n}):\n s+=i*{k}\nprint(s)", lines
    if kind == 2:
        xs = [rng.randint(0, hi) for _ in range(2 + difficulty)]
        i, j = rng.sample(range(len(xs)), 2)
        return f"a={xs}\nprint(a[{i}]+a[{j}])".replace(" ", ""), [f"a[{i}]={xs[i]}", f"a[{j}]={xs[j]}", f"{xs[i]}+{xs[j]}={xs[i] + xs[j]}"]
    x, b, c = rng.randint(1, hi), rng.randint(1, hi), rng.randint(1, 5)
    r = x - c if x > b else x + c
    return (f"x={x}\nif x>{b}:\n x-={c}\nelse:\n x+={c}\nprint(x)",
            [f"{x}>{b} is {x > b}", f"x={x}{'-' if x > b else '+'}{c}={r}"])


class ProgramOutput(Task):
    """`x=3\\nx=x*2+1\\nprint(x)` -> `7`; the answer comes from actually running the snippet."""

    name = "program"

    def generate(self, rng: random.Random, difficulty: int) -> Example:
        return self._finish([self._draft(rng, difficulty)])[0]

    def _draft(self, rng: random.Random, difficulty: int) -> Example:
        code, lines = _template(rng, difficulty)
        return Example(prompt=code, answer="", solution="\n".join(lines), task=self.name)

    def _finish(self, drafts: list[Example]) -> list[Example]:
        outputs = run_sandboxed([d.prompt for d in drafts])
        out = []
        for d, o in zip(drafts, outputs):
            if o is None:
                raise RuntimeError(f"generated snippet failed to run:\n{d.prompt}")
            out.append(Example(prompt=d.prompt, answer=o.strip(), solution=d.solution, task=d.task))
        return out

    def examples(self, split: str, n: int, seed: int = 0, difficulty: int = 1) -> list[Example]:
        # Task.examples' sampling rule, but every snippet of the call runs in one sandboxed batch.
        rng, unique = self._distinct(split, n, seed, difficulty, self._draft)
        drafts = self._fill_up(unique, split, n, rng)
        done = {e.prompt: e for e in self._finish(unique)}
        return [done[d.prompt] for d in drafts]

    def check(self, predicted_answer: str, example: Example) -> bool:
        return check_exact(predicted_answer, example.answer)
