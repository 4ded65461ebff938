"""The engine's latent cache: fixed-size blocks from one pool, a block table per sequence, prefix reuse.

Per token and layer it holds what MLA caches (nanoseek.model.attention.CacheView: the normalised latent
and the rotated rope key, kv_lora_rank + qk_rope_head_dim values; DeepSeek-V2 section 2.1). Storage is
paged the way vLLM's PagedAttention pages a KV cache (Kwon et al. 2023): one tensor per stream of
[layers, blocks, block_size, W] (each stream the model's cache_layout names: a V3.2 model adds
"index_key", its indexer key per token and layer); a sequence owns a list of block ids (its block
table), position p of it lives in block table[p // block_size] at row p % block_size. A sequence takes blocks as it grows, so
memory follows the tokens actually held, not a preallocated maximum.

Prefix reuse: a full block is keyed by the hash of its chain, hash(parent block's key, the block's token
ids), so equal keys mean equal tokens from position 0 on and hence equal cache rows. A request whose
prompt starts with cached blocks takes them (reference counts) and computes only what follows. Blocks
nobody references stay cached until the pool needs them, then go least recently used first. Only full
blocks of committed tokens are ever shared, and nothing writes into a block while it is shared.

The model reaches this storage through the CacheView interface only (positions, write, read, the mask);
`kernel_cache` hands the same layout to the C++ decode block of nanoseek.infer.fast, which reads the
rows through the block table in place (no gather copy).
"""

from __future__ import annotations

import collections
import hashlib
import math
from array import array

import torch

from nanoseek.infer.sampling import device_tensor
from nanoseek.model.attention import CacheView


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The key of a full block: a 128-bit hash of its parent's key and its own token ids (BLAKE2b, so
    that a prompt crafted to collide with another user's prefix is not a practical attack)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class PoolError(RuntimeError):
    """Bookkeeping went wrong (a block released twice, the pool asked for more than it has)."""


