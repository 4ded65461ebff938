"""Multi-step integer arithmetic with precedence, e.g. "3+4*5=?", worked one operation per line."""

from __future__ import annotations

import random

from nanoseek.data.tasks.base import Example, Task, check_numeric


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
