"""Packed token shards on disk and a deterministic, resumable, rank-split batch sampler.

`tokenize_to_shards` writes every document as bos + tokens + eos into one packed stream, cut into flat
numpy files (uint16 when the vocabulary fits, else uint32) with an `index.json`. `PackedDataset` views the
stream as windows of seq_len + 1 tokens (consecutive windows share one token) and serves batches.

Data order is a pure function of (seed, step): global sample g = step * batch_size + row lives in epoch
g // n_windows at position g % n_windows of that epoch's permutation, a numpy permutation seeded by
(seed, epoch). Resuming therefore needs only the step. The global batch is the same for every world
size; rank r takes the CONTIGUOUS chunk of rows [r * B/W, (r + 1) * B/W), so concatenating the ranks'
batches in rank order gives back the global batch (the V3 report's global batch semantics).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from nanoseek.data.tokenizer import Tokenizer

INDEX_FILE = "index.json"


def tokenize_to_shards(texts: Iterable[str], tokenizer: Tokenizer, out_dir: str | Path,
                       shard_tokens: int = 1 << 24, batch_docs: int = 512, progress: bool = True) -> dict:
    """Tokenize `texts` into packed shards under `out_dir`; returns the index (also saved as index.json)."""
    from tqdm.auto import tqdm

    if shard_tokens < 2:
        raise ValueError(f"shard_tokens must be >= 2, got {shard_tokens}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    shards: list[dict] = []
    buf = np.empty(shard_tokens, dtype=dtype)
    fill, n_docs, total = 0, 0, 0

    def flush() -> None:
        nonlocal fill
        if fill == 0:
            return
        name = f"shard_{len(shards):05d}.bin"
        buf[:fill].tofile(out / name)
        shards.append({"file": name, "tokens": int(fill)})
        fill = 0

    def add(ids: list[int]) -> None:
        nonlocal fill
        arr = np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=dtype)
        pos = 0
        while pos < len(arr):  # a document may straddle two shards: the stream is continuous
            take = min(len(arr) - pos, shard_tokens - fill)
            buf[fill:fill + take] = arr[pos:pos + take]
            fill += take
            pos += take
            if fill == shard_tokens:
                flush()

    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress)
    batch: list[str] = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"document {n_docs + len(batch)} is {type(text).__name__}, expected str")
        batch.append(text)
        if len(batch) == batch_docs:
            for ids in tokenizer.encode_batch(batch):
                add(ids)
                total += len(ids) + 2
            n_docs += len(batch)
            bar.update(len(batch))
            bar.set_postfix(tokens=total)
            batch = []
    if batch:
        for ids in tokenizer.encode_batch(batch):
            add(ids)
            total += len(ids) + 2
        n_docs += len(batch)
        bar.update(len(batch))
    bar.close()
    flush()
    index = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
             "eos_id": tokenizer.eos_id, "n_docs": n_docs, "total_tokens": total, "shards": shards}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


class PackedDataset:
    """Windows of `seq_len + 1` tokens over the packed stream; `batch(step, ...)` is pure in its arguments."""

    def __init__(self, path: str | Path, seq_len: int):
        self.path = Path(path)
        index_file = self.path / INDEX_FILE
        if not index_file.is_file():
            raise FileNotFoundError(f"no {INDEX_FILE} in {self.path}: run tokenize_to_shards first")
        self.index = json.loads(index_file.read_text())
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.vocab_size: int = self.index["vocab_size"]
        dtype = np.dtype(self.index["dtype"])
        self._shards = []
        for s in self.index["shards"]:
            f = self.path / s["file"]
            if not f.is_file() or f.stat().st_size != s["tokens"] * dtype.itemsize:
                raise ValueError(f"shard {f} is missing or its size does not match {INDEX_FILE}")
            self._shards.append(np.memmap(f, dtype=dtype, mode="r", shape=(s["tokens"],)))
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])  # global offset of each shard
        self.total_tokens = int(self._starts[-1])
        self.n_windows = (self.total_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"{self.path} holds {self.total_tokens} tokens, too few for one window of "
                             f"seq_len {seq_len} (+1 for the targets)")
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}  # only a cache of pure functions

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) >= 2:
                self._perm_cache.pop(next(iter(self._perm_cache)))
            self._perm_cache[key] = np.random.default_rng([seed, epoch]).permutation(self.n_windows)
        return self._perm_cache[key]

    def _tokens(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        pos = 0
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while pos < length:
            offset = start + pos - int(self._starts[shard])
            take = min(length - pos, len(self._shards[shard]) - offset)
            out[pos:pos + take] = self._shards[shard][offset:offset + take]
            pos += take
            shard += 1
        return out

    def window_ids(self, step: int, batch_size: int, seed: int = 0) -> list[int]:
        """Window indices of the global batch at `step`."""
        ids = []
        for g in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(g, self.n_windows)
            ids.append(int(self._permutation(seed, epoch)[pos]))
        return ids

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) LongTensors [batch_size // world, seq_len] of this rank; targets = inputs shifted by 1."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of size {world}")
        if batch_size % world:
            raise ValueError(f"global batch_size {batch_size} is not divisible by world size {world}")
        per = batch_size // world
        windows = self.window_ids(step, batch_size, seed)[rank * per:(rank + 1) * per]
        rows = np.stack([self._tokens(w * self.seq_len, self.seq_len + 1) for w in windows])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()
