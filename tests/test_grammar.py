"""Structured output (nanoseek.infer.grammar): random logits sampled under the masks always give JSON that
parses and validates, EOS only when complete, rows without a matcher untouched, answer-only triggers,
rollback, and clear errors for bad response_format / schemas."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from nanoseek.data.corpus import builtin_corpus  # noqa: E402
from nanoseek.data.tokenizer import train_tokenizer  # noqa: E402
from nanoseek.infer.grammar import (Grammar, GrammarError, GrammarTokenizer, Matcher, allocate_bitmask,  # noqa: E402
                                    allowed_tokens, apply_masks, fill_masks, response_format_grammar, strict_schema)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address"],
}
CHOICE = {"anyOf": [{"type": "object", "properties": {"ok": {"const": True}}, "required": ["ok"],
                     "additionalProperties": False},
                    {"type": "array", "items": {"type": "number"}, "maxItems": 4}]}
NUMBERS = {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 1,
                                                    "maxItems": 5}, "flag": {"type": "boolean"}},
           "required": ["xs", "flag"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok():
    texts = list(builtin_corpus(300, seed=1)) + ['{"name": "Ada", "tags": ["x", "y"], "age": 36, "ok": true}'] * 20
    return train_tokenizer(texts, vocab_size=350)


@pytest.fixture(scope="module")
def gtok(tok):
    # The model's logits are wider than the tokenizer (as DeepSeek-V3 pads 128815 to 129280).
    return GrammarTokenizer(tok.hf, [tok.eos_id], vocab_size=tok.vocab_size + 7)


def schema_format(schema, strict=False):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


def test_random_logits_batch_of_16_always_gives_valid_json(tok, gtok):
    V = gtok.vocab_size
    specs = [({"type": "json_object"}, {"type": "object"}), (schema_format(PERSON), PERSON),
             (schema_format(PERSON, strict=True), strict_schema(PERSON)), (schema_format(CHOICE), CHOICE),
             (schema_format(NUMBERS), NUMBERS)]
    rows = []  # (matcher or None, schema or None)
    for i in range(16):
        if i % 3 == 2:
            rows.append((None, None))
        else:
            fmt, schema = specs[i % len(specs)]
            rows.append((Matcher(gtok, gtok.compile(response_format_grammar(fmt))), schema))
    matchers = [m for m, _ in rows]
    outputs = [[] for _ in rows]
    done = [m is None for m in matchers]
    g = torch.Generator().manual_seed(0)
    bitmask = allocate_bitmask(16, V)
    for step in range(1500):
        if all(done):
            break
        active = [m if not d else None for m, d in zip(matchers, done)]
        filled = fill_masks(active, bitmask)
        logits = torch.randn(16, V, generator=g)
        before = logits.clone()
        apply_masks(logits, bitmask, filled)
        for i, m in enumerate(active):
            if m is None:
                assert torch.equal(logits[i], before[i])  # rows without a matcher are untouched
                continue
            allowed = set(allowed_tokens(bitmask[i], V))
            assert (tok.eos_id in allowed) == m.is_accepting()  # EOS exactly when the JSON is complete
            assert not allowed & set(range(tok.vocab_size, V))  # padded ids never
            assert torch.isinf(logits[i][sorted(set(range(V)) - allowed)]).all()
        probs = logits.softmax(-1)
        for i, m in enumerate(active):
            if m is None:
                continue
            t = int(torch.multinomial(probs[i], 1, generator=g))
            assert m.advance(t), m.error
            if t == tok.eos_id:
                done[i] = True
                assert m.is_terminated()
            else:
                outputs[i].append(t)
    assert all(done), "every constrained row must finish within the step budget"
    for (m, schema), out in zip(rows, outputs):
        if m is None:
            continue
        assert not set(out) & tok.special_ids  # JSON text never contains a special token
        value = json.loads(tok.decode(out))
        jsonschema.validate(value, schema)
        if m.grammar.kind == "json_object":
            assert isinstance(value, dict)


def test_answer_only_after_the_trigger(tok, gtok):
    V = gtok.vocab_size
    m = Matcher(gtok, response_format_grammar(schema_format(NUMBERS)), trigger_ids=[tok.end_think_id])
    bm = allocate_bitmask(1, V)
    fill_masks([m], bm)
    free = set(allowed_tokens(bm[0], V))
    assert free == set(range(tok.vocab_size)) - {tok.eos_id}  # thinking: anything but EOS
    reasoning = tok.encode("let me think {[ not json")
    for t in reasoning:
        assert m.advance(t)
    assert not m.active
    assert m.advance(tok.end_think_id) and m.active
    fill_masks([m], bm)
    assert set(allowed_tokens(bm[0], V)) <= {i for i in range(tok.vocab_size) if tok.token_bytes(i).startswith(b"{")}
    answer = tok.encode('{"xs": [1, 2], "flag": true}') + [tok.eos_id]
    for t in answer:
        assert m.advance(t)
    assert m.is_terminated()
    # Roll back into the reasoning: the matcher is inactive again and accepts free text.
    m.rollback(len(answer) + 2)
    assert not m.active and m.consumed == len(reasoning) - 1
    assert m.advance(tok.encode("x")[0]) and not m.active
    with pytest.raises(ValueError, match="cannot roll back"):
        m.rollback(m.consumed + 1)
    # Drafts across the trigger: free text, the trigger, then only what the grammar allows.
    m3 = Matcher(gtok, response_format_grammar(schema_format(NUMBERS)), trigger_ids=[tok.end_think_id])
    draft = tok.encode("hm") + [tok.end_think_id] + tok.encode('{"xs": [') + tok.encode("}")
    assert m3.valid_prefix(draft) == len(draft) - 1 and m3.consumed == 0
    assert m3.valid_prefix(tok.encode("hm") + [tok.eos_id]) == 2
    # EOS during the reasoning fails the matcher (the answer never came).
    m2 = Matcher(gtok, response_format_grammar({"type": "json_object"}), trigger_ids=[tok.end_think_id])
    assert not m2.advance(tok.eos_id) and m2.error and m2.is_terminated()


def test_rollback_restores_the_masks(tok, gtok):
    V = gtok.vocab_size
    m = Matcher(gtok, response_format_grammar(schema_format(PERSON)))
    ids = tok.encode('{"name": "Ada", "age": 36, "role": "editor", "address": {"city": "Rome", "zip": "12345"}}')
    masks = []
    bm = allocate_bitmask(1, V)
    for t in ids:
        fill_masks([m], bm)
        masks.append(bm[0].clone())
        assert m.advance(t)
    fill_masks([m], bm)
    assert tok.eos_id in allowed_tokens(bm[0], V)
    m.rollback(5)
    for k, t in enumerate(ids[-5:]):
        fill_masks([m], bm)
        assert torch.equal(bm[0], masks[len(ids) - 5 + k])
        assert m.advance(t)
    assert m.is_accepting()
    # Drafts are checked without consuming them.
    x = tok.encode("x")[0]
    assert m.valid_prefix([tok.eos_id, x]) == 1 and m.valid_prefix([x]) == 0 and m.is_accepting()
    m.rollback(1)
    assert m.valid_prefix([ids[-1], tok.eos_id, x]) == 2
    assert m.advance(ids[-1])
    # A token the grammar forbids puts the matcher in an error state; its row then allows only EOS.
    assert not m.advance(tok.encode("x")[0]) and m.error
    fill_masks([m], bm)
    assert allowed_tokens(bm[0], V) == [tok.eos_id]


def test_forced_tokens_and_single_row_fill(tok, gtok):
    m = Matcher(gtok, response_format_grammar(schema_format({"type": "object", "properties": {"answer": {"type": "integer"}},
                                                             "required": ["answer"], "additionalProperties": False})))
    forced = tok.decode(m.forced_tokens())
    assert forced and '{"answer": '.startswith(forced)


@pytest.mark.parametrize("fmt, param", [
    ("json", "response_format"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
     "response_format.json_schema.strict"),
])
def test_bad_response_format_is_a_clear_error(fmt, param):
    with pytest.raises(GrammarError) as e:
        response_format_grammar(fmt)
    assert e.value.param == param


@pytest.mark.parametrize("schema, msg", [({"type": "strin"}, "strin"), ({"$ref": "#/definitions/nope"}, "nope"),
                                         ({"type": "object", "properties": {"a": {"type": 5}}}, "type")])
def test_invalid_schema_fails_at_compile(gtok, schema, msg):
    with pytest.raises(GrammarError, match=msg) as e:
        gtok.compile(response_format_grammar(schema_format(schema)))
    assert e.value.param == "response_format" and "json schema" in str(e.value)


def test_text_and_missing_format_need_no_grammar():
    assert response_format_grammar(None) is None and response_format_grammar({"type": "text"}) is None
    assert response_format_grammar({"type": "json_object"}).kind == "json_object"


def test_strict_schema_closes_objects():
    s = strict_schema({"type": "object", "properties": {"a": {"type": "object", "properties": {}},
                                                        "b": {"type": "array", "items": {"properties": {"x": {}}}}},
                       "additionalProperties": True})
    assert s["additionalProperties"] is True  # said explicitly: kept
    assert s["properties"]["a"]["additionalProperties"] is False
    assert s["properties"]["b"]["items"]["additionalProperties"] is False


def _dense_reference(logits, bitmask, rows):
    V = logits.shape[1]
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :V].astype(bool)
    out = logits.clone()
    for r in rows:
        out[r][~torch.from_numpy(bits[r])] = float("-inf")
    return out


@pytest.mark.parametrize("V", [33, 350, 4100, 40_000])  # the last one takes the sparse paths
def test_apply_masks_matches_a_dense_mask(V):
    g = torch.Generator().manual_seed(V)
    W = (V + 31) // 32
    bm = torch.randint(-2**31, 2**31 - 1, (6, W), dtype=torch.int32, generator=g)  # balanced rows
    bm[1] = -1
    bm[1, 0] = 0b1010  # nearly everything allowed
    bm[2] = 0
    bm[2, W - 1] = 1  # nearly nothing allowed
    bm[3] = 0
    bm[3, 0] = -1  # 32 allowed
    logits = torch.randn(6, V, generator=g)
    for rows in ([0, 1, 2, 3, 4, 5], [1, 2, 4], []):
        out = logits.clone()
        apply_masks(out, bm, rows)
        assert torch.equal(out, _dense_reference(logits, bm, rows))
    with pytest.raises(ValueError, match="bitmask covers"):
        apply_masks(torch.zeros(1, W * 32 + 1), bm[:1])


@pytest.mark.parametrize("V", [357, 40_000])
def test_apply_masks_keeps_the_logits_device(V):
    # The meta device is a CPU-only probe: any CPU tensor mixed into the computation would raise.
    logits = torch.empty(4, V, device="meta")
    bm = allocate_bitmask(4, V)
    bm[0] = 0
    bm[0, 0] = 7  # mostly disallowed
    bm[1, 0] = 0  # mostly allowed
    bm[2] = 0x0F0F0F0F  # balanced
    assert apply_masks(logits, bm, [0, 1, 2]).device.type == "meta"


def test_bitmask_checks(gtok):
    m = Matcher(gtok, response_format_grammar({"type": "json_object"}))
    with pytest.raises(ValueError, match="int32 CPU"):
        fill_masks([m], torch.zeros(1, 20, dtype=torch.int64))
    with pytest.raises(ValueError, match="rows"):
        fill_masks([m, m], allocate_bitmask(1, gtok.vocab_size))
    with pytest.raises(ValueError, match="smaller"):
        GrammarTokenizer(gtok.hf, [1], vocab_size=10)
    with pytest.raises(ValueError, match="EOS"):
        GrammarTokenizer(gtok.hf, [])


def test_lark_grammar_with_special_tokens(tok, gtok):
    g = gtok.compile(Grammar.from_lark(f'start: "yes" <[{tok.end_think_id}]> | "no"'))
    m = Matcher(gtok, g)
    for t in tok.encode("yes") + [tok.end_think_id]:
        assert m.advance(t)
    assert m.is_accepting()
