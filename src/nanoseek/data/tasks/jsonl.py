"""User tasks from a JSONL file: one problem per line, checked exactly, numerically or as Countdown."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import MappingProxyType

from nanoseek.data.tasks.base import (SPLITS, Example, Task, check_exact, check_numeric, check_split, parse_number,
                                      split_of)
from nanoseek.data.tasks.countdown import check_countdown
from nanoseek.errors import DataError, PathNotFound

CHECKERS = ("exact", "numeric", "countdown")


def check_by_name(name: str, predicted: str, example: Example) -> bool:
    """Check with one of CHECKERS (countdown reads the example's numbers and target from its meta)."""
    if name == "exact":
        return check_exact(predicted, example.answer)
    if name == "numeric":
        return check_numeric(predicted, example.answer)
    if name == "countdown":
        return check_countdown(predicted, list(example.meta["numbers"]), int(example.meta["target"]))
    raise ValueError(f"unknown checker {name!r}; expected one of {CHECKERS}")


class JsonlTask(Task):
    """User problems from a JSONL file; the split is the line's `split` field, else the prompt hash."""

    def __init__(self, name: str, rows: list[Example]):
        self.name = name
        self.rows = rows

    def generate(self, rng: random.Random, difficulty: int) -> Example:
        return self.rows[rng.randrange(len(self.rows))]

    def check(self, predicted_answer: str, example: Example) -> bool:
        return check_by_name(str(example.meta.get("checker", "exact")), predicted_answer, example)

    def examples(self, split: str, n: int, seed: int = 0, difficulty: int = 1) -> list[Example]:
        check_split(split)
        pool = [r for r in self.rows if r.meta.get("split", split_of(self.name, r.prompt)) == split]
        rng = random.Random(f"{self.name}:{split}:{seed}")
        rng.shuffle(pool)
        if len(pool) >= n or split == "test" or not pool:
            return pool[:n]
        return pool + [pool[rng.randrange(len(pool))] for _ in range(n - len(pool))]


def load_jsonl_task(path: str | Path, name: str | None = None) -> JsonlTask:
    """Lines of `{"prompt", "answer", optional "solution", "checker", "split", "numbers"}`."""
    p = Path(path)
    if not p.is_file():
        raise PathNotFound("no such task file", p, "pass a built-in task name or an existing .jsonl file")
    task_name = name or p.stem
    rows: list[Example] = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from e
        rows.append(_row(obj, where, task_name))
    if not rows:
        raise DataError(f"{p}: no examples found")
    return JsonlTask(task_name, rows)


def _row(obj: object, where: str, task_name: str) -> Example:
    """One validated line; the error names the file and line."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "answer"):
        if not isinstance(obj.get(key), (str, int, float)) or isinstance(obj.get(key), bool) or str(obj.get(key)).strip() == "":
            raise DataError(f"{where}: missing or empty '{key}' (a string is required)")
    checker = obj.get("checker", "exact")
    if checker not in CHECKERS:
        raise DataError(f"{where}: unknown checker {checker!r}; expected one of {CHECKERS}")
    meta: dict[str, object] = {"checker": checker}
    if "split" in obj:
        if obj["split"] not in SPLITS:
            raise DataError(f"{where}: split must be one of {SPLITS}, got {obj['split']!r}")
        meta["split"] = obj["split"]
    answer = parse_number(str(obj["answer"]))
    if checker == "numeric" and answer is None:
        raise DataError(f"{where}: checker 'numeric' needs a numeric answer, got {obj['answer']!r}")
    if checker == "countdown":
        nums = obj.get("numbers")
        if not isinstance(nums, list) or not nums or not all(isinstance(x, int) and not isinstance(x, bool) for x in nums):
            raise DataError(f"{where}: checker 'countdown' needs 'numbers', a list of integers")
        if answer is None or answer.denominator != 1:
            raise DataError(f"{where}: checker 'countdown' needs the integer target as 'answer'")
        meta["numbers"], meta["target"] = tuple(nums), int(str(obj["answer"]).strip())
    return Example(prompt=str(obj["prompt"]), answer=str(obj["answer"]), solution=str(obj.get("solution", "")),
                   task=task_name, meta=MappingProxyType(meta))
