"""The generation engine: continuous batching over the absorbed MLA latent cache, with MTP speculation.

* Cache: one preallocated nanoseek.infer.cache.SlotCache (per token and layer only the normalized
  latent, kv_lora_rank values, plus the shared rotated rope key, qk_rope_head_dim values: DeepSeek-V2
  section 2.1, V3 section 2.1.1). A request owns one slot from admission to its end; rolling back after a
  rejected draft is just a smaller start position. Each model call gets the cache's view for its rows
  (`cache.view(slots, start_pos, n_new)`), the interface the model's cached forward reads and writes.
* On a CPU the model runs with nanoseek.infer.fast.accelerate applied (the C++ decode paths; the same
  values as the pure model), from the Engine's construction on.
* Continuous batching (Orca, Yu et al. 2022): requests wait in a bounded queue, join the running batch
  between decode steps (their prompts prefilled together in one forward) and leave as soon as they finish
  or are cancelled, freeing their slot for the next waiting request.
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
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from nanoseek.errors import NanoseekError
from nanoseek.infer import fast
from nanoseek.infer.cache import SlotCache
from nanoseek.infer.sampling import SamplingParams, device_tensor, draw, probs, sample, verify_drafts


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


# on_event(request, new_token_ids, finished): called on the engine thread after every step that
# emits tokens for the request, and once more with finished=True (possibly with no new tokens).
EventFn = Callable[["Request", list[int], bool], None]


@dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    on_event: EventFn | None = None
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    # engine-private decode state
    slot: int = -1
    pos: int = 0
    pending: int = 0
    draft: int = 0
    draft_q: torch.Tensor | None = None  # the draft distribution, for sampled speculative rows
    generator: torch.Generator | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """Ask the engine to drop this request; its slot is freed before the next decode step."""
        self.cancelled = True

    def result(self, timeout: float | None = None) -> Completion:
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout}s")
        return Completion(list(self.output), self.finish_reason or "cancelled", len(self.prompt),
                          list(self.logprobs) if self.params.logprobs else None)


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

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Engine:
    def __init__(self, model: torch.nn.Module, *, max_batch_size: int = 16, max_len: int | None = None,
                 max_queue: int = 256, speculative: bool = False, dtype: torch.dtype | None = None):
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
        # Two spare positions: a speculative step writes the draft one past the last real token.
        self.cache = SlotCache.for_model(model, max_batch_size, self.max_len + 2, dtype=dtype or param.dtype,
                                         device=self.device)
        self.stats = EngineStats()
        self._free_slots = list(range(max_batch_size - 1, -1, -1))
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

    def submit(self, prompt: list[int], params: SamplingParams, on_event: EventFn | None = None,
               *, bounded: bool = True) -> Request:
        """Queue a request (raises EngineError for a bad one, QueueFull when the queue is at its bound)."""
        prompt = [int(t) for t in prompt]
        self.validate(prompt, params)
        req = Request(next(self._ids), prompt, params, on_event)
        req.generator = params.make_generator()
        with self._lock:
            # Requests about to take a free slot at the next step do not count against the queue bound.
            if bounded and len(self._waiting) >= self.max_queue + len(self._free_slots):
                self.stats.requests_rejected += 1
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self._waiting.append(req)
            self.stats.requests_submitted += 1
            self._wake.notify()
        return req

    def generate_batch(self, prompts: list[list[int]],
                       params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Run all prompts to completion (as many at once as there are slots) and return their completions."""
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
        self._running.clear()
        self._free_slots = list(range(self.max_batch_size - 1, -1, -1))
        for r in left:
            self._finish(r, "cancelled")

    def _fail_running(self, error: Exception) -> None:
        self.last_error = f"{type(error).__name__}: {error}"
        for r in self._running:
            if r.finish_reason is None:
                self._finish(r, "error")
            self._free_slots.append(r.slot)
        self._running = []

    def step(self) -> None:
        """Admit waiting requests (prefill) and advance every running one by one decode step."""
        with self._step_lock, torch.inference_mode():
            t0 = time.perf_counter()
            self._reap()
            admitted = self._admit()
            if admitted:
                self._prefill(admitted)
                self._reap()
            if self._running:
                if self.speculative:
                    self._decode_speculative()
                else:
                    self._decode_plain()
                self.stats.decode_steps += 1
                self._reap()
            self.stats.busy_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ scheduling
    def _reap(self) -> None:
        keep = []
        for r in self._running:
            if r.cancelled and r.finish_reason is None:
                self._finish(r, "cancelled")
            if r.finish_reason is None:
                keep.append(r)
            else:
                self._free_slots.append(r.slot)
        self._running = keep
        with self._lock:
            dropped = [r for r in self._waiting if r.cancelled]
            for r in dropped:
                self._waiting.remove(r)
        for r in dropped:
            self._finish(r, "cancelled")

    def _admit(self) -> list[Request]:
        out = []
        with self._lock:
            while self._waiting and self._free_slots:
                r = self._waiting.popleft()
                r.slot = self._free_slots.pop()
                out.append(r)
        self._running.extend(out)
        return out

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        with self._lock:
            if reason == "cancelled":
                self.stats.requests_cancelled += 1
            else:
                self.stats.requests_finished += 1
        if r.on_event is not None:
            r.on_event(r, [], True)
        r.done.set()

    def _emit(self, r: Request, tokens: list[int], logps: list[float]) -> None:
        """Append tokens in order, stopping at a stop token or max_tokens (later tokens are dropped)."""
        sp = r.params
        new = []
        for i, t in enumerate(tokens):
            new.append(t)
            r.output.append(t)
            if sp.logprobs:
                r.logprobs.append(logps[i])
            if t in sp.stop_token_ids or len(r.output) >= sp.max_tokens:
                break
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        self.stats.generated_tokens += len(new)
        if r.on_event is not None and not r.cancelled:
            r.on_event(r, new, False)
        last = r.output[-1]
        if last in sp.stop_token_ids:
            self._finish(r, "stop")
        elif len(r.output) >= sp.max_tokens:
            self._finish(r, "length")

    # ------------------------------------------------------------------ model calls
    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return device_tensor(rows, torch.long, self.device)  # no host sync (see sampling.device_tensor)

    def _logprob(self, logits: torch.Tensor, tokens: torch.Tensor) -> list[float]:
        return token_logprobs(logits, tokens).tolist()

    def _prefill(self, reqs: list[Request]) -> None:
        lens = [len(r.prompt) for r in reqs]
        T = max(lens)
        ids = self._tensor([r.prompt + [0] * (T - len(r.prompt)) for r in reqs])  # right padding
        slots = self._tensor([r.slot for r in reqs])
        zeros = torch.zeros(len(reqs), dtype=torch.long, device=self.device)
        rows = torch.arange(len(reqs), device=self.device)
        last = device_tensor([n - 1 for n in lens], torch.long, self.device)
        view = self.cache.view(slots, zeros, T)
        logits, hidden = self.model.forward_cached(ids, view, logits_at=last)
        last_logits = logits[:, 0]  # [B, V]
        params = [r.params for r in reqs]
        first = sample(last_logits, params, [r.generator for r in reqs])
        logps = self._logprob(last_logits, first) if any(p.logprobs for p in params) else [0.0] * len(reqs)
        with self._lock:
            self.stats.prompt_tokens += sum(lens)
        if self.speculative:
            # MTP position i sees hidden[i] and token i+1; the prompt's last position sees the first sample.
            nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
            nxt[rows, last] = first
            mtp_logits, _ = self.model.mtp_forward_cached(hidden, nxt, view, logits_at=last)
            self._set_drafts(reqs, mtp_logits[:, 0])
        for i, (r, t) in enumerate(zip(reqs, first.tolist())):  # the one read of the sampled ids
            r.pos = lens[i]
            r.pending = t
            self._emit(r, [t], [logps[i]])

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
        view = self.cache.view(self._tensor([r.slot for r in reqs]), self._tensor([r.pos for r in reqs]), 1)
        logits, _ = self.model.forward_cached(ids, view)
        logits = logits[:, 0]
        params = [r.params for r in reqs]
        nxt = sample(logits, params, [r.generator for r in reqs])
        logps = self._logprob(logits, nxt) if any(p.logprobs for p in params) else None
        for i, (r, t) in enumerate(zip(reqs, nxt.tolist())):
            r.pos += 1
            r.pending = t
            self._emit(r, [t], [logps[i]] if logps else [0.0])

    def _decode_speculative(self) -> None:
        reqs = self._running
        B = len(reqs)
        ids = self._tensor([[r.pending, r.draft] for r in reqs])
        start = self._tensor([r.pos for r in reqs])
        slots = self._tensor([r.slot for r in reqs])
        view = self.cache.view(slots, start, 2)
        logits, hidden = self.model.forward_cached(ids, view)  # [B, 2, V], [B, 2, D]
        accepted_t, token_t, lp_t = speculative_tensors(logits, reqs)
        # The step's one read of sampled ids (acceptance flags with them), plus logprobs when asked for.
        read = torch.stack([accepted_t.long(), token_t], 1).tolist()
        accepted = [bool(a) for a, _ in read]
        lps = lp_t.tolist() if lp_t is not None else None
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
            self._emit(r, toks, logps)


