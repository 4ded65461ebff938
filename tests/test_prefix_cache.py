"""The engine's paged latent cache: prefix reuse gives the same greedy tokens as recomputing (any block
size, plain and MTP-speculative, continuous batching), a full pool makes requests wait or preempts them
without changing their tokens, and every block returns to the pool whatever order requests finish, fail
or are cancelled in."""

from __future__ import annotations

import pytest
import torch

from nanoseek.config import preset
from nanoseek.infer import Engine, EngineError, SamplingParams
from nanoseek.infer.cache import BlockPool, PagedCache, PoolError, block_key
from nanoseek.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("tiny")).eval()


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n,), generator=g).tolist()


PREFIX = tokens(70, seed=100)  # a shared "system prompt"
PROMPTS = [PREFIX + tokens(n, seed=i) for i, n in enumerate([5, 12, 1, 30])]


def run_alone(model, prompts, sp, **kw):
    """Each prompt on a fresh engine without prefix caching: the reference tokens."""
    return [Engine(model, max_batch_size=1, max_len=160, prefix_caching=False, **kw).generate_batch([p], sp)[0]
            .token_ids for p in prompts]


@pytest.mark.parametrize("block_size", [1, 16, 48, 64])
def test_prefix_reuse_gives_the_tokens_of_recomputation(model, block_size):
    sp = SamplingParams(max_tokens=10)
    ref = run_alone(model, PROMPTS, sp)
    engine = Engine(model, max_batch_size=2, max_len=160, block_size=block_size)
    first = engine.generate_batch(PROMPTS[:1], sp)[0]
    assert first.cached_tokens == 0 and first.token_ids == ref[0]
    rest = engine.generate_batch(PROMPTS[1:], sp)
    assert [c.token_ids for c in rest] == ref[1:]
    for p, c in zip(PROMPTS[1:], rest):
        # every full block of the shared prefix is reused, and at least the last prompt token is computed
        assert c.cached_tokens == min(70, len(p) - 1) // block_size * block_size
    again = engine.generate_batch(PROMPTS[:1], sp)[0]  # the whole prompt is cached: its last token is computed
    assert again.token_ids == ref[0] and again.cached_tokens == (len(PROMPTS[0]) - 1) // block_size * block_size
    s = engine.cache_metrics()
    assert s["blocks_used"] == 0 and s["blocks_cached"] > 0 and 0 < engine.stats.prefix_hit_rate < 1
    assert s["prefix_hit_tokens"] == sum(c.cached_tokens for c in rest + [again])
    assert s["prefix_query_tokens"] == sum(map(len, PROMPTS)) + len(PROMPTS[0])
    engine.cache.pool.check_full()


@pytest.mark.parametrize("block_size", [1, 16])
def test_prefix_reuse_under_speculative_decoding(model, block_size):
    """MTP speculation with reuse: the tokens of plain decoding, and the drafts (hence the acceptance counts)
    of a speculative engine that recomputes everything, so the MTP layer's cached rows are right too."""
    sp = SamplingParams(max_tokens=12)
    ref = run_alone(model, PROMPTS, sp)
    # The first block of PROMPTS[1] again, then another token: a block hit whose next token differs.
    twist = PROMPTS[1][:block_size * 2] + [7, 8, 9]
    ref_twist = run_alone(model, [twist], sp)
    spec, accepted = {}, {}
    for reuse in (False, True):
        engine = Engine(model, max_batch_size=2, max_len=160, block_size=block_size, speculative=True,
                        prefix_caching=reuse)
        outs = [engine.generate_batch([p], sp)[0] for p in PROMPTS + [twist]]
        spec[reuse] = [c.token_ids for c in outs]
        accepted[reuse] = engine.stats.accepted
        engine.cache.pool.check_full()
        if reuse:
            assert all(c.cached_tokens > 0 for c in outs[1:])
    assert spec[True] == spec[False] == ref + ref_twist
    assert accepted[True] == accepted[False]


def test_generated_tokens_are_cached_for_the_next_turn(model):
    """A follow-up whose prompt is the previous prompt + answer + more reuses the answer's blocks too."""
    sp = SamplingParams(max_tokens=24)
    engine = Engine(model, max_batch_size=1, max_len=160, block_size=8)
    a = engine.generate_batch([PROMPTS[0]], sp)[0]
    follow = PROMPTS[0] + a.token_ids + tokens(6, seed=9)
    b = engine.generate_batch([follow], sp)[0]
    cached_before_answer = len(PROMPTS[0]) // 8 * 8
    assert b.cached_tokens > cached_before_answer  # blocks filled during decoding were registered
    assert b.token_ids == run_alone(model, [follow], sp)[0]


