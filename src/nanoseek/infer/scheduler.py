"""Where a request's tokens live and when it runs: the engine's admission, cache blocks, prefix reuse,
preemption and prefill (a mixin of nanoseek.infer.engine.Engine, which holds the state it reads: the
paged cache, the waiting queue, the running batch, the stats).

* Admission: waiting requests are taken oldest first while there is a batch row and the pool has the
  blocks of their prompt (beyond those found in the prefix cache) plus a block of headroom per running
  request; a request whose first uncached block another request admitted in the same step is computing
  waits one step and then reads it from the cache.
* Prefix reuse (nanoseek.infer.cache): full blocks of committed tokens are registered under their chain
  key after every step; a prefill starts where the cached blocks of its prompt end, computing at least
  the last prompt token.
* Growth and preemption: before a decode step every running request gets the blocks its step writes to,
  oldest first; when the pool is dry the newest running request is preempted (vLLM's recompute
  preemption): its blocks are released (its full ones stay cached) and it goes back to the head of the
  queue, to resume later from its tokens so far without drawing a random number.
* Every release goes through `_release`, which empties the request's block table: a block is given
  back exactly once (BlockPool raises on a second release).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nanoseek.infer.cache import block_key
from nanoseek.infer.sampling import device_tensor

if TYPE_CHECKING:
    from nanoseek.infer.engine import Request


class Scheduler:
    @property
    def capacity(self) -> int:
        """The most tokens (prompt + generated) one request can have: the context, or less when the whole
        block pool holds fewer (a speculative step writes one position past the last token)."""
        return min(self.max_len, self.cache.num_blocks * self.block_size - 1)

    def cache_metrics(self) -> dict[str, float]:
        """The paged cache at this moment, for /metrics (nanoseek.serve.metrics) and benchmarks: blocks in
        use (held by running requests), cached (unreferenced, holding a reusable prefix), free, the total,
        bytes, and the prompt tokens of admitted requests found in the prefix cache / all of them."""
        pool, s = self.cache.pool, self.stats
        return {"block_size": self.block_size, "blocks_total": pool.num_blocks, "blocks_used": pool.used(),
                "blocks_cached": len(pool.lru), "blocks_free": len(pool.free),
                "bytes_total": self.cache.nbytes(), "prefix_hit_tokens": s.prompt_cache_hit_tokens,
                "prefix_query_tokens": s.prompt_cache_query_tokens,
                "evictions": pool.evictions, "preemptions": s.preemptions}

    def _blocks_needed(self, n_tokens: int) -> int:
        """Blocks for positions [0, n_tokens) plus the one a speculative step writes past the last token."""
        return self.cache.blocks_for(n_tokens + 1)

    def _weights_version(self) -> tuple | None:
        """How often each parameter was written in place (an optimizer step, load_state_dict); None when they
        do not track versions (created under inference_mode)."""
        try:
            return tuple(p._version for p in self._params)
        except RuntimeError:
            return None

    def _drop_stale_prefixes(self) -> None:
        """Cached rows are the model's outputs: once its weights change (GRPO trains the model its engine
        decodes with), no cached prefix may be reused."""
        if not self.prefix_caching:
            return
        seen = self._weights_version()
        if seen != self._weights_seen:
            self._weights_seen = seen
            self.cache.pool.forget_prefixes()

    def _release(self, r: Request) -> None:
        """Give r's blocks back to the pool (its registered full blocks stay cached); idempotent per request."""
        blocks, r.blocks, r.keys = r.blocks, [], []
        for b in blocks:
            self.cache.pool.release(b)

    def _reap(self) -> None:
        keep = []
        for r in self._running:
            if r.cancelled and r.finish_reason is None:
                self._finish(r, "cancelled")
            if r.finish_reason is None:
                keep.append(r)
            else:
                self._release(r)
        self._running = keep
        with self._lock:
            dropped = [r for r in self._waiting if r.cancelled]
            for r in dropped:
                self._waiting.remove(r)
        for r in dropped:
            self._finish(r, "cancelled")

    def _target(self, r: Request) -> int:
        """How many leading positions r's prefill must leave in the cache: the prompt when it starts, every
        position before the pending token when a preempted request resumes."""
        return r.pos if r.admitted else len(r.prompt)

    def _cached_prefix(self, r: Request, n: int) -> tuple[list[int], list[bytes], list[bytes]]:
        """The cached blocks (and their keys) that r's first n positions start with, at most (n - 1) //
        block_size of them so that at least position n - 1 is computed (its logits are needed); and the
        keys of the full blocks after them, which r's prefill will compute."""
        if not self.prefix_caching:
            return [], [], []
        pool, bs = self.cache.pool, self.block_size
        blocks, keys, parent = [], [], b""
        for k in range(n // bs):
            key = block_key(parent, [r.token(p) for p in range(k * bs, (k + 1) * bs)])
            parent = key
            if len(blocks) == len(keys) and k < (n - 1) // bs:
                # A speculative engine's MTP layer row at a block's last position depends on the next token too.
                b = pool.lookup(key, r.token((k + 1) * bs) if self.speculative else None)
                if b is not None:
                    blocks.append(b)
            keys.append(key)
        return blocks, keys[:len(blocks)], keys[len(blocks):]

    def _admit(self) -> list[Request]:
        """Take waiting requests, oldest first, while there is a batch row and the pool has their blocks."""
        out = []
        pool = self.cache.pool
        computing: set[bytes] = set()  # full blocks this step's prefills compute
        with self._lock:
            while self._waiting and len(self._running) + len(out) < self.max_batch_size:
                r = self._waiting[0]
                n = self._target(r)
                hits, keys, fresh = self._cached_prefix(r, n)
                if fresh and fresh[0] in computing:
                    break  # the prefix is being computed by a request admitted now: take it next step instead
                idle_hits = sum(1 for b in hits if pool.refs[b] == 0)  # counted in available() until retained
                # Beside others, keep a block of headroom per running request, so that admitting this one
                # does not preempt another at the very next step.
                headroom = len(self._running) + len(out)
                if self.cache.blocks_for(n) - len(hits) > pool.available() - idle_hits - headroom:
                    break  # wait for blocks (FIFO: a large request is not overtaken forever)
                self._waiting.popleft()
                for b in hits:
                    pool.retain(b)
                r.blocks, r.keys = list(hits), list(keys)
                while len(r.blocks) < self.cache.blocks_for(n):
                    r.blocks.append(pool.allocate())
                if not r.admitted:
                    r.cached_tokens = len(hits) * self.block_size
                    self.stats.prompt_cache_hit_tokens += r.cached_tokens
                    self.stats.prompt_cache_query_tokens += len(r.prompt)
                computing.update(fresh)
                out.append(r)
        self._running.extend(out)
        return out

    def _grow(self) -> None:
        """Give every running request the blocks its next step writes to, oldest first; when the pool is dry,
        preempt the newest running request (back to the head of the queue) until it is not."""
        pool = self.cache.pool
        writes = 2 if self.speculative else 1
        i = 0
        while i < len(self._running):
            r = self._running[i]
            need = self.cache.blocks_for(r.pos + writes)
            while len(r.blocks) < need:
                if pool.available():
                    r.blocks.append(pool.allocate())
                    continue
                victim = self._running.pop()  # the most recently admitted
                self._preempt(victim)
                if victim is r:
                    break
            else:
                i += 1

    def _preempt(self, r: Request) -> None:
        self._release(r)  # its full blocks were registered after its last step: they stay cached
        self.stats.preemptions += 1
        with self._lock:
            self._waiting.appendleft(r)

    def _register_full_blocks(self, reqs: list[Request]) -> None:
        """Offer every block of committed tokens that is now full for prefix reuse (chain keys)."""
        if not self.prefix_caching:
            return
        pool, bs = self.cache.pool, self.block_size
        for r in reqs:
            # Positions < pos are in the cache (main and MTP layers) and the token at pos is known; a request
            # that just stopped may have cached a draft past its last emitted token.
            limit = min(r.pos, len(r.prompt) + len(r.output) - 1)
            while (len(r.keys) + 1) * bs <= limit:
                k = len(r.keys)
                key = block_key(r.keys[-1] if r.keys else b"", [r.token(p) for p in range(k * bs, (k + 1) * bs)])
                pool.register(r.blocks[k], key, r.token((k + 1) * bs))
                r.keys.append(key)

    def _prefill(self, reqs: list[Request]) -> None:
        # Rows from position 0 run together (attention over the new tokens alone: the naive path); rows that
        # continue a cached prefix attend to it (the absorbed path), in a forward of their own.
        for group in ([r for r in reqs if not r.keys], [r for r in reqs if r.keys]):
            if group:
                self._prefill_group(group)
        self._register_full_blocks(reqs)

    def _prefill_group(self, reqs: list[Request]) -> None:
        """Compute positions [cached prefix, target) of each request; a new request samples its first token
        from the last position, a resumed one (preempted earlier) keeps its pending token."""
        bs = self.block_size
        starts = [len(r.keys) * bs for r in reqs]
        ends = [self._target(r) for r in reqs]
        lens = [e - s for s, e in zip(starts, ends)]
        T = max(lens)
        ids = self._tensor([[r.token(p) for p in range(s, e)] + [0] * (T - (e - s))  # right padding
                            for r, s, e in zip(reqs, starts, ends)])
        rows = torch.arange(len(reqs), device=self.device)
        last = device_tensor([n - 1 for n in lens], torch.long, self.device)
        view = self.cache.view([r.blocks for r in reqs], starts, T)
        logits, hidden = self.model.forward_cached(ids, view, logits_at=last)
        last_logits = logits[:, 0]  # [B, V]
        new = [i for i, r in enumerate(reqs) if not r.admitted]
        first = self._tensor([r.pending for r in reqs])  # resumed rows: the token they were about to feed
        logps, tops = [0.0] * len(reqs), [None] * len(reqs)
        if new:
            pick = self._tensor(new)
            sampled, new_logps, new_tops = self._sample(last_logits[pick], [reqs[i] for i in new])
            first[pick] = sampled
            for j, i in enumerate(new):
                logps[i] = new_logps[j]
                tops[i] = new_tops[j] if new_tops else None
            with self._lock:
                self.stats.prompt_tokens += sum(lens[i] for i in new)
        if self.speculative:
            # MTP position i sees hidden[i] and token i+1; the target's last position sees the first sample.
            nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
            nxt[rows, last] = first
            mtp_logits, _ = self.model.mtp_forward_cached(hidden, nxt, view, logits_at=last)
            self._set_drafts(reqs, mtp_logits[:, 0])
        for i, (r, t) in enumerate(zip(reqs, first.tolist())):  # the one read of the sampled ids
            if r.admitted:
                continue
            r.admitted = True
            r.pos = ends[i]
            r.pending = t
            self._emit(r, [t], [logps[i]], tops[i])
