"""Text corpora: the built-in generated corpus, and readers for user text, JSONL and Parquet.

The built-in corpus needs no download. It is written by our own generators, deterministically from a
seed: train-split task problems as full chat transcripts with worked solutions in the R1 `<think>` format
(so the base model has seen the format before SFT, the role R1's cold-start data plays; section 2.3.1),
plus plain generated text (number facts, counting, short template stories) for general language.
Held-out (test) problems never appear in it.

User corpora (`read_corpus`) are text files, folders of them, JSONL or Parquet. Reading never stops at a
badly encoded file: invalid UTF-8 is replaced and counted per file, binary files are skipped, and a
CorpusReport says what was read and what was skipped (`nanoseek train` prints it).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.data.chat import transcript_text
from nanoseek.data.tasks import TASKS
from nanoseek.errors import DataError, PathNotFound

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


# Files a folder source reads as plain text (one document each): prose and markup, and source code.
# Structured formats are read by field instead: JSONL (`text` of each line) and Parquet (`text` column).
# Anything else in a folder (images, PDFs, .json, .csv, files without a suffix) is skipped and counted.
TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".adoc", ".html", ".htm",
                 ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".ts", ".java", ".go", ".rs", ".sh")
RECORD_SUFFIXES = (".jsonl", ".parquet")
_REPLACEMENT = "\ufffd".encode("utf-8")


@dataclass
class CorpusReport:
    """What reading a corpus found: files read per suffix, documents, files skipped and why, and the files
    whose invalid UTF-8 was replaced (with the count of replaced byte sequences)."""
    read: Counter = field(default_factory=Counter)
    documents: int = 0
    skipped: Counter = field(default_factory=Counter)       # reason -> files
    skipped_first: dict = field(default_factory=dict)       # reason -> the first such file
    replaced: list = field(default_factory=list)            # (file, replaced byte sequences)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped[reason] += 1
        self.skipped_first.setdefault(reason, path)

    def lines(self) -> list[str]:
        files = sum(self.read.values())
        kinds = ", ".join(f"{n} {suffix or '(no suffix)'}" for suffix, n in sorted(self.read.items()))
        out = [f"corpus: read {self.documents:,} documents from {files} file(s) ({kinds})"]
        if self.skipped:
            why = ", ".join(f"{n} {reason} (e.g. {self.skipped_first[reason]})" for reason, n in
                            sorted(self.skipped.items()))
            out.append(f"corpus: skipped {sum(self.skipped.values())} file(s): {why}")
        for path, n in self.replaced[:10]:
            out.append(f"corpus: warning: {path} is not valid UTF-8: {n} undecodable byte sequence(s) replaced "
                       "with U+FFFD (convert it, e.g. iconv -f latin1 -t utf-8)")
        if len(self.replaced) > 10:
            out.append(f"corpus: warning: {len(self.replaced) - 10} more file(s) with invalid UTF-8 replaced")
        return out


def decode_text(data: bytes) -> tuple[str, int]:
    """UTF-8 text of `data` (a leading BOM dropped) and how many invalid byte sequences became U+FFFD."""
    try:
        return data.decode("utf-8-sig"), 0
    except UnicodeDecodeError:
        text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.count(_REPLACEMENT)  # U+FFFD already in the file is not a loss


def _folder_files(folder: Path, report: CorpusReport) -> list[Path]:
    files = []
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or any(part.startswith(".") for part in f.relative_to(folder).parts):
            continue  # hidden files and folders (.git, .DS_Store) are not corpus
        suffix = f.suffix.lower()
        if suffix in TEXT_SUFFIXES or suffix in RECORD_SUFFIXES:
            files.append(f)
        else:
            report.skip(f, f"not a text file ({suffix or 'no suffix'})")
    return files


def read_corpus(path: str | Path, report: CorpusReport | None = None) -> Iterator[str]:
    """Documents from a text file (one document, whatever its suffix), a folder (its files with a
    TEXT_SUFFIXES or RECORD_SUFFIXES suffix, recursively, in sorted order; hidden ones left out), JSONL
    (the `text` field of each line) or Parquet (the `text` column). Invalid UTF-8 never stops a run: it
    is replaced and counted, and binary files (NUL bytes) are skipped; `report` collects what was read
    and skipped (CorpusReport.lines() says it)."""
    p = Path(path)
    report = report if report is not None else CorpusReport()
    if not p.exists():
        raise PathNotFound("no such corpus file or folder", p, "check data.source")
    if p.is_dir():
        files = _folder_files(p, report)
        if not files:
            raise DataError("the corpus folder holds no readable files", p,
                            f"it reads {', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)}")
        for f in files:
            yield from _read_file(f, report)
        return
    yield from _read_file(p, report)


def _read_file(p: Path, report: CorpusReport) -> Iterator[str]:
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(p, report)
    elif suffix == ".parquet":
        yield from _read_parquet(p, report)
    else:
        data = p.read_bytes()
        if b"\x00" in data[:8192]:
            report.skip(p, "binary (NUL bytes; UTF-16 text must be converted to UTF-8)")
            return
        text, bad = decode_text(data)
        if bad:
            report.replaced.append((p, bad))
        report.read[suffix] += 1
        if text.strip():
            report.documents += 1
            yield text


def _read_jsonl(p: Path, report: CorpusReport) -> Iterator[str]:
    bad_total = 0
    report.read[".jsonl"] += 1
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line, bad = decode_text(raw)
            bad_total += bad
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg})", hint="fix or remove the line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{p}:{lineno}: expected an object with a string 'text' field")
            report.documents += 1
            yield obj["text"]
    if bad_total:
        report.replaced.append((p, bad_total))


def _read_parquet(p: Path, report: CorpusReport) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {p} needs pyarrow: pip install 'nanoseek[data]' (or pip install pyarrow)") from e
    try:
        f = pq.ParquetFile(p)
    except Exception as e:  # pyarrow's ArrowInvalid for a file that is not Parquet
        raise DataError(f"not a readable Parquet file ({e})", p) from None
    if "text" not in f.schema_arrow.names:
        raise DataError(f"{p}: no 'text' column (columns: {f.schema_arrow.names})")
    report.read[".parquet"] += 1
    for batch in f.iter_batches(columns=["text"], batch_size=1024):
        for t in batch.column(0).to_pylist():
            if t is not None:
                report.documents += 1
                yield t
