"""Text corpora: the built-in generated corpus, and readers for user text, JSONL and Parquet.

The built-in corpus needs no download. It is written by our own generators, deterministically from a
seed: train-split task problems as full chat transcripts with worked solutions in the R1 `<think>` format
(so the base model has seen the format before SFT, the role R1's cold-start data plays; section 2.3.1),
plus plain generated text (number facts, counting, short template stories) for general language.
Held-out (test) problems never appear in it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from nanoseek.data.chat import transcript_text
from nanoseek.data.tasks import TASKS

_NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo", "Mia", "Noor")
_THINGS = ("apples", "books", "coins", "cups", "eggs", "pens", "rocks", "shells", "stars", "toys")
_PLACES = ("the park", "the shop", "school", "the river", "the market", "the garden", "the library")
_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


def _number_fact(rng: random.Random) -> str:
    n = rng.randint(0, 99)
    parts = [f"{n} is {'even' if n % 2 == 0 else 'odd'}.", f"{n}+1={n + 1}.", f"{n}-1={n - 1}.", f"2*{n}={2 * n}."]
    if n <= 12:
        parts.append(f"{n} is spelled {_ONES[n]}.")
    if n > 1:
        parts.append(f"{n} is {'prime' if all(n % k for k in range(2, int(n ** 0.5) + 1)) else 'not prime'}.")
    rng.shuffle(parts)
    return " ".join(parts[: rng.randint(2, len(parts))])


def _times_table(rng: random.Random) -> str:
    a = rng.randint(1, 12)
    return "\n".join(f"{a}*{b}={a * b}" for b in range(1, 13))


def _counting(rng: random.Random) -> str:
    start, step = rng.randint(0, 50), rng.choice((1, 1, 2, 5, 10))
    if rng.random() < 0.3:
        return " ".join(str(start + step * (9 - k)) for k in range(10))  # counting down
    return " ".join(str(start + step * k) for k in range(10))


def _story(rng: random.Random) -> str:
    a, b = rng.sample(_NAMES, 2)
    thing, place = rng.choice(_THINGS), rng.choice(_PLACES)
    x, y = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        return (f"{a} went to {place} with {x} {thing}. {b} gave {a} {y} more {thing}. "
                f"Now {a} has {x + y} {thing}.")
    big, small = max(x, y) + 1, min(x, y)
    return (f"{a} had {big} {thing} at {place}. {a} gave {small} {thing} to {b}. "
            f"{a} has {big - small} {thing} left, and {b} is happy.")


_TEXT_GENERATORS = (_number_fact, _times_table, _counting, _story)


def builtin_corpus(n_docs: int, seed: int = 0, task_fraction: float = 0.6, max_difficulty: int = 2) -> Iterator[str]:
    """`n_docs` generated documents: task transcripts (train split only) mixed with plain text."""
    rng = random.Random(f"builtin-corpus:{seed}")
    tasks = sorted(name for name, task in TASKS.items() if task.in_corpus)
    # Problems come in blocks of 256 per (task, difficulty), each block a pure function of (seed, block).
    pools: dict[tuple[str, int], list] = {}
    blocks: dict[tuple[str, int], int] = {}
    for _ in range(n_docs):
        if rng.random() < task_fraction:
            key = (rng.choice(tasks), rng.randint(1, max_difficulty))
            if not pools.get(key):
                b = blocks.get(key, 0)
                blocks[key] = b + 1
                pools[key] = TASKS[key[0]].examples("train", 256, seed=seed * 1_000_003 + b, difficulty=key[1])[::-1]
            ex = pools[key].pop()
            yield transcript_text(ex.prompt, ex.solution, ex.answer)
        else:
            yield rng.choice(_TEXT_GENERATORS)(rng)


_TEXT_SUFFIXES = (".txt", ".md")


def read_corpus(path: str | Path) -> Iterator[str]:
    """Documents from a text file (one document), a folder (its .txt/.md/.jsonl/.parquet files in sorted
    order, recursively), JSONL (the `text` field of each line) or Parquet (the `text` column)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"corpus path {p} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (*_TEXT_SUFFIXES, ".jsonl", ".parquet"))
        if not files:
            raise ValueError(f"corpus folder {p} holds no .txt, .md, .jsonl or .parquet files")
        for f in files:
            yield from read_corpus(f)
        return
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(p)
    elif suffix == ".parquet":
        yield from _read_parquet(p)
    else:
        text = p.read_text(encoding="utf-8")
        if text.strip():
            yield text


def _read_jsonl(p: Path) -> Iterator[str]:
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{p}:{lineno}: expected an object with a string 'text' field")
            yield obj["text"]


def _read_parquet(p: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {p} needs pyarrow: pip install 'nanoseek[data]' (or pip install pyarrow)") from e
    f = pq.ParquetFile(p)
    if "text" not in f.schema_arrow.names:
        raise ValueError(f"{p}: no 'text' column (columns: {f.schema_arrow.names})")
    for batch in f.iter_batches(columns=["text"], batch_size=1024):
        for t in batch.column(0).to_pylist():
            if t is not None:
                yield t