def test_continuous_batching_with_shared_prefixes_equals_one_at_a_time(model):
    prompts = PROMPTS + [PREFIX[:40] + tokens(9, seed=20), tokens(25, seed=21)]
    params = [SamplingParams(max_tokens=n) for n in (5, 14, 9, 3, 12, 7)]
    alone = [run_alone(model, [p], sp)[0] for p, sp in zip(prompts, params)]
    engine = Engine(model, max_batch_size=3, max_len=160, block_size=16)
    reqs = [engine.submit(p, sp) for p, sp in zip(prompts[:2], params[:2])]
    for _ in range(3):  # later requests join a batch that is decoding, some with their prefix cached
        engine.step()
    reqs += [engine.submit(p, sp) for p, sp in zip(prompts[2:], params[2:])]
    while not all(r.done.is_set() for r in reqs):
        engine.step()
        assert engine.batch_size() <= 3
    assert [r.result().token_ids for r in reqs] == alone
    assert sum(r.cached_tokens for r in reqs) > 0
    engine.cache.pool.check_full()


@pytest.mark.parametrize("speculative", [False, True])
def test_a_small_pool_waits_and_preempts_without_changing_tokens(model, speculative):
    """Seven requests on a pool that holds about two of them: admission waits, running requests are
    preempted and resumed, and every request still gets its tokens (greedy and seeded sampling)."""
    prompts = [tokens(n, seed=30 + n) for n in (9, 17, 4, 22, 13, 6, 11)]
    params = [SamplingParams(max_tokens=20) if i % 2 else SamplingParams(max_tokens=20, temperature=0.9, seed=i)
              for i in range(len(prompts))]
    big = Engine(model, max_batch_size=4, max_len=64, block_size=4, speculative=speculative)
    ref = [c.token_ids for c in big.generate_batch(prompts, params)]
    small = Engine(model, max_batch_size=4, max_len=64, block_size=4, cache_blocks=20, speculative=speculative)
    out = small.generate_batch(prompts, params)
    greedy = [i for i in range(len(prompts)) if i % 2]
    assert [out[i].token_ids for i in greedy] == [ref[i] for i in greedy]
    if not speculative:  # a resumed request draws nothing from its generator: seeded samples are the same too
        assert [c.token_ids for c in out] == ref
    assert all(len(c.token_ids) == 20 for c in out)
    assert small.stats.preemptions > 0
    small.cache.pool.check_full()
    big.cache.pool.check_full()


def test_budget_flags_and_a_request_the_pool_can_never_hold(model):
    per_block = PagedCache.bytes_per_block(model, 16, torch.float32)
    engine = Engine(model, max_batch_size=2, max_len=512, block_size=16, cache_bytes=10 * per_block + 5)
    assert engine.cache_metrics()["blocks_total"] == 10 and engine.cache.nbytes() == 11 * per_block  # + the sink
    engine.generate_batch([[5] * 100], SamplingParams(max_tokens=50))  # 151 positions: 10 blocks, fits
    with pytest.raises(EngineError, match="more than the whole pool of 10 blocks can ever hold"):
        engine.submit([5] * 100, SamplingParams(max_tokens=60))
    with pytest.raises(EngineError, match="holds no block"):
        Engine(model, block_size=16, cache_bytes=per_block - 1)
    with pytest.raises(EngineError, match="not both"):
        Engine(model, cache_blocks=4, cache_bytes=1 << 20)
    with pytest.raises(EngineError, match="block_size"):
        Engine(model, block_size=0)
    default = Engine(model, max_batch_size=3, max_len=100, block_size=16)
    assert default.cache_metrics()["blocks_total"] == 3 * 7  # max_batch_size sequences of max_len (+ the draft)