class BlockPool:
    """Block ids, reference counts, the prefix table (key -> block) and the LRU order of cached blocks.

    A block is in one of three states: referenced (refs > 0, held by running sequences), cached (refs 0
    but holding a registered prefix; in `lru`, reusable until evicted) or free (refs 0, nothing worth
    keeping). `available()` counts the last two: a cached block is evicted when a fresh one is needed
    and the free list is empty.
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        # The token that followed the block in the sequence that filled it: a speculative engine's MTP layer
        # caches, at a block's last position, a row that depends on that next token too.
        self.next_token = [-1] * num_blocks
        self.table: dict[bytes, int] = {}
        self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.free = collections.deque(range(num_blocks))
        self.evictions = 0

    def available(self) -> int:
        return len(self.free) + len(self.lru)

    def used(self) -> int:
        return self.num_blocks - self.available()

    def allocate(self) -> int:
        """A fresh block (refcount 1): from the free list, else the least recently used cached block."""
        if self.free:
            b = self.free.popleft()
        elif self.lru:
            b, _ = self.lru.popitem(last=False)
            del self.table[self.key_of[b]]
            self.key_of[b] = None
            self.next_token[b] = -1
            self.evictions += 1
        else:
            raise PoolError("the block pool is exhausted")
        self.refs[b] = 1
        return b

    def retain(self, b: int) -> None:
        if self.refs[b] == 0:
            if b not in self.lru:
                raise PoolError(f"block {b} is neither held nor cached")
            del self.lru[b]
        self.refs[b] += 1

    def release(self, b: int) -> None:
        if self.refs[b] <= 0:
            raise PoolError(f"block {b} released more often than it was taken")
        self.refs[b] -= 1
        if self.refs[b] == 0:
            if self.key_of[b] is not None:
                self.lru[b] = None  # most recently used at the end
            else:
                self.free.append(b)

    def lookup(self, key: bytes, next_token: int | None = None) -> int | None:
        """The cached block under `key` (with `next_token` after it, when given), or None."""
        b = self.table.get(key)
        if b is None or (next_token is not None and self.next_token[b] != next_token):
            return None
        return b

    def register(self, b: int, key: bytes, next_token: int) -> None:
        """Offer a full held block for reuse under `key`; a key already cached keeps its first block."""
        if self.key_of[b] is None and key not in self.table:
            self.table[key] = b
            self.key_of[b] = key
            self.next_token[b] = next_token

    def forget_prefixes(self) -> None:
        """Unregister every block (the rows they hold are stale): cached ones become free, held ones stay
        with their sequences but are never reused."""
        for b in list(self.lru):
            self.free.append(b)
        self.lru.clear()
        self.table.clear()
        self.key_of = [None] * self.num_blocks
        self.next_token = [-1] * self.num_blocks

    def check_full(self) -> None:
        """Raise unless every block is unreferenced again (tests, and the engine after it stops)."""
        held = [b for b, r in enumerate(self.refs) if r]
        if held or self.available() != self.num_blocks:
            raise PoolError(f"{len(held)} block(s) still referenced: {held[:8]}")


class PagedCache:
    """[layers, num_blocks + 1, block_size, W] per stream, and the BlockPool that hands out the blocks.

    The extra last block is a sink: rows a forward computes past a sequence's own blocks (the right
    padding of a batched prefill) are written there and never read unmasked.
    """

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, widths: dict[str, int],
                 dtype: torch.dtype, device: torch.device | str):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.n_layers, self.block_size, self.num_blocks = n_layers, block_size, num_blocks
        self.widths = dict(widths)
        self.pool = BlockPool(num_blocks)
        self.sink = num_blocks
        # Zeros, not empty: masked reads of never-written rows must not be NaN (NaN * 0 is NaN).
        self.data = {name: torch.zeros(n_layers, num_blocks + 1, block_size, w, dtype=dtype, device=device)
                     for name, w in widths.items()}

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device | str) -> "PagedCache":
        n_layers, widths = model.cache_layout()
        return cls(n_layers, num_blocks, block_size, widths, dtype, device)

    @staticmethod
    def bytes_per_block(model: torch.nn.Module, block_size: int, dtype: torch.dtype) -> int:
        n_layers, widths = model.cache_layout()
        return n_layers * block_size * sum(widths.values()) * torch.empty((), dtype=dtype).element_size()

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.data.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.data.values())).device

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.data.values())

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    def view(self, block_tables: list[list[int]], start_pos: list[int] | torch.Tensor, n_new: int) -> "PagedView":
        """The window of one forward: row b (block table block_tables[b]) brings n_new tokens at start_pos[b].
        The engine passes start_pos as host ints: the view copies them to the device without a host sync."""
        return PagedView(self, block_tables, start_pos, n_new)


class PagedView(CacheView):
    """One forward's rows on a PagedCache. Everything that is the same for every layer (the block table,
    the flat rows written, the rows read) is computed once, on the cache's device."""

    def __init__(self, cache: PagedCache, block_tables: list[list[int]], start_pos: list[int] | torch.Tensor,
                 n_new: int):
        if isinstance(start_pos, torch.Tensor):
            super().__init__(start_pos, n_new)
        else:
            super().__init__(device_tensor(start_pos, torch.long, cache.device), n_new, starts=list(start_pos))
        bs = cache.block_size
        width = math.ceil(self.kv_len / bs)  # blocks covering positions [0, kv_len)
        for t in block_tables:
            if any(not (0 <= b < cache.num_blocks) for b in t):
                raise ValueError(f"block id out of range [0, {cache.num_blocks}) in a block table")
        self.cache, self.block_tables = cache, block_tables
        padded = [list(t[:width]) + [cache.sink] * (width - len(t)) for t in block_tables]
        self.table = device_tensor(padded, torch.long, cache.device)  # [B, width]
        # Flat row (in the [blocks * block_size, W] view of a layer) of each new token; past a row's own
        # blocks it lands in the sink.
        self.write_rows = (self.table.gather(1, self.positions // bs) * bs + self.positions % bs).contiguous()
        self._read_rows = None
        self._kernel_index = None

    def _flat(self, layer: int, name: str) -> torch.Tensor:
        store = self.cache.data[name][layer]
        return store.view(-1, store.shape[-1])

    def write(self, layer: int, name: str, rows_BTW: torch.Tensor) -> None:
        flat = self._flat(layer, name)
        flat[self.write_rows.flatten()] = rows_BTW.reshape(-1, flat.shape[-1]).to(flat.dtype)

    def read(self, layer: int, name: str) -> torch.Tensor:
        """[B, kv_len, W] gathered through the block table (the Python path; the C++ block reads in place)."""
        if self._read_rows is None:
            bs = self.cache.block_size
            rows = self.table[:, :, None] * bs + torch.arange(bs, device=self.table.device)
            self._read_rows = rows.flatten(1)[:, : self.kv_len].flatten()
        flat = self._flat(layer, name)
        return flat.index_select(0, self._read_rows).view(len(self.block_tables), self.kv_len, flat.shape[-1])

    def kernel_cache(self, layer: int, n_heads: int):
        """(this layer's latent store [blocks + 1, block_size, W], the batch's CacheIndex) for the C++ decode
        block, or None when the kernels cannot read this cache (they read and write fp32 on the CPU only)."""
        store = self.cache.data["latent"]
        if store.dtype != torch.float32 or not store.is_cpu:
            return None
        if self._kernel_index is None:
            from nanoseek.infer.fast import kernels

            self._kernel_index = kernels.cache_index(self.table, self.write_rows, self.cache.block_size,
                                                     self.kv_len, self.score_bias(n_heads))
        return store[layer], self._kernel_index
