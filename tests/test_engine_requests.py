"""Per-request processing in the engine (nanoseek.infer.logits): logit_bias, presence / frequency penalties
against a full-recompute reference, raw logprobs and their top alternatives, grammar-constrained output
(plain and MTP-speculative decoding, which must agree), and the slot bookkeeping: a failure injected at
every callback point fails that request only, and every slot returns to the pool whatever order finishing,
failing and cancelling happen in."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch

from nanoseek.config import preset
from nanoseek.infer import Engine, SamplingParams, fast
from nanoseek.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=350)).eval()


@pytest.fixture(scope="module")
def tok():
    from nanoseek.data.corpus import builtin_corpus
    from nanoseek.data.tokenizer import train_tokenizer

    texts = list(builtin_corpus(200, seed=1)) + ['{"name": "Ada", "age": 36, "ok": true}'] * 20
    return train_tokenizer(texts, vocab_size=350)


def prompt(n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(20, 340, (n,), generator=g).tolist()


def reference(model, prompt, n, adjust):
    """Greedy by full recomputation; adjust(logits [V], generated so far) edits the logits first."""
    m = fast.restore(copy.deepcopy(model))
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = m(torch.tensor([seq]))[0, -1].float()
            t = int(adjust(logits.clone(), out).argmax())
            seq.append(t)
            out.append(t)
    return out


def test_penalties_match_their_definition(model):
    p = prompt()
    for pres, freq in ((1.5, 0.0), (0.0, 2.0), (-0.5, 0.7)):
        def adjust(logits, out, pres=pres, freq=freq):
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float() if out \
                else torch.zeros_like(logits)
            return logits - freq * counts - pres * (counts > 0).float()
        sp = SamplingParams(max_tokens=12, presence_penalty=pres, frequency_penalty=freq)
        got = Engine(model, max_batch_size=2).generate_batch([p], sp)[0].token_ids
        assert got == reference(model, p, 12, adjust), (pres, freq)


def test_logit_bias(model):
    p = prompt()
    eng = Engine(model, max_batch_size=2)
    plain = eng.generate_batch([p], SamplingParams(max_tokens=6))[0].token_ids
    forced = eng.generate_batch([p], SamplingParams(max_tokens=6, logit_bias={42: 100.0}))[0].token_ids
    assert forced == [42] * 6
    banned = eng.generate_batch([p], SamplingParams(max_tokens=6, logit_bias={t: -100.0 for t in plain}))[0]
    assert not set(banned.token_ids) & set(plain)
    # a biased row does not change its unbiased neighbour in the same batch
    both = eng.generate_batch([p, p], [SamplingParams(max_tokens=6, logit_bias={42: 100.0}), SamplingParams(max_tokens=6)])
    assert both[0].token_ids == forced and both[1].token_ids == plain


def test_logprobs_and_top_logprobs_are_the_raw_distribution(model):
    p = prompt()
    eng = Engine(model, max_batch_size=2)
    req = eng.submit(p, SamplingParams(max_tokens=5, logprobs=True, top_logprobs=3, logit_bias={7: 50.0}))
    while not req.done.is_set():
        eng.step()
    m = fast.restore(copy.deepcopy(model))
    seq = list(p)
    with torch.no_grad():
        for k, t in enumerate(req.output):
            lp = torch.log_softmax(m(torch.tensor([seq]))[0, -1].float(), -1)  # before the bias
            assert req.logprobs[k] == pytest.approx(float(lp[t]), abs=1e-4)
            top = req.top_logprobs[k]
            assert [i for i, _ in top] == lp.topk(3).indices.tolist()
            assert [v for _, v in top] == pytest.approx(lp.topk(3).values.tolist(), abs=1e-4)
            seq.append(t)
    assert req.output == [7] * 5


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("speculative", [False, True])
def test_grammar_constrained_output_parses_and_speculation_agrees(model, tok, speculative):
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    from nanoseek.infer.grammar import GrammarTokenizer, Matcher, response_format_grammar

    gtok = GrammarTokenizer(tok.hf, [tok.eos_id], vocab_size=model.config.vocab_size)
    grammar = gtok.compile(response_format_grammar({"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}))
    results = {}
    for spec in (False, speculative):
        eng = Engine(model, max_batch_size=4, speculative=spec)
        reqs = [eng.submit(prompt(seed=s), SamplingParams(max_tokens=60, temperature=t, seed=s, stop_token_ids=[tok.eos_id]),
                           matcher=Matcher(gtok, grammar)) for s, t in ((1, 0.0), (2, 1.0), (3, 0.0))]
        free = eng.submit(prompt(seed=9), SamplingParams(max_tokens=10))  # an unconstrained neighbour
        while not all(r.done.is_set() for r in reqs + [free]):
            eng.step()
        for r in reqs:
            assert r.finish_reason == "stop", (r.finish_reason, r.error)
            jsonschema.validate(json.loads(tok.decode(r.output[:-1])), SCHEMA)
        results[spec] = [r.output for r in reqs]
        assert eng.free_slots() == 4
    # greedy rows give the same tokens with and without MTP speculation
    assert results[False][0] == results[speculative][0] and results[False][2] == results[speculative][2]


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("point", ["first", "decode", "finished"])
def test_a_failing_callback_fails_only_its_request(model, point):
    eng = Engine(model, max_batch_size=3, max_queue=8).start()
    try:
        calls = []

        def bad(req, tokens, finished):
            calls.append(finished)
            if (point == "first" and len(calls) == 1) or (point == "decode" and len(calls) == 3) \
                    or (point == "finished" and finished):
                raise Boom(point)

        good = [eng.submit(prompt(seed=s), SamplingParams(max_tokens=8), lambda *a: None) for s in range(4)]
        victim = eng.submit(prompt(seed=7), SamplingParams(max_tokens=8), bad)
        for r in good + [victim]:
            r.result(timeout=120)
        assert all(r.finish_reason == "length" and len(r.output) == 8 for r in good)
        if point == "finished":
            assert victim.finish_reason == "length"  # it had already ended; the failure changes nothing
        else:
            assert victim.finish_reason == "error" and "Boom" in victim.error
        assert eng.running
        after = eng.submit(prompt(), SamplingParams(max_tokens=3)).result(timeout=120)
        assert after.finish_reason == "length"
        deadline = time.time() + 60  # the loop reaps finished requests at its next step
        while eng.free_slots() != 3 and time.time() < deadline:
            time.sleep(0.01)
        assert eng.free_slots() == 3 and eng.batch_size() == 0
    finally:
        eng.stop()


def test_every_slot_returns_whatever_the_order(model):
    eng = Engine(model, max_batch_size=3, max_queue=8)
    sp = SamplingParams(max_tokens=5)
    a, b, c, d = (eng.submit(prompt(seed=s), sp) for s in range(4))
    d.cancel()  # cancelled while waiting: never takes a slot
    eng.step()
    b.cancel()
    b.cancel()  # twice
    eng.step()
    while not a.done.is_set():
        eng.step()
    a.cancel()  # after it finished
    c.cancel()
    eng.step()
    assert eng.free_slots() == 3 and [r.finish_reason for r in (a, b, c, d)] == ["length", "cancelled", "length",
                                                                                 "cancelled"]
    # a step that raises fails the batch once, and the slots still come back exactly once
    e, f = eng.submit(prompt(), sp), eng.submit(prompt(seed=5), sp)
    eng.step()
    eng._fail_running(RuntimeError("injected"))
    eng._fail_running(RuntimeError("again"))
    assert e.finish_reason == f.finish_reason == "error" and eng.free_slots() == 3
    eng.cache.pool.check_full()  # every block came back, exactly once (a second release raises)
