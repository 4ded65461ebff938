"""The inference engine: latent-cache decoding equals full recomputation, continuous batching and MTP
speculation do not change greedy tokens, seeds reproduce, stop ids and max_tokens end requests."""

from __future__ import annotations

import copy

import pytest
import torch

import nanoseek
from nanoseek.config import preset
from nanoseek.infer import Engine, EngineError, QueueFull, SamplingParams, fast, generate
from nanoseek.infer.cache import PagedCache
from nanoseek.infer.sampling import probs
from nanoseek.model import Transformer


# Tiny tensors: one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(preset("tiny")).eval()
    return m


def prompts_of(lengths, seed=1, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def greedy_reference(model, prompt, n):
    """Greedy decoding by recomputing the full forward over the whole sequence every step (no cache), on the
    pure model (an Engine accelerates the model it is given; this undoes that on a copy)."""
    model = fast.restore(copy.deepcopy(model))
    assert all(type(m) not in fast.modules.SWAPS.values() for m in model.modules())
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_cache_logits_equal_full_forward(model, paged_rows, block_size):
    ids = torch.tensor(prompts_of([12, 12]))
    with torch.no_grad():
        full = model(ids)
        _, view = paged_rows(model, 2, 16, block_size)  # the engine's cache, blocks in a scrambled order
        rows, zeros = torch.tensor([1, 0]), torch.zeros(2, dtype=torch.long)
        pre, _ = model.forward_cached(ids[:, :5], view(rows, zeros, 5))  # prefill 5, then one at a time
        steps = [model.forward_cached(ids[:, t:t + 1], view(rows, torch.full((2,), t), 1))[0]
                 for t in range(5, 12)]
    torch.testing.assert_close(torch.cat([pre] + steps, 1), full, atol=1e-4, rtol=1e-4)


def test_paged_cache_writes_and_reads_through_block_tables():
    cache = PagedCache(2, 5, 2, {"latent": 3}, torch.float32, "cpu")
    # row 0 owns blocks 3, 1 (positions 0-3); row 1 owns block 4 only (positions 0-1)
    view = cache.view([[3, 1], [4]], torch.tensor([1, 0]), 3)
    view.write(1, "latent", torch.arange(18.0).view(2, 3, 3))
    store = cache.data["latent"][1]
    assert store[3, 1].tolist() == [0, 1, 2] and store[1, 0].tolist() == [3, 4, 5] and store[1, 1].tolist() == [6, 7, 8]
    assert store[4, 0].tolist() == [9, 10, 11] and store[4, 1].tolist() == [12, 13, 14]
    assert store[cache.sink, 0].tolist() == [15, 16, 17]  # past row 1's blocks: the sink, nobody's block
    got = view.read(1, "latent")  # [2, kv_len 4, 3]
    assert got.shape == (2, 4, 3) and got[0, 1:].flatten().tolist() == list(range(9))
    assert got[1, :2].flatten().tolist() == list(range(9, 15))
    with pytest.raises(ValueError, match="out of range"):
        cache.view([[5]], torch.tensor([0]), 1)


def test_engine_greedy_equals_full_recompute(model):
    prompts = prompts_of([3, 9, 17])
    out = Engine(model, max_batch_size=3, max_len=64).generate_batch(prompts, SamplingParams(max_tokens=12))
    assert type(model.layers[0]) is fast.modules.FastBlock  # the engine decodes with the CPU fast paths
    for p, c in zip(prompts, out):
        assert c.token_ids == greedy_reference(model, p, 12)
        assert c.finish_reason == "length" and c.prompt_tokens == len(p)


def test_continuous_batching_equals_one_at_a_time(model):
    prompts = prompts_of([4, 11, 6, 20, 2, 9, 13])
    params = [SamplingParams(max_tokens=n) for n in (5, 14, 9, 3, 12, 7, 10)]
    alone = [Engine(model, max_batch_size=1, max_len=48).generate_batch([p], sp)[0].token_ids
             for p, sp in zip(prompts, params)]
    engine = Engine(model, max_batch_size=3, max_len=48)
    reqs = [engine.submit(p, sp) for p, sp in zip(prompts[:4], params[:4])]
    for _ in range(4):  # later requests join a batch that is already decoding
        engine.step()
    reqs += [engine.submit(p, sp) for p, sp in zip(prompts[4:], params[4:])]
    while not all(r.done.is_set() for r in reqs):
        engine.step()
        assert engine.batch_size() <= 3
    assert [r.result().token_ids for r in reqs] == alone
    engine.cache.pool.check_full()


def test_speculative_equals_plain_greedy(model):
    prompts = prompts_of([5, 13, 8, 1])
    sp = SamplingParams(max_tokens=20)
    plain = Engine(model, max_batch_size=4, max_len=64).generate_batch(prompts, sp)
    spec_engine = Engine(model, max_batch_size=2, max_len=64, speculative=True)
    spec = spec_engine.generate_batch(prompts, sp)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert spec_engine.stats.drafted > 0


class OracleDrafts(torch.nn.Module):
    """Wraps the model so the MTP draft is right two times in three (a known greedy continuation)."""

    def __init__(self, model, prompts, continuations):
        super().__init__()
        self.inner, self.config = model, model.config
        self.seqs = {tuple(p): p + c for p, c in zip(prompts, continuations)}
        self.slot_seq: dict[int, list[int]] = {}

    def cache_layout(self):
        return self.inner.cache_layout()

    def forward_cached(self, ids, cache, logits_at=None):
        for b in range(ids.shape[0]):
            if int(cache.start_pos[b]) == 0:  # a prefill: remember which sequence this row holds
                row = ids[b].tolist()
                self.slot_seq[cache.block_tables[b][0]] = next(s for p, s in self.seqs.items() if list(p) == row[:len(p)]
                                                          and all(t == 0 for t in row[len(p):]))
        return self.inner.forward_cached(ids, cache, logits_at=logits_at)

    def mtp_forward_cached(self, hidden, next_ids, cache, logits_at=None):
        logits, h = self.inner.mtp_forward_cached(hidden, next_ids, cache, logits_at=logits_at)
        logits = logits.clone()
        start = cache.start_pos
        for b in range(logits.shape[0]):
            seq = self.slot_seq[cache.block_tables[b][0]]  # a sequence's first block identifies it
            for t in range(logits.shape[1]):
                pos = t if logits_at is None else int(logits_at[b])  # position within this call's tokens
                target = int(start[b]) + pos + 2
                if target < len(seq) and target % 3:
                    logits[b, t] = -1e4
                    logits[b, t, seq[target]] = 1e4
        return logits, h


def test_speculative_accepts_good_drafts_and_keeps_tokens(model):
    prompts = prompts_of([6, 10, 3])
    sp = SamplingParams(max_tokens=24)
    plain = [c.token_ids for c in Engine(model, max_batch_size=3, max_len=64).generate_batch(prompts, sp)]
    oracle = OracleDrafts(model, prompts, plain)
    engine = Engine(oracle, max_batch_size=3, max_len=64, speculative=True)
    assert [c.token_ids for c in engine.generate_batch(prompts, sp)] == plain
    assert 0.4 < engine.stats.acceptance_rate < 1.0  # both the accept and the reject path ran
    assert engine.stats.decode_steps < 24


def test_seeded_sampling_reproducible_and_batch_independent(model):
    prompts = prompts_of([7, 4, 12])
    mk = lambda seed: SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=seed)  # noqa: E731
    a = Engine(model, max_batch_size=3, max_len=48).generate_batch(prompts, [mk(1), mk(2), mk(3)])
    b = Engine(model, max_batch_size=1, max_len=48).generate_batch(prompts[1:2], mk(2))
    c = Engine(model, max_batch_size=3, max_len=48).generate_batch(prompts, [mk(1), mk(2), mk(3)])
    assert [x.token_ids for x in a] == [x.token_ids for x in c]
    assert a[1].token_ids == b[0].token_ids
    d = Engine(model, max_batch_size=3, max_len=48).generate_batch(prompts, [mk(11), mk(12), mk(13)])
    assert [x.token_ids for x in a] != [x.token_ids for x in d]
    spec = Engine(model, max_batch_size=3, max_len=48, speculative=True)
    s1 = spec.generate_batch(prompts, [mk(5), mk(6), mk(7)])
    s2 = spec.generate_batch(prompts, [mk(5), mk(6), mk(7)])
    assert [x.token_ids for x in s1] == [x.token_ids for x in s2]


