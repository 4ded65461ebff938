"""The generation engine: continuous batching over the absorbed MLA latent cache, with MTP speculation.

* Cache: a paged latent cache, nanoseek.infer.cache.PagedCache (per token and layer only the normalized
  latent, kv_lora_rank values, plus the shared rotated rope key, qk_rope_head_dim values: DeepSeek-V2
  section 2.1, V3 section 2.1.1; a V3.2 model adds its indexer keys as a second stream, "index_key", as
  its cache_layout says), in blocks of `block_size` tokens from one pool of `cache_blocks` blocks
  (default: room for max_batch_size sequences of max_len tokens; or a byte budget). A request takes
  blocks as it grows; rolling back after a rejected draft is just a smaller start position. Each model
  call gets the cache's view for its rows (`cache.view(block_tables, start_pos, n_new)`), the interface
  the model's cached forward reads and writes.
* Prefix caching: full blocks of committed tokens are registered under the hash of their chain; a new
  request takes the cached blocks its prompt starts with and its prefill starts where they end (at least
  the last prompt token is always computed, for its logits). `Request.cached_tokens` says how many.
* Admission waits (FIFO) until the pool has blocks for a prompt; when a running request cannot grow, the
  most recently admitted one is preempted (its blocks released, its full blocks kept cached) and resumes
  later from its tokens so far, recomputing only what is no longer cached (vLLM's recompute preemption).
  Admission, blocks, prefix reuse, preemption and prefill live in nanoseek.infer.scheduler (a mixin).
* On a CPU the model runs with nanoseek.infer.fast.accelerate applied (the C++ decode paths; the same
  values as the pure model), from the Engine's construction on.
* Continuous batching (Orca, Yu et al. 2022): requests wait in a bounded queue, join the running batch
  between decode steps (their prompts prefilled together in one forward) and leave as soon as they finish
  or are cancelled, releasing their cache blocks for the next waiting request.
* MTP speculative decoding (V3 section 2.2, "MTP in inference"): the depth-1 MTP module drafts the token
  after next; one two-token `forward_cached` verifies it. Greedy rows accept a draft iff it equals the
  main model's argmax, so their output is exactly that of plain decoding; sampled rows use the
  speculative-sampling rule of Leviathan et al. 2023 / Chen et al. 2023 (accept with prob min(1, p/q),
  else resample from max(0, p - q)), which leaves the output distribution unchanged.

Two ways in: `Engine.generate_batch(prompts, params)` (synchronous: RL rollouts, `nanoseek.generate`)
and `Engine.start()` + `Engine.submit(...)` (a background thread; the server streams from callbacks).

State of a running request between steps (speculative invariant): the main cache holds positions
< pos; `pending` is the last emitted token, at position pos, not yet in the cache; with MTP the MTP
cache also holds positions < pos and `draft` is its guess for position pos + 1.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from nanoseek.errors import NanoseekError
from nanoseek.infer import fast
from nanoseek.infer.cache import PagedCache
from nanoseek.infer.logits import LogitsState, process, raw_logprobs
from nanoseek.infer.sampling import RowRandom, SamplingParams, device_tensor, draw, probs, sample
from nanoseek.infer.scheduler import Scheduler
from nanoseek.infer.speculative import speculative_tensors, token_logprobs  # noqa: F401 (token_logprobs re-exported)


class EngineError(NanoseekError, ValueError):
    """A request the engine cannot run (empty prompt, too long for the cache, bad token id, ...)."""


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429)."""


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token), "length" (max_tokens), "cancelled", "error" (see Engine.last_error)
    prompt_tokens: int
    logprobs: list[float] | None = None
    cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed


# on_event(request, new_token_ids, finished): called on the engine thread after every step that
# emits tokens for the request, and once more with finished=True (possibly with no new tokens). Their
# logprobs are the last len(new_token_ids) entries of request.logprobs / .top_logprobs during the call. An
# exception in it fails that request only (finish_reason "error", request.error says why).
EventFn = Callable[["Request", list[int], bool], None]


@dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    on_event: EventFn | None = None
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # when params.top_logprobs
    finish_reason: str | None = None
    error: str | None = None  # why it ended with "error"
    done: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    # engine-private decode state
    blocks: list[int] = field(default_factory=list)  # the block table: position p is in blocks[p // block_size]
    keys: list[bytes] = field(default_factory=list)  # chain keys of the leading full blocks registered so far
    admitted: bool = False  # prefilled at least once (a preempted request resumes instead of starting)
    pos: int = 0
    pending: int = 0
    draft: int = 0
    draft_q: torch.Tensor | None = None  # the draft distribution, for sampled speculative rows
    generator: RowRandom | None = None  # the request's uniforms, from its own seeded generator
    logits_state: LogitsState | None = None  # bias, penalties, grammar (nanoseek.infer.logits)
    cancelled: bool = False

    def cancel(self) -> None:
        """Ask the engine to drop this request; its blocks are released before the next decode step."""
        self.cancelled = True

    def result(self, timeout: float | None = None) -> Completion:
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout}s")
        return Completion(list(self.output), self.finish_reason or "cancelled", len(self.prompt),
                          list(self.logprobs) if self.params.logprobs else None, self.cached_tokens)

    def token(self, p: int) -> int:
        """The token at position p of this request's sequence (prompt, then output)."""
        n = len(self.prompt)
        return self.prompt[p] if p < n else self.output[p - n]


