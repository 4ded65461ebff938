"""Countdown, TinyZero's RL task: reach a target from given numbers with + - * / (division only when exact).

Problems are solved by search when generated, so every one has a reference expression and worked steps.
Many expressions are correct, so a model's samples find rewards that GRPO can reinforce. The checker
reads the model's expression with a small recursive-descent parser (never `eval`).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction
from types import MappingProxyType

from nanoseek.data.tasks.base import Example, Task, parse_number


class ExpressionError(ValueError):
    """The text is not an arithmetic expression of the allowed form."""


_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")
MAX_EXPR_CHARS = 200
MAX_DEPTH = 20
MAX_DIGITS = 6


def tokenize_expression(text: str) -> list[str]:
    """Numbers, operators and parentheses of `text` (× and ÷ read as * and /), or ExpressionError."""
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
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)*;  term := factor (('*'|'/') factor)*;  factor := number | '(' expr ')'."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.i = tokens, 0
        self.numbers: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        self.i += 1
        return self.tokens[self.i - 1]

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor(depth)
            if op == "*":
                value = value * rhs
            else:
                if rhs == 0 or (value / rhs).denominator != 1:
                    raise ExpressionError("division that is not exact")
                value = value / rhs
        return value

    def factor(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise ExpressionError("parentheses nested too deeply")
        tok = self.peek()
        if tok is None:
            raise ExpressionError("expression ends too early")
        if tok == "(":
            self.take()
            value = self.expr(depth + 1)
            if self.peek() != ")":
                raise ExpressionError("missing ')'")
            self.take()
            return value
        if tok.isdigit():
            self.take()
            if len(tok) > MAX_DIGITS:
                raise ExpressionError("number too long")
            self.numbers.append(int(tok))
            return Fraction(int(tok))
        raise ExpressionError(f"unexpected {tok!r}")


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """Evaluate `+ - * / ( )` over non-negative integers exactly; return (value, numbers used).

    A hand-written parser, never `eval`: anything else (names, `**`, unary minus, floats) is rejected.
    Division must be exact at every step (Countdown's rule), and inputs are bounded in length and depth.
    """
    parser = _Parser(tokenize_expression(text))
    value = parser.expr(0)
    if parser.i != len(parser.tokens):
        raise ExpressionError(f"unexpected {parser.tokens[parser.i]!r} after the expression")
    return value, parser.numbers


def check_countdown(predicted: str, numbers: list[int], target: int) -> bool:
    """True when `predicted` uses each given number at most once and equals `target`.

    An optional trailing `= target` is accepted ("3*5+7=22"); any other `=` is rejected.
    """
    text = predicted.strip()
    if "=" in text:
        lhs, _, rhs = text.partition("=")
        if "=" in rhs or parse_number(rhs) != target:
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
            acc = _reachable_target(rng, numbers)
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


def _reachable_target(rng: random.Random, numbers: list[int]) -> int:
    """A random combination of all the numbers, so that every problem is solvable."""
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
    return acc
