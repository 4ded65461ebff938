"""Verifiable reasoning tasks: problems with rule-checkable answers, for SFT, GRPO and evaluation.

R1 (arXiv 2501.12948, section 2.2.2) trains with rule-based accuracy rewards only; small reproductions
(TinyZero) use Countdown and arithmetic. Here:
  * `arithmetic`: multi-step integer arithmetic with precedence, e.g. "3+4*5=?", worked step by step;
  * `countdown`: reach a target from given numbers with + - * / (division only when exact), solved by
    search; the checker parses the model's expression with a tiny recursive-descent parser (no eval);
  * `program` (data/program.py) and `passkey` (data/passkey.py: long-context retrieval, the one
    long-prompt task, kept out of the pretraining corpus);
  * user tasks from JSONL (`load_jsonl_task`) with an exact, numeric or countdown checker.

Every problem is generated deterministically from (task, seed, difficulty). The split is decided by a
hash of the prompt alone, so the train and test splits can never share a problem, whatever the seeds.
Prompts are kept very short so that a ~5M-parameter model learns difficulty 1 in minutes.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
import json
import random
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType

SPLITS = ("train", "test")
TEST_PERCENT = 20  # share of each problem space held out


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # a reference answer (for countdown: one valid expression)
    solution: str  # worked reasoning that leads to `answer` (goes inside <think>...</think>)
    task: str
    meta: Mapping[str, object] = field(default_factory=dict)  # checker inputs (countdown numbers, target)


def split_of(task: str, prompt: str) -> str:
    """'test' or 'train', a pure function of the problem text."""
    h = int.from_bytes(hashlib.sha256(f"{task}\x00{prompt}".encode()).digest()[:8], "big")
    return "test" if h % 100 < TEST_PERCENT else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ----------------------------------------------------------------------------------------------------
# Checkers


def _parse_number(text: str) -> Fraction | None:
    s = text.strip().replace(",", "").rstrip(".").strip()
    if not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)(/\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def check_exact(predicted: str, reference: str) -> bool:
    return " ".join(predicted.split()) == " ".join(reference.split())


def check_numeric(predicted: str, reference: str) -> bool:
    p, r = _parse_number(predicted), _parse_number(reference)
    return p is not None and r is not None and p == r


class ExpressionError(ValueError):
    """The text is not an arithmetic expression of the allowed form."""


_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")
MAX_EXPR_CHARS = 200
MAX_DEPTH = 20


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """Evaluate `+ - * / ( )` over non-negative integers exactly; return (value, numbers used).

    A hand-written parser, never `eval`: anything else (names, `**`, unary minus, floats) is rejected.
    Division must be exact at every step (Countdown's rule), and inputs are bounded in length and depth.
    """
    s = text.replace("×", "*").replace("÷", "/").strip()
    if len(s) > MAX_EXPR_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPR_CHARS} characters")
    tokens: list[str] = []
    pos = 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m:
            if s[pos:].strip() == "":
                break
            raise ExpressionError(f"unexpected character {s[pos]!r} at {pos}")
        tokens.append(m.group(1) or m.group(2))
        pos = m.end()
    if not tokens:
        raise ExpressionError("empty expression")
    numbers: list[int] = []
    i = 0

    def peek() -> str | None:
        return tokens[i] if i < len(tokens) else None

    def take() -> str:
        nonlocal i
        i += 1
        return tokens[i - 1]

    def expr(depth: int) -> Fraction:
        value = term(depth)
        while peek() in ("+", "-"):
            op = take()
            rhs = term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(depth: int) -> Fraction:
        value = factor(depth)
        while peek() in ("*", "/"):
            op = take()
            rhs = factor(depth)
            if op == "*":
                value = value * rhs
            else:
                if rhs == 0 or (value / rhs).denominator != 1:
                    raise ExpressionError("division that is not exact")
                value = value / rhs
        return value

    def factor(depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise ExpressionError("parentheses nested too deeply")
        tok = peek()
        if tok is None:
            raise ExpressionError("expression ends too early")
        if tok == "(":
            take()
            value = expr(depth + 1)
            if peek() != ")":
                raise ExpressionError("missing ')'")
            take()
            return value
        if tok.isdigit():
            take()
            if len(tok) > 6:
                raise ExpressionError("number too long")
            numbers.append(int(tok))
            return Fraction(int(tok))
        raise ExpressionError(f"unexpected {tok!r}")

    value = expr(0)
    if i != len(tokens):
        raise ExpressionError(f"unexpected {tokens[i]!r} after the expression")
    return value, numbers


def check_countdown(predicted: str, numbers: list[int], target: int) -> bool:
    """True when `predicted` uses each given number at most once and equals `target`.

    An optional trailing `= target` is accepted ("3*5+7=22"); any other `=` is rejected.
    """
    text = predicted.strip()
    if "=" in text:
        lhs, _, rhs = text.partition("=")
        if "=" in rhs or _parse_number(rhs) != target:
            return False
        text = lhs
    try:
        value, used = parse_expression(text)
    except ExpressionError:
        return False
    available = Counter(numbers)
    if any(c > available[n] for n, c in Counter(used).items()):
        return False
    return value == target


def _check_by_name(name: str, predicted: str, example: Example) -> bool:
    if name == "exact":
        return check_exact(predicted, example.answer)
    if name == "numeric":
        return check_numeric(predicted, example.answer)
    if name == "countdown":
        return check_countdown(predicted, list(example.meta["numbers"]), int(example.meta["target"]))
    raise ValueError(f"unknown checker {name!r}; expected one of {CHECKERS}")


CHECKERS = ("exact", "numeric", "countdown")


# ----------------------------------------------------------------------------------------------------
# Tasks


class Task(ABC):
    """A family of problems. Subclasses implement `generate` (one problem from an rng) and `check`."""

    name = "task"
    in_corpus = True  # part of the built-in pretraining corpus (nanoseek.data.corpus)

    @abstractmethod
    def generate(self, rng: random.Random, difficulty: int) -> Example:
        """One problem drawn from `rng` (split filtering happens in `examples`)."""

    @abstractmethod
    def check(self, predicted_answer: str, example: Example) -> bool:
        """Whether the parsed answer text solves the example."""

    def examples(self, split: str, n: int, seed: int = 0, difficulty: int = 1) -> list[Example]:
        """`n` problems of one split, a pure function of the arguments.

        Problems are distinct while the split has enough of them. When it runs out, the train split
        repeats problems (as sampling with replacement would) and the test split returns fewer than n.
        """
        _check_split(split)
        if difficulty < 1:
            raise ValueError(f"difficulty must be >= 1, got {difficulty}")
        rng = random.Random(f"{self.name}:{split}:{seed}:{difficulty}")
        seen: set[str] = set()
        out: list[Example] = []
        attempts, budget = 0, 50 * n + 2000
        while len(out) < n and attempts < budget:
            attempts += 1
            ex = self.generate(rng, difficulty)
            if ex.prompt in seen or split_of(self.name, ex.prompt) != split:
                continue
            seen.add(ex.prompt)
            out.append(ex)
        if len(out) < n and split == "train" and out:
            out += [out[rng.randrange(len(out))] for _ in range(n - len(out))]
        return out


def _arith_steps(nums: list[int], ops: list[str]) -> tuple[int, list[str]]:
    """Evaluate with precedence, recording one line per operation: '*' left to right, then '+'/'-'."""
    nums, ops, steps = nums[:], ops[:], []
    k = 0
    while k < len(ops):
        if ops[k] == "*":
            r = nums[k] * nums[k + 1]
            steps.append(f"{nums[k]}*{nums[k + 1]}={r}")
            nums[k : k + 2] = [r]
            del ops[k]
        else:
            k += 1
    while ops:
        a, b, op = nums[0], nums[1], ops.pop(0)
        r = a + b if op == "+" else a - b
        steps.append(f"{a}{op}{b}={r}")
        nums[0:2] = [r]
    return nums[0], steps


class Arithmetic(Task):
    """`3+4*5=?` -> `23`, reasoning `4*5=20` / `3+20=23`.

    Difficulty d: d+2 operands up to 9, 20, 50, 99; factors of a product at most 12.
    """

    name = "arithmetic"

    def generate(self, rng: random.Random, difficulty: int) -> Example:
        n = difficulty + 2
        hi = (9, 20, 50)[difficulty - 1] if difficulty <= 3 else 99
        ops = [rng.choice("+-*") for _ in range(n - 1)]
        # Factors stay within the times table, so every step is one a small model can memorize.
        near_mul = [(k > 0 and ops[k - 1] == "*") or (k < n - 1 and ops[k] == "*") for k in range(n)]
        nums = [rng.randint(1, min(hi, 12) if near_mul[k] else hi) for k in range(n)]
        expr = "".join(f"{a}{o}" for a, o in zip(nums, ops)) + str(nums[-1])
        value, steps = _arith_steps(nums, ops)
        return Example(prompt=f"{expr}=?", answer=str(value), solution="\n".join(steps), task=self.name)

    def check(self, predicted_answer: str, example: Example) -> bool:
        return check_numeric(predicted_answer, example.answer)


def solve_countdown(numbers: list[int], target: int) -> tuple[str, list[str]] | None:
    """Depth-first search over pairwise combinations; returns (expression, steps) or None.

    Intermediate results stay positive integers (Countdown's rules), which also keeps the search small.
    """
    seen: set[tuple[int, ...]] = set()
    Item = tuple[int, str, tuple[str, ...]]  # value, expression, the steps that built it

    def search(items: list[Item]) -> tuple[str, list[str]] | None:
        for v, e, st in items:
            if v == target:
                return e, list(st)
        key = tuple(sorted(v for v, _, _ in items))
        if len(items) < 2 or key in seen:
            return None
        seen.add(key)
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                (a, ea, sa), (b, eb, sb) = items[i], items[j]
                rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                cands = []
                if i < j:
                    cands += [(a + b, f"{ea}+{eb}", "+"), (a * b, f"{_wrap(ea)}*{_wrap(eb)}", "*")]
                if a > b:
                    cands.append((a - b, f"{ea}-{_wrap(eb, minus=True)}", "-"))
                if b > 1 and a % b == 0:
                    cands.append((a // b, f"{_wrap(ea)}/{_wrap(eb, minus=True)}", "/"))
                for v, e, op in cands:
                    found = search(rest + [(v, e, sa + sb + (f"{a}{op}{b}={v}",))])
                    if found:
                        return found
        return None

    return search([(n, str(n), ()) for n in numbers])


def _wrap(e: str, minus: bool = False) -> str:
    # Parenthesize a sub-expression when precedence would otherwise change its meaning.
    if e.isdigit():
        return e
    depth, low = 0, False
    for c in e:
        depth += c == "("
        depth -= c == ")"
        if depth == 0 and (c in "+-" or (minus and c in "*/")):
            low = True
    return f"({e})" if low else e


class Countdown(Task):
    """`Make 22 from 3 5 7` -> e.g. `3*5+7`. Difficulty d: 3, 4, 4, 5.. numbers up to 9, 20, 50, 99."""

    name = "countdown"

    def generate(self, rng: random.Random, difficulty: int) -> Example:
        count = 3 if difficulty == 1 else (4 if difficulty <= 3 else 5)
        hi = (9, 20, 50)[difficulty - 1] if difficulty <= 3 else 99
        max_target = (30, 100, 200)[difficulty - 1] if difficulty <= 3 else 999
        while True:
            numbers = [rng.randint(1, hi) for _ in range(count)]
            # Build a target from a random combination of all numbers, so every problem is solvable.
            vals = numbers[:]
            rng.shuffle(vals)
            acc = vals[0]
            for v in vals[1:]:
                op = rng.choice("+-*/")
                if op == "+":
                    acc += v
                elif op == "-" and acc > v:
                    acc -= v
                elif op == "*":
                    acc *= v
                elif op == "/" and v > 1 and acc % v == 0:
                    acc //= v
                else:
                    acc += v
            if 1 <= acc <= max_target and acc not in numbers:
                break
        found = solve_countdown(numbers, acc)
        if found is None:  # cannot happen: the target was built from the numbers
            raise RuntimeError(f"countdown search failed for {numbers} -> {acc}")
        expr, steps = found
        listed = " ".join(map(str, numbers))
        return Example(prompt=f"Make {acc} from {listed}", answer=expr, solution="\n".join(steps),
                       task=self.name, meta=MappingProxyType({"numbers": tuple(numbers), "target": acc}))

    def check(self, predicted_answer: str, example: Example) -> bool:
        return check_countdown(predicted_answer, list(example.meta["numbers"]), int(example.meta["target"]))


class JsonlTask(Task):
    """User problems from a JSONL file; the split is the line's `split` field, else the prompt hash."""

    def __init__(self, name: str, rows: list[Example]):
        self.name = name
        self.rows = rows

    def generate(self, rng: random.Random, difficulty: int) -> Example:
        return self.rows[rng.randrange(len(self.rows))]

    def check(self, predicted_answer: str, example: Example) -> bool:
        return _check_by_name(str(example.meta.get("checker", "exact")), predicted_answer, example)

    def examples(self, split: str, n: int, seed: int = 0, difficulty: int = 1) -> list[Example]:
        _check_split(split)
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
        raise FileNotFoundError(f"task file {p} does not exist")
    task_name = name or p.stem
    rows: list[Example] = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("prompt", "answer"):
            if not isinstance(obj.get(key), (str, int, float)) or isinstance(obj.get(key), bool) or str(obj.get(key)).strip() == "":
                raise ValueError(f"{where}: missing or empty '{key}' (a string is required)")
        checker = obj.get("checker", "exact")
        if checker not in CHECKERS:
            raise ValueError(f"{where}: unknown checker {checker!r}; expected one of {CHECKERS}")
        meta: dict[str, object] = {"checker": checker}
        if "split" in obj:
            if obj["split"] not in SPLITS:
                raise ValueError(f"{where}: split must be one of {SPLITS}, got {obj['split']!r}")
            meta["split"] = obj["split"]
        if checker == "numeric" and _parse_number(str(obj["answer"])) is None:
            raise ValueError(f"{where}: checker 'numeric' needs a numeric answer, got {obj['answer']!r}")
        if checker == "countdown":
            nums = obj.get("numbers")
            if not isinstance(nums, list) or not nums or not all(isinstance(x, int) and not isinstance(x, bool) for x in nums):
                raise ValueError(f"{where}: checker 'countdown' needs 'numbers', a list of integers")
            if _parse_number(str(obj["answer"])) is None or _parse_number(str(obj["answer"])).denominator != 1:
                raise ValueError(f"{where}: checker 'countdown' needs the integer target as 'answer'")
            meta["numbers"], meta["target"] = tuple(nums), int(str(obj["answer"]).strip())
        rows.append(Example(prompt=str(obj["prompt"]), answer=str(obj["answer"]), solution=str(obj.get("solution", "")),
                            task=task_name, meta=MappingProxyType(meta)))
    if not rows:
        raise ValueError(f"{p}: no examples found")
    return JsonlTask(task_name, rows)


# program.py and passkey.py subclass Task, so they are imported here, after everything they need is defined
# (the package __init__ imports this module first, so this order holds whichever module a caller imports).
from nanoseek.data.passkey import Passkey  # noqa: E402
from nanoseek.data.program import ProgramOutput  # noqa: E402

TASKS: Mapping[str, Task] = MappingProxyType({t.name: t for t in (Arithmetic(), Countdown(), ProgramOutput(),
                                                                   Passkey())})


def get_task(name: str) -> Task:
    """A built-in task by name, or a JSONL task when `name` is a path to a .jsonl file."""
    if name in TASKS:
        return TASKS[name]
    if name.endswith(".jsonl") or Path(name).is_file():
        return load_jsonl_task(name)
    raise KeyError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)} (or give a .jsonl path)")


def check_answer(predicted_answer: str, example: Example) -> bool:
    """Check with the example's own checker (JSONL) or its built-in task's."""
    if "checker" in example.meta:
        return _check_by_name(str(example.meta["checker"]), predicted_answer, example)
    if example.task in TASKS:
        return TASKS[example.task].check(predicted_answer, example)
    raise KeyError(f"no checker for task {example.task!r}: not built in and the example names no checker")