@dataclass
class EngineStats:
    requests_submitted: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    busy_seconds: float = 0.0
    prompt_cache_hit_tokens: int = 0   # prompt tokens of admitted requests found in the prefix cache
    prompt_cache_query_tokens: int = 0  # prompt tokens of admitted requests (hits + misses)
    preemptions: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        q = self.prompt_cache_query_tokens
        return self.prompt_cache_hit_tokens / q if q else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Engine(Scheduler):
    def __init__(self, model: torch.nn.Module, *, max_batch_size: int = 16, max_len: int | None = None,
                 max_queue: int = 256, speculative: bool = False, dtype: torch.dtype | None = None,
                 block_size: int = 64, cache_blocks: int | None = None, cache_bytes: int | None = None,
                 prefix_caching: bool = True):
        cfg = model.config
        if speculative and not getattr(cfg, "num_nextn_predict_layers", 0):
            raise EngineError("speculative decoding needs an MTP module (num_nextn_predict_layers >= 1)")
        if max_batch_size < 1:
            raise EngineError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = fast.accelerate(model.eval())  # a no-op off the CPU
        self.config = cfg
        self.max_batch_size = max_batch_size
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_queue = max_queue
        self.speculative = speculative
        param = next(model.parameters())
        self.device = param.device
        if block_size < 1:
            raise EngineError(f"block_size must be >= 1, got {block_size}")
        if cache_blocks is not None and cache_bytes is not None:
            raise EngineError("give the cache budget as cache_blocks or as cache_bytes, not both")
        cache_dtype = dtype or param.dtype
        if cache_bytes is not None:
            per_block = PagedCache.bytes_per_block(model, block_size, cache_dtype)
            cache_blocks = int(cache_bytes) // per_block
            if cache_blocks < 1:
                raise EngineError(f"a cache budget of {int(cache_bytes)} bytes holds no block of {block_size} "
                                  f"tokens ({per_block} bytes each)")
        if cache_blocks is None:  # as much as max_batch_size sequences of max_len tokens (+ the draft) need
            cache_blocks = max_batch_size * math.ceil((self.max_len + 1) / block_size)
        if cache_blocks < 1:
            raise EngineError(f"cache_blocks must be >= 1, got {cache_blocks}")
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.cache = PagedCache.for_model(model, cache_blocks, block_size, dtype=cache_dtype, device=self.device)
        self._params = list(self.model.parameters())  # walked once: a module-tree walk per step costs ~ms
        self._weights_seen = self._weights_version()
        self.stats = EngineStats()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _waiting and stats counters touched by submitters
        self._step_lock = threading.Lock()  # one step at a time (the cache is not shareable)
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.last_error: str | None = None

    # ------------------------------------------------------------------ public API
    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        params.validate()
        if not prompt:
            raise EngineError("the prompt is empty: at least one token is needed")
        V = self.config.vocab_size
        bad = [t for t in prompt if not (0 <= int(t) < V)]
        if bad:
            raise EngineError(f"prompt token id(s) {bad[:5]} out of range for vocab_size {V}")
        if len(prompt) + params.max_tokens > self.max_len:
            raise EngineError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                              f"context of {self.max_len} tokens")
        need = self._blocks_needed(len(prompt) + params.max_tokens)
        if need > self.cache.num_blocks:
            raise EngineError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) needs {need} cache "
                              f"blocks of {self.block_size} tokens, more than the whole pool of "
                              f"{self.cache.num_blocks} blocks can ever hold")

    def submit(self, prompt: list[int], params: SamplingParams, on_event: EventFn | None = None,
               *, bounded: bool = True, matcher=None) -> Request:
        """Queue a request (raises EngineError for a bad one, QueueFull when the queue is at its bound).

        `matcher` (a fresh nanoseek.infer.grammar.Matcher) constrains the output; its EOS ids should be
        among params.stop_token_ids."""
        prompt = [int(t) for t in prompt]
        self.validate(prompt, params)
        V = self.config.vocab_size
        bad = [t for t in params.logit_bias if t >= V]
        if bad:
            raise EngineError(f"logit_bias token id(s) {bad[:5]} out of range for vocab_size {V}")
        req = Request(next(self._ids), prompt, params, on_event)
        req.generator = RowRandom(params.make_generator())
        state = LogitsState.make(params, V, self.device, matcher)
        req.logits_state = state if state.active else None
        with self._lock:
            # Requests about to take a free batch row at the next step do not count against the queue bound.
            if bounded and len(self._waiting) >= self.max_queue + self.free_slots():
                self.stats.requests_rejected += 1
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self._waiting.append(req)
            self.stats.requests_submitted += 1
            self._wake.notify()
        return req

    def generate_batch(self, prompts: list[list[int]],
                       params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Run all prompts to completion (up to max_batch_size at once) and return their completions."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise EngineError(f"got {len(prompts)} prompts but {len(plist)} SamplingParams")
        for p, sp in zip(prompts, plist):
            self.validate([int(t) for t in p], sp)
        reqs = [self.submit(p, sp, bounded=False) for p, sp in zip(prompts, plist)]
        if self.running:
            for r in reqs:
                r.done.wait()
        else:
            while not all(r.done.is_set() for r in reqs):
                self.step()
        return [r.result() for r in reqs]

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Engine":
        """Run the step loop on a background thread (idempotent)."""
        if not self.running:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self, keep_running: Callable[[], bool] = lambda: True) -> None:
        """Run the step loop on the calling thread until request_stop() or until keep_running() is false.

        The server runs the engine on the main thread and HTTP on another: with GNU OpenMP, a second thread
        that runs parallel regions gets a second worker pool, and with more pool threads than cores libgomp
        stops spin-waiting, so every parallel region pays a futex wake-up (benchmarks/bench_kernels.py times a
        decode step on both threads: benchmarks/results/kernels.json).
        """
        self._thread = threading.current_thread()
        self._stop = False
        try:
            self._loop(keep_running)
        finally:
            self._thread = None

    def request_stop(self) -> None:
        """Ask the loop to end after the current step; safe to call from a signal handler (takes no lock)."""
        self._stop = True

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def queue_depth(self) -> int:
        return len(self._waiting)

    def batch_size(self) -> int:
        return len(self._running)

    def free_slots(self) -> int:
        """Batch rows not held by a running request (max_batch_size when idle)."""
        return max(0, self.max_batch_size - len(self._running))

    # ------------------------------------------------------------------ the step loop
    def _loop(self, keep_running: Callable[[], bool] | None = None) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._running:
                    # With keep_running, wake up now and then to ask it (and to see a request_stop()).
                    self._wake.wait(None if keep_running is None else 0.25)
                    if keep_running is not None and not keep_running():
                        self._stop = True
                if self._stop:
                    break
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - keep serving: fail the batch that hit the error
                self._fail_running(e)
        with self._lock:
            left = list(self._running) + list(self._waiting)
            self._waiting.clear()
        self._running = []
        for r in left:
            self._finish(r, "cancelled")
            self._release(r)

    def _fail_running(self, error: Exception) -> None:
        self.last_error = f"{type(error).__name__}: {error}"
        for r in self._running:
            r.error = r.error or self.last_error
            self._finish(r, "error")
            self._release(r)
        self._running = []

    def step(self) -> None:
        """Admit waiting requests (prefill) and advance every running one by one decode step."""
        with self._step_lock, torch.inference_mode():
            t0 = time.perf_counter()
            self._reap()
            self._drop_stale_prefixes()
            admitted = self._admit()
            if admitted:
                self._prefill(admitted)
                self._reap()
            if self._running:
                self._grow()
            if self._running:
                if self.speculative:
                    self._decode_speculative()
                else:
                    self._decode_plain()
                self.stats.decode_steps += 1
                self._register_full_blocks(self._running)
                self._reap()
            self.stats.busy_seconds += time.perf_counter() - t0

    def _finish(self, r: Request, reason: str) -> None:
        """End r once (later calls are no-ops): count it, tell its callback, wake result() waiters."""
        if r.finish_reason is not None:
            return
        r.finish_reason = reason
        with self._lock:
            if reason == "cancelled":
                self.stats.requests_cancelled += 1
            else:
                self.stats.requests_finished += 1
        self._notify(r, [], True)
        r.done.set()

    def _notify(self, r: Request, tokens: list[int], finished: bool) -> bool:
        """Call r's callback; an exception fails r alone (False), never the step."""
        if r.on_event is None:
            return True
        try:
            r.on_event(r, tokens, finished)
            return True
        except Exception as e:  # noqa: BLE001 - a client's callback must not take the engine down
            r.error = r.error or f"the request's callback failed: {type(e).__name__}: {e}"
            return False

    def _emit(self, r: Request, tokens: list[int], logps: list[float],
              tops: list[list[tuple[int, float]]] | None = None) -> None:
        """Append tokens in order, stopping at a stop token or max_tokens (later tokens are dropped)."""
        if r.finish_reason is not None:
            return
        sp = r.params
        new = []
        for i, t in enumerate(tokens):
            new.append(t)
            r.output.append(t)
            if sp.logprobs:
                r.logprobs.append(logps[i])
                if sp.top_logprobs:
                    r.top_logprobs.append(tops[i] if tops else [])
            if t in sp.stop_token_ids or len(r.output) >= sp.max_tokens:
                break
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        self.stats.generated_tokens += len(new)
        if r.logits_state is not None and not r.logits_state.observe(new):
            r.error = f"the output left its grammar: {r.logits_state.matcher.error}"
            self._finish(r, "error")
            return
        if not r.cancelled and not self._notify(r, new, False):
            self._finish(r, "error")
            return
        last = r.output[-1]
        if last in sp.stop_token_ids:
            self._finish(r, "stop")
        elif len(r.output) >= sp.max_tokens:
            self._finish(r, "length")

    # ------------------------------------------------------------------ model calls
    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return device_tensor(rows, torch.long, self.device)  # no host sync (see sampling.device_tensor)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]):
        """Process (bias, penalties, grammar) and sample one token per row of logits [B, V]: the tokens [B]
        on the device, and per row the raw log-probability and top alternatives when any row asks for them."""
        params = [r.params for r in reqs]
        want = any(p.logprobs for p in params)
        if want:  # the raw distribution, before processing changes the logits in place
            lp, top_ids, top_vals = raw_logprobs(logits, max(p.top_logprobs for p in params))
        tokens = sample(process(logits, [r.logits_state for r in reqs]), params, [r.generator for r in reqs])
        if not want:
            return tokens, [0.0] * len(reqs), None
        tops = None if top_ids is None else [[list(zip(i, v))[: p.top_logprobs]] for i, v, p in
                                              zip(top_ids.tolist(), top_vals.tolist(), params)]
        return tokens, lp.gather(-1, tokens[:, None])[:, 0].tolist(), tops

    def _set_drafts(self, reqs: list[Request], mtp_logits: torch.Tensor) -> None:
        params = [r.params for r in reqs]
        if all(p.greedy for p in params):
            for r, d in zip(reqs, mtp_logits.argmax(-1).tolist()):
                r.draft = d
            return
        q = probs(mtp_logits, params)
        for i, (r, d) in enumerate(zip(reqs, draw(q, [r.generator for r in reqs], params).tolist())):
            r.draft = d
            r.draft_q = None if r.params.greedy else q[i]

    def _decode_plain(self) -> None:
        reqs = self._running
        ids = self._tensor([[r.pending] for r in reqs])
        view = self.cache.view([r.blocks for r in reqs], [r.pos for r in reqs], 1)
        logits, _ = self.model.forward_cached(ids, view)
        nxt, logps, tops = self._sample(logits[:, 0], reqs)
        for i, (r, t) in enumerate(zip(reqs, nxt.tolist())):
            r.pos += 1
            r.pending = t
            self._emit(r, [t], [logps[i]], tops[i] if tops else None)

    def _decode_speculative(self) -> None:
        reqs = self._running
        B = len(reqs)
        ids = self._tensor([[r.pending, r.draft] for r in reqs])
        view = self.cache.view([r.blocks for r in reqs], [r.pos for r in reqs], 2)
        logits, hidden = self.model.forward_cached(ids, view)  # [B, 2, V], [B, 2, D]
        accepted_t, token_t, lp_t, top_t = speculative_tensors(logits, reqs)
        # The step's one read of sampled ids (acceptance flags with them), plus logprobs when asked for.
        read = torch.stack([accepted_t.long(), token_t], 1).tolist()
        accepted = [bool(a) for a, _ in read]
        lps = lp_t.tolist() if lp_t is not None else None
        tops = None
        if top_t is not None:  # ids, values [B, 2, k] -> per row, per position, (id, logprob) pairs
            ids, vals = top_t[0].tolist(), top_t[1].tolist()
            tops = [[list(zip(ids[b][j], vals[b][j]))[: reqs[b].params.top_logprobs] for j in range(2)]
                    for b in range(B)]
        emitted = [[r.draft, b] if ok else [b] for r, (ok, b) in zip(reqs, read)]
        self.stats.drafted += B
        self.stats.accepted += sum(accepted)
        # Refill the MTP cache at pos (and pos+1 when accepted) and draft the next token. A rejected row
        # writes garbage at pos+1 of the MTP cache; it is overwritten before it can be attended to.
        nxt = self._tensor([[e[0], e[-1]] for e in emitted])
        mtp_logits, _ = self.model.mtp_forward_cached(hidden, nxt, view)  # the same positions as the verify
        pick = self._tensor([1 if ok else 0 for ok in accepted])
        self._set_drafts(reqs, mtp_logits[torch.arange(B, device=self.device), pick])
        for i, r in enumerate(reqs):
            toks = emitted[i]
            logps = lps[i][: len(toks)] if lps is not None else [0.0] * len(toks)
            r.pos += len(toks)
            r.pending = toks[-1]
            self._emit(r, toks, logps, tops[i][: len(toks)] if tops else None)