# ------------------------------------------------------------------ the tensor part of a decode step
def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row: logits [B, V], tokens [B] -> [B] fp32 (on the logits' device)."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None])[:, 0]


def speculative_tensors(logits_B2V: torch.Tensor, reqs: list[Request]):
    """The tensor part of a speculative step, from the two-token verification logits [B, 2, V]: accepted [B],
    the token that follows (or replaces) each draft [B], and the log-probabilities [B, 2] of the tokens
    emitted at the two positions (None unless a request asked for them). Nothing is read to the host."""
    params = [r.params for r in reqs]
    dev = logits_B2V.device
    drafts = device_tensor([r.draft for r in reqs], torch.long, dev)
    if all(p.greedy for p in params):
        p0 = p1 = q = None
        accepted, token = verify_drafts(logits_B2V[:, 0], logits_B2V[:, 1], logits_B2V[:, 0], drafts, params,
                                        [r.generator for r in reqs])  # greedy rows only take argmaxes
    else:
        p0, p1 = probs(logits_B2V[:, 0], params), probs(logits_B2V[:, 1], params)
        q = torch.stack([p0[i] if r.draft_q is None else r.draft_q for i, r in enumerate(reqs)])
        accepted, token = verify_drafts(p0, p1, q, drafts, params, [r.generator for r in reqs])
    lp = None
    if any(p.logprobs for p in params):
        first = torch.where(accepted, drafts, token)  # position 0 emits the draft, or its replacement
        lp = torch.stack([token_logprobs(logits_B2V[:, 0], first), token_logprobs(logits_B2V[:, 1], token)], 1)
    return accepted, token, lp