def test_stop_token_ids_and_logprobs(model):
    prompt = prompts_of([8])[0]
    full = greedy_reference(model, prompt, 12)
    stop = full[5]
    k = full.index(stop)
    for spec in (False, True):
        engine = Engine(model, max_batch_size=2, max_len=64, speculative=spec)
        c = engine.generate_batch([prompt], SamplingParams(max_tokens=12, stop_token_ids=[stop], logprobs=True))[0]
        assert c.token_ids == full[:k + 1] and c.finish_reason == "stop"
        assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)


def test_generate_api(model):
    prompts = prompts_of([5, 9])
    out = generate(model, prompts, 6)
    assert out == [greedy_reference(model, p, 6) for p in prompts]
    assert nanoseek.generate(model, prompts, 6) == out  # the public entry point
    s1 = generate(model, prompts, 6, temperature=0.9, top_p=0.95, seed=3)
    assert s1 == generate(model, prompts, 6, temperature=0.9, top_p=0.95, seed=3)
    assert generate(model, prompts, 6, stop_token_ids=[out[0][0]])[0] == out[0][:1]


def test_bad_requests_queue_bound_and_cancel(model):
    engine = Engine(model, max_batch_size=1, max_len=32, max_queue=2)
    with pytest.raises(EngineError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(EngineError, match="context"):
        engine.submit([5] * 30, SamplingParams(max_tokens=8))
    with pytest.raises(EngineError, match="out of range"):
        engine.submit([5, 100000], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit([5], SamplingParams(max_tokens=2, top_p=0.0))
    a = engine.submit([5, 6], SamplingParams(max_tokens=20))
    engine.step()  # a runs in the only slot
    b = engine.submit([7], SamplingParams(max_tokens=3))
    engine.submit([8], SamplingParams(max_tokens=3))
    with pytest.raises(QueueFull):
        engine.submit([9], SamplingParams(max_tokens=3))
    a.cancel()
    engine.step()  # the cancelled request leaves and b takes its slot in the same step
    assert a.result().finish_reason == "cancelled" and engine.batch_size() == 1
    while not b.done.is_set():
        engine.step()
    assert b.result().finish_reason == "length" and len(b.result().token_ids) == 3


def test_background_thread_api(model):
    engine = Engine(model, max_batch_size=2, max_len=32).start()
    try:
        seen = []
        r = engine.submit([3, 4, 5], SamplingParams(max_tokens=5), on_event=lambda q, t, f: seen.append((t, f)))
        c = r.result(timeout=60)
        assert [t for ts, _ in seen for t in ts] == c.token_ids and seen[-1][1]
        assert engine.generate_batch([[3, 4, 5]], SamplingParams(max_tokens=5))[0].token_ids == c.token_ids
    finally:
        engine.stop()


def test_probs_top_k_top_p():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 5.0, 0.0]])
    p = probs(logits, [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.5),
                       SamplingParams()])
    assert (p[0, :2] == 0).all() and p[0, 2:].sum().item() == pytest.approx(1.0)
    assert p[1].tolist() == [0.0, 0.0, 0.0, 1.0]  # the top token alone has more than half the mass
    assert p[2].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_background_thread_survives_a_failing_step(model):
    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config, self.fail = model, model.config, True

        def cache_layout(self):
            return self.inner.cache_layout()

        def forward_cached(self, *a, **k):
            if self.fail:
                self.fail = False
                raise RuntimeError("boom")
            return self.inner.forward_cached(*a, **k)

    engine = Engine(Flaky(), max_batch_size=2, max_len=32).start()
    try:
        first = engine.submit([3, 4], SamplingParams(max_tokens=4)).result(timeout=60)
        assert first.finish_reason == "error" and "boom" in engine.last_error
        assert engine.submit([3, 4], SamplingParams(max_tokens=4)).result(timeout=60).token_ids == \
            greedy_reference(model, [3, 4], 4)
    finally:
        engine.stop()


