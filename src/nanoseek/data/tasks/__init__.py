"""Verifiable reasoning tasks: problems with rule-checkable answers, for SFT, GRPO and evaluation.

R1 (arXiv 2501.12948, section 2.2.2) trains with rule-based accuracy rewards only; small reproductions
(TinyZero) use Countdown and arithmetic. Here, one module per task:
  * `arithmetic`: multi-step integer arithmetic with precedence, e.g. "3+4*5=?", worked step by step;
  * `countdown`: reach a target from given numbers with + - * / (division only when exact), solved by
    search; the checker parses the model's expression with a tiny recursive-descent parser (no eval);
  * `program`: predict what a tiny generated Python snippet prints;
  * `passkey`: long-context retrieval (a number hidden at a random depth of filler text), the one
    long-prompt task, kept out of the pretraining corpus (`Task.in_corpus`);
  * user tasks from JSONL (`load_jsonl_task`) with an exact, numeric or countdown checker.
`base` holds what they share (Example, Task, the split, the plain checkers).

Every problem is generated deterministically from (task, seed, difficulty). The split is decided by a
hash of the prompt alone, so the train and test splits can never share a problem, whatever the seeds.
Prompts are kept very short so that a ~5M-parameter model learns difficulty 1 in minutes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from nanoseek.data.tasks.arithmetic import Arithmetic
from nanoseek.data.tasks.base import (SPLITS, TEST_PERCENT, Example, Task, check_exact, check_numeric, parse_number,
                                      split_of)
from nanoseek.data.tasks.countdown import (Countdown, ExpressionError, check_countdown, parse_expression,
                                           solve_countdown)
from nanoseek.data.tasks.jsonl import CHECKERS, JsonlTask, check_by_name, load_jsonl_task
from nanoseek.data.tasks.passkey import Passkey
from nanoseek.data.tasks.program import ProgramOutput, run_sandboxed
from nanoseek.errors import DataError

TASKS: Mapping[str, Task] = MappingProxyType({t.name: t for t in (Arithmetic(), Countdown(), ProgramOutput(),
                                                                   Passkey())})


def get_task(name: str) -> Task:
    """A built-in task by name, or a JSONL task when `name` is a path to a .jsonl file."""
    if name in TASKS:
        return TASKS[name]
    if name.endswith(".jsonl") or Path(name).is_file():
        return load_jsonl_task(name)
    raise UnknownTask(f"unknown task {name!r}", hint=f"use a built-in task {sorted(TASKS)} or a .jsonl file")


class UnknownTask(DataError, KeyError):
    """A task name that is neither built in nor a file (a KeyError too, as it always was)."""


def check_answer(predicted_answer: str, example: Example) -> bool:
    """Check with the example's own checker (JSONL) or its built-in task's."""
    if "checker" in example.meta:
        return check_by_name(str(example.meta["checker"]), predicted_answer, example)
    if example.task in TASKS:
        return TASKS[example.task].check(predicted_answer, example)
    raise KeyError(f"no checker for task {example.task!r}: not built in and the example names no checker")


__all__ = [
    "TASKS", "SPLITS", "TEST_PERCENT", "CHECKERS", "Example", "Task", "Arithmetic", "Countdown", "ProgramOutput", "Passkey",
    "JsonlTask", "ExpressionError", "get_task", "check_answer", "check_by_name", "check_exact", "check_numeric",
    "check_countdown", "parse_expression", "parse_number", "solve_countdown", "split_of", "load_jsonl_task",
    "run_sandboxed",
]