def test_block_pool_refcounts_lru_and_double_release():
    pool = BlockPool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    ka, kb = block_key(b"", [1, 2]), block_key(b"", [3, 4])
    assert ka != kb and block_key(ka, [1, 2]) != ka
    pool.register(a, ka, 9)
    pool.register(b, kb, 9)
    pool.register(c, ka, 9)  # the key is taken: c stays private
    assert pool.lookup(ka) == a and pool.lookup(ka, next_token=9) == a and pool.lookup(ka, next_token=8) is None
    for x in (b, a, c):
        pool.release(x)
    assert pool.available() == 3 and list(pool.lru) == [b, a] and list(pool.free) == [c]
    with pytest.raises(PoolError, match="released more often"):
        pool.release(a)
    pool.retain(a)  # a prefix hit takes a cached block back
    assert pool.refs[a] == 1 and a not in pool.lru
    assert pool.allocate() == c and pool.allocate() == b  # free blocks first, then the least recently used
    assert pool.lookup(kb) is None and pool.evictions == 1
    with pytest.raises(PoolError, match="exhausted"):
        pool.allocate()


# ----------------------------------------------------------------------------- every block back, once
class Flaky(torch.nn.Module):
    """The model, failing the forward_cached call number `fail_at` (counted from 1)."""

    def __init__(self, model, fail_at):
        super().__init__()
        self.inner, self.config, self.fail_at, self.calls = model, model.config, fail_at, 0

    def cache_layout(self):
        return self.inner.cache_layout()

    def forward_cached(self, *a, **k):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        return self.inner.forward_cached(*a, **k)

    def mtp_forward_cached(self, *a, **k):
        return self.inner.mtp_forward_cached(*a, **k)


def wait_idle(engine, timeout=60.0):
    """Until the engine thread has reaped every request (a request is done before its blocks are released,
    at the end of the step that finished it)."""
    import time

    deadline = time.time() + timeout
    while engine.batch_size() or engine.queue_depth():
        assert time.time() < deadline, "the engine did not go idle"
        time.sleep(0.01)


def submit_mix(engine):
    """Requests sharing a prefix, one of them long enough to be preempted on a small pool."""
    return [engine.submit(p, SamplingParams(max_tokens=n)) for p, n in
            zip(PROMPTS + [tokens(8, seed=40)], (6, 30, 12, 4, 20))]


@pytest.mark.parametrize("fail_at", [1, 2, 4, 7])
@pytest.mark.parametrize("speculative", [False, True])
def test_failures_release_every_block_once(model, fail_at, speculative):
    engine = Engine(Flaky(model, fail_at), max_batch_size=3, max_len=160, block_size=8, cache_blocks=40,
                    speculative=speculative).start()
    try:
        reqs = submit_mix(engine)
        done = [r.result(timeout=120) for r in reqs]
        assert any(c.finish_reason == "error" for c in done)
        wait_idle(engine)
        engine.cache.pool.check_full()
        after = engine.generate_batch([PROMPTS[1]], SamplingParams(max_tokens=4))[0]  # still serving
        assert after.finish_reason == "length"
    finally:
        engine.stop()
    engine.cache.pool.check_full()


@pytest.mark.parametrize("order", ["cancel_running_first", "cancel_waiting_first", "cancel_finished",
                                   "stop_with_work_left"])
def test_cancellations_in_any_order_release_every_block_once(model, order):
    engine = Engine(model, max_batch_size=2, max_len=160, block_size=8, cache_blocks=24)
    reqs = submit_mix(engine)
    engine.step()  # two running (one of them may be preempted later), three waiting
    running = [r for r in reqs if r in engine._running]
    waiting = [r for r in reqs if r not in running]
    if order == "cancel_running_first":
        running[0].cancel()
        engine.step()
        waiting[-1].cancel()
    elif order == "cancel_waiting_first":
        waiting[0].cancel()
        engine.step()
        running[-1].cancel()
        running[-1].cancel()  # twice: still one release
    elif order == "cancel_finished":
        while not reqs[0].done.is_set():
            engine.step()
        reqs[0].cancel()
    if order == "stop_with_work_left":
        engine.start()
        engine.stop()  # the loop ends: everything left is cancelled
        assert all(r.done.is_set() for r in reqs)
    else:
        for _ in range(3):
            engine.step()
        for r in reqs[::2]:
            r.cancel()
        while not all(r.done.is_set() for r in reqs):
            engine.step()
    engine.cache.pool.check_full()
    assert engine.batch_size() == 0 and engine.queue_depth() == 0


