"""What every task shares: the Example record, the Task interface, the train/test split, and the plain
answer checkers (exact text, numeric value).

The split is decided by a hash of the prompt alone, so the train and test splits can never share a
problem, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

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


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def check_difficulty(difficulty: int) -> None:
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, got {difficulty}")


def parse_number(text: str) -> Fraction | None:
    """An integer, decimal or fraction ("7", "-3.5", "7/2", "1,000."), exactly; None for anything else."""
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
    p, r = parse_number(predicted), parse_number(reference)
    return p is not None and r is not None and p == r


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
        rng, drafts = self._distinct(split, n, seed, difficulty, self.generate)
        return self._fill_up(drafts, split, n, rng)

    def _distinct(self, split: str, n: int, seed: int, difficulty: int, draw) -> tuple[random.Random, list[Example]]:
        """Up to n distinct problems of the split drawn with `draw(rng, difficulty)`, and the rng after them."""
        check_split(split)
        check_difficulty(difficulty)
        rng = random.Random(f"{self.name}:{split}:{seed}:{difficulty}")
        seen: dict[str, Example] = {}
        attempts, budget = 0, 50 * n + 2000
        while len(seen) < n and attempts < budget:
            attempts += 1
            ex = draw(rng, difficulty)
            if ex.prompt not in seen and split_of(self.name, ex.prompt) == split:
                seen[ex.prompt] = ex
        return rng, list(seen.values())

    @staticmethod
    def _fill_up(out: list[Example], split: str, n: int, rng: random.Random) -> list[Example]:
        if len(out) < n and split == "train" and out:
            out = out + [out[rng.randrange(len(out))] for _ in range(n - len(out))]
        return out
