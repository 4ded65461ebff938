"""The passkey-retrieval task: a number hidden at a random depth in a long filler text, asked for at the end.

The long-context probe of Mohtashami & Jaggi (arXiv 2305.16300, "Landmark Attention"), a cousin of the
needle-in-a-haystack test of the DeepSeek-V2/V3 reports: it checks that attention still reaches every
position of a long context, since the answer sits in exactly one sentence, anywhere in the text, and
everything else is irrelevant. For a sparse
attention model (V3.2's DSA) it asks whether the indexer selects the one token range that matters among
thousands.

Prompt: an instruction, `words` words of filler sentences (names, places and things, no digits, so the
only number in the text is the key), with "The pass key is K. Remember K." inserted between two
sentences at a uniformly random depth, then the question. The answer is the 5-digit key, checked
numerically. Difficulty d sets the filler length, 256 * 2**(d - 1) words (256 to 16,384 for d = 1..7).
The filler reuses the built-in corpus's story words, so the speedrun's tokenizer (2048 tokens) spends about
1.2 tokens per word: difficulty 5, 6, 7 are ~5K, ~10K, ~20K-token prompts. `make_passkey` builds any length
and depth (e.g. a depth x length grid).

This task is left out of the built-in pretraining corpus (`in_corpus = False`): its prompts are longer
than the corpus's training sequences, and it is a probe, not a skill the speedrun model should memorise.
"""

from __future__ import annotations

import random
from types import MappingProxyType

from nanoseek.data.tasks.base import Example, Task, check_numeric

MAX_DIFFICULTY = 7
# The words of the built-in corpus's stories (nanoseek.data.corpus), so its tokenizer knows them too.
_NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo", "Mia", "Noor")
_PLACES = ("the park", "the shop", "school", "the river", "the market", "the garden", "the library")
_THINGS = ("apples", "books", "coins", "cups", "eggs", "pens", "rocks", "shells", "stars", "toys")
INSTRUCTION = "A pass key is hidden in the text below. Find it and remember it."
QUESTION = "What is the pass key?"


def words_for(difficulty: int) -> int:
    if not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"passkey difficulty must be in [1, {MAX_DIFFICULTY}], got {difficulty}")
    return 256 * 2 ** (difficulty - 1)


def _sentence(rng: random.Random) -> str:
    a, b = rng.sample(_NAMES, 2)
    kind = rng.randrange(3)
    if kind == 0:
        return f"{a} went to {rng.choice(_PLACES)} with {b}."
    if kind == 1:
        return f"{a} gave {rng.choice(_THINGS)} to {b} at {rng.choice(_PLACES)}."
    return f"{a} had {rng.choice(_THINGS)}, and {b} is happy."


def make_passkey(rng: random.Random, words: int, depth: float | None = None, key: int | None = None) -> Example:
    """One passkey problem with about `words` filler words; depth in [0, 1] places the key sentence (0 =
    first, 1 = last; random when None), key a 5-digit number (random when None)."""
    if words < 1:
        raise ValueError(f"words must be >= 1, got {words}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = rng.randint(10000, 99999) if key is None else key
    sentences, n = [], 0
    while n < words:
        s = _sentence(rng)
        sentences.append(s)
        n += len(s.split())
    depth = rng.random() if depth is None else depth
    at = round(depth * len(sentences))
    needle = f"The pass key is {key}. Remember {key}."
    text = " ".join(sentences[:at] + [needle] + sentences[at:])
    return Example(prompt=f"{INSTRUCTION}\n{text}\n{QUESTION}", answer=str(key),
                   solution=f"The text says: the pass key is {key}.", task=Passkey.name,
                   meta=MappingProxyType({"key": key, "depth": at / len(sentences), "words": n}))


class Passkey(Task):
    """Passkey retrieval at 256 * 2**(difficulty - 1) filler words (difficulty 1..7: 256 to 16,384)."""

    name = "passkey"
    in_corpus = False

    def generate(self, rng: random.Random, difficulty: int) -> Example:
        return make_passkey(rng, words_for(difficulty))

    def check(self, predicted_answer: str, example: Example) -> bool:
        return check_numeric(predicted_answer, example.answer)