@pytest.mark.parametrize("when", ["first_token", "later_token", "finish"])
def test_a_failing_callback_fails_its_request_only(model, when):
    """A request callback that raises on the engine thread (at its first token, a later one, or the final
    call): that request ends with "error", the others run on, no block stays taken, the engine serves on."""
    engine = Engine(model, max_batch_size=3, max_len=160, block_size=8).start()
    try:
        def bad(req, toks, finished):
            if (when == "first_token" and toks) or (when == "later_token" and len(req.output) >= 3) or \
                    (when == "finish" and finished):
                raise ValueError("callback failure")

        r = engine.submit(PROMPTS[0], SamplingParams(max_tokens=10), on_event=bad)
        other = engine.submit(PROMPTS[1], SamplingParams(max_tokens=10))
        got = r.result(timeout=60)
        assert got.finish_reason == ("length" if when == "finish" else "error")
        assert "callback failure" in r.error  # the request says why (engine.last_error is for step failures)
        assert other.result(timeout=60).finish_reason == "length" and len(other.output) == 10
        assert engine.generate_batch([PROMPTS[2]], SamplingParams(max_tokens=3))[0].finish_reason == "length"
        wait_idle(engine)
        engine.cache.pool.check_full()
    finally:
        engine.stop()
    engine.cache.pool.check_full()


def test_serve_cache_flags():
    import argparse

    from nanoseek.serve.cli import add_arguments, parse_bytes

    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("500MB") == 500_000_000 and parse_bytes("4096") == 4096
    assert parse_bytes("1.5 kib") == 1536
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_bytes("lots")
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--model", "m", "--block-size", "16", "--cache-memory", "1GiB", "--no-prefix-cache"])
    assert (args.block_size, args.cache_memory, args.cache_blocks, args.no_prefix_cache) == (16, 1 << 30, None, True)
    with pytest.raises(SystemExit):  # one budget or the other
        p.parse_args(["--model", "m", "--cache-blocks", "8", "--cache-memory", "1GiB"])


def test_capacity_is_the_context_or_what_the_pool_holds(model):
    assert Engine(model, max_len=100, block_size=16).capacity == 100
    small = Engine(model, max_len=512, block_size=16, cache_blocks=4)
    assert small.capacity == 63
    small.validate([5] * 13, SamplingParams(max_tokens=small.capacity - 13))  # the most it can take
    with pytest.raises(EngineError, match="can ever hold"):
        small.validate([5] * 13, SamplingParams(max_tokens=small.capacity - 12))


def test_new_weights_drop_every_cached_prefix():
    """GRPO trains the model its engine decodes with: after an optimizer step (or load_state_dict) no prefix
    computed with the old weights may be reused."""
    torch.manual_seed(0)
    m = Transformer(preset("tiny")).eval()
    engine = Engine(m, max_batch_size=1, max_len=160, block_size=16)
    sp = SamplingParams(max_tokens=6)
    engine.generate_batch([PROMPTS[0]], sp)
    assert engine.generate_batch([PROMPTS[1]], sp)[0].cached_tokens == 64
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)  # an in-place update, as an optimizer step makes
    after = engine.generate_batch([PROMPTS[1]], sp)[0]
    assert after.cached_tokens == 0 and engine.cache_metrics()["blocks_cached"] > 0  # recomputed, then cached again
    assert after.token_ids == run_alone(m, [PROMPTS[1]], sp)[0]
    assert engine.generate_batch([PROMPTS[2]], sp)[0].cached_tokens == 64  # the new weights' prefix is reused
    engine.cache.pool.check_full()


def test_requests_arriving_together_share_a_prefix_computed_once(model):
    """n samples of one prompt (GRPO groups, `n` in the API) submitted at once: the first computes the
    shared blocks, the others wait one step and read them from the cache."""
    engine = Engine(model, max_batch_size=4, max_len=160, block_size=16)
    sp = SamplingParams(max_tokens=5)
    out = engine.generate_batch([PROMPTS[1]] * 3 + [PROMPTS[3]], sp)
    assert [c.cached_tokens for c in out] == [0, 80, 80, 64]
    assert all(c.token_ids == out[0].token_ids for c in out[:3])
    assert out[3].token_ids == run_alone(model, [PROMPTS[3]], sp)[0]
    assert engine.stats.prompt_tokens == len(PROMPTS[1]) + 2 * (len(PROMPTS[1]) - 80) + len(PROMPTS[3]) - 64
    engine.cache.pool.check_full()