def test_load_model_keeps_bf16_weights_and_computes_in_fp32_on_a_cpu(tmp_path, monkeypatch):
    """A bf16 checkpoint served on a CPU keeps its linear and expert weights in bf16, bit for bit, and computes
    in fp32 (`bf16-weights`), with or without fast bf16 matmuls; --dtype bfloat16 keeps bf16 compute; an
    fp16 checkpoint on a CPU without fast bf16 runs in fp32."""
    import nanoseek
    from nanoseek.infer.generate import load_model

    torch.manual_seed(0)
    ref = Transformer(preset("tiny")).cast(torch.bfloat16)
    nanoseek.save(ref, tmp_path)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        expected = copy.deepcopy(ref).cast(torch.float32)(ids)
    for fast_bf16 in (False, True):
        monkeypatch.setattr("nanoseek.device.cpu_has_fast_bf16", lambda fast_bf16=fast_bf16: fast_bf16)
        model = load_model(str(tmp_path))
        assert model.weight_format["format"] == "bf16" and model.embed_tokens.weight.dtype == torch.float32
        assert torch.equal(model.layers[0].self_attn.o_proj.weight, ref.layers[0].self_attn.o_proj.weight)
        with torch.inference_mode():
            torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-4)
        assert load_model(str(tmp_path), "bfloat16").embed_tokens.weight.dtype == torch.bfloat16
    fp16 = tmp_path / "fp16"
    nanoseek.save(Transformer(preset("tiny")).cast(torch.float16), fp16)
    monkeypatch.setattr("nanoseek.device.cpu_has_fast_bf16", lambda: False)
    model = load_model(str(fp16))
    assert model.embed_tokens.weight.dtype == torch.float32 and model.layers[1].mlp.gate.weight.dtype == torch.float32
