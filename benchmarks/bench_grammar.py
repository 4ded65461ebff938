"""Structured-output libraries side by side: llguidance, outlines-core and xgrammar (whichever are installed).

For two tokenizers, our byte-level BPE at a few thousand tokens and a 128K-token byte-level BPE (DeepSeek-V3
has 128K; none can be downloaded here, so one is trained on generated text, as large as a real one), and
three constraints, (a) `json_object` (any JSON object), (b) a realistic json_schema (nested object, enum,
array, required fields, bounds) and (c) a DeepSeek-V3.1 tool call whose arguments follow a function's
schema, it measures:

* compile time: the tokenizer preparation (once per model) and the grammar compilation (once per request);
* the per-decode-step mask cost at batch 1 and batch 16: filling the bitmask of every row (the library's
  batched call where it has one) plus advancing each matcher by the emitted token, walking a realistic
  output (the canonical tokenization of a valid document);
* applying the bitmask to [B, V] fp32 logits: nanoseek.infer.grammar.apply_masks (numpy bit unpacking on
  CPU) and, where installed, xgrammar's C++ CPU kernel;
* the install footprint: the library's files plus the packages it pulls in that a nanoseek CPU install
  does not already need (torch, numpy).

Run: `.venv/bin/python -m benchmarks.bench_grammar [--cache DIR]` (the project venv has llguidance only;
for the comparison put all three in a throwaway venv, which keeps xgrammar's triton and transformers out of
the project's: `python3 -m venv /tmp/gvenv && /tmp/gvenv/bin/pip install torch==2.13.0 tokenizers numpy
llguidance outlines-core xgrammar`, then `PYTHONPATH=src:. /tmp/gvenv/bin/python -m benchmarks.bench_grammar`).
Results: benchmarks/results/grammar.json with all three, grammar-<libraries>.json otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_result
from nanoseek.data.tokenizer import (TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP,
                                     load_tokenizer, train_tokenizer)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "scores": {"type": "array", "items": {"type": "number"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "role": "editor",
            "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"},
            "tags": ["math", "engines", "poetry"], "scores": [9.5, 8.25, 10], "active": True}
OBJECT_DOCUMENT = {"id": "a9f3", "items": [{"sku": "X-1", "qty": 2, "price": 19.99}, {"sku": "Y-22", "qty": 1,
                   "price": 5.0}], "note": "leave at the door, ring twice", "gift": False, "meta": {"source": "web"}}
TOOL_PARAMS = {
    "type": "object",
    "properties": {"location": {"type": "string", "description": "City and country"},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["location", "unit"],
    "additionalProperties": False,
}
TOOL_ARGS = {"location": "Paris, France", "unit": "celsius", "days": 3}
TOOL_NAME = "get_weather"


def compact(obj) -> str:
    return json.dumps(obj, separators=(", ", ": "), ensure_ascii=False)


def generated_corpus(lines: int, seed: int = 0) -> list[str]:
    """Text with a long-tailed vocabulary of made-up words, numbers, punctuation and JSON-ish fragments."""
    rng = random.Random(seed)
    cons, vow = "bcdfghjklmnpqrstvwxyz", "aeiou"

    def word() -> str:
        w = "".join(rng.choice(cons) + rng.choice(vow) + (rng.choice(cons) if rng.random() < 0.4 else "")
                    for _ in range(rng.choice([1, 1, 2, 2, 2, 3, 3, 4, 5])))
        r = rng.random()
        return w.capitalize() if r < 0.1 else w.upper() if r < 0.13 else w

    words = [word() for _ in range(400_000)]
    puncts = list(".,:;!?(){}[]\"'-_=+*/<>#@$%&") + ["\n", '": "', '", "', "{\"", "\"}", "\n  "]
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(5, 30)):
            r = rng.random()
            if r < 0.75:
                parts.append(words[min(int(rng.paretovariate(0.7)) - 1, len(words) - 1)] if rng.random() < 0.5
                             else rng.choice(words))
            elif r < 0.85:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
            else:
                parts.append(rng.choice(puncts))
        out.append(" ".join(parts))
    return out


def build_tokenizers(cache: Path, small: int, large: int):
    toks = {}
    for name, size, lines in ((f"nanoseek-{small // 1000}k", small, 20_000), (f"bpe-{large // 1000}k", large, 300_000)):
        d = cache / name
        t = time.perf_counter()
        if not (d / "tokenizer.json").exists():
            train_tokenizer(generated_corpus(lines, seed=size), vocab_size=size, out_dir=d, min_frequency=1)
        toks[name] = load_tokenizer(d)
        print(f"tokenizer {name}: {toks[name].vocab_size} tokens ({time.perf_counter() - t:.1f}s)", flush=True)
    return toks


def trajectories(tok) -> dict[str, list[int]]:
    """The canonical tokens of a valid output per constraint (what a trained model mostly emits)."""
    call = f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}{TOOL_NAME}{TOOL_SEP}{compact(TOOL_ARGS)}{TOOL_CALL_END}{TOOL_CALLS_END}"
    return {"json_object": tok.encode(compact(OBJECT_DOCUMENT)) + [tok.eos_id],
            "json_schema": tok.encode(compact(DOCUMENT)) + [tok.eos_id],
            "tool_call": tok.encode(call) + [tok.eos_id]}


# ---- one adapter per library: prepare(tok) -> state; compile(state, kind) -> compiled; matcher(compiled);
#      fill(state, matchers, bitmask) fills the masks of all rows; advance(state, matchers, tokens) feeds each row.

class LLGuidance:
    name = "llguidance"
    dist = "llguidance"

    def prepare(self, tok):
        from nanoseek.infer.grammar import GrammarTokenizer

        return GrammarTokenizer(tok.hf, [tok.eos_id])

    def compile(self, gt, kind):
        from nanoseek.infer.grammar import Grammar, json_schema_options

        if kind == "json_object":
            return gt.compile(Grammar.from_json_schema({"type": "object"}, "json_object"))
        if kind == "json_schema":
            return gt.compile(Grammar.from_json_schema(SCHEMA))
        ids = {t: gt.token_id(t) for t in (TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN, TOOL_SEP, TOOL_CALL_END, TOOL_CALLS_END)}
        args = json.dumps({**TOOL_PARAMS, **json_schema_options()})
        lark = (f"start: <[{ids[TOOL_CALLS_BEGIN]}]> <[{ids[TOOL_CALL_BEGIN]}]> \"{TOOL_NAME}\" <[{ids[TOOL_SEP]}]> args "
                f"<[{ids[TOOL_CALL_END]}]> <[{ids[TOOL_CALLS_END]}]>\nargs: %json {args}\n")
        return gt.compile(Grammar.from_lark(lark, "tool_call"))

    def matcher(self, gt, compiled):
        from nanoseek.infer.grammar import Matcher

        return Matcher(gt, compiled)

    def fill(self, gt, matchers, bitmask):
        from nanoseek.infer.grammar import fill_masks

        fill_masks(matchers, bitmask)

    def advance(self, gt, matchers, tokens):
        return all(m.advance(t) for m, t in zip(matchers, tokens))


class XGrammar:
    name = "xgrammar"
    dist = "xgrammar"

    def prepare(self, tok):
        import xgrammar as xgr

        vocab = [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
        info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=tok.vocab_size,
                                 stop_token_ids=[tok.eos_id])
        return {"compiler": xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False),
                "batch": xgr.BatchGrammarMatcher(max_threads=2)}

    def compile(self, st, kind):
        import xgrammar as xgr

        c = st["compiler"]
        if kind == "json_object":
            return c.compile_json_schema(json.dumps({"type": "object"}), any_whitespace=False, separators=(", ", ": "))
        if kind == "json_schema":
            return c.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
        args = xgr.Grammar.from_json_schema(json.dumps(TOOL_PARAMS), any_whitespace=False, separators=(", ", ": "))
        head = xgr.Grammar.from_ebnf(f'root ::= "{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}{TOOL_NAME}{TOOL_SEP}"')
        tail = xgr.Grammar.from_ebnf(f'root ::= "{TOOL_CALL_END}{TOOL_CALLS_END}"')
        return c.compile_grammar(xgr.Grammar.concat(head, args, tail))

    def matcher(self, st, compiled):
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)

    def fill(self, st, matchers, bitmask):
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            st["batch"].batch_fill_next_token_bitmask(matchers, bitmask)

    def advance(self, st, matchers, tokens):
        return all(m.accept_token(int(t)) for m, t in zip(matchers, tokens))


class OutlinesCore:
    name = "outlines-core"
    dist = "outlines_core"

    def prepare(self, tok):
        from outlines_core import Vocabulary

        by_bytes: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            if i != tok.eos_id:
                by_bytes.setdefault(tok.token_bytes(i), []).append(i)
        return {"vocab": Vocabulary(tok.eos_id, by_bytes)}

    def compile(self, st, kind):
        import re

        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        ws = r"[ ]?"  # compact JSON (one optional space), as with the other libraries
        if kind == "json_object":
            regex = build_regex_from_schema(json.dumps({"type": "object"}), ws)
        elif kind == "json_schema":
            regex = build_regex_from_schema(json.dumps(SCHEMA), ws)
        else:
            regex = (re.escape(f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}{TOOL_NAME}{TOOL_SEP}")
                     + build_regex_from_schema(json.dumps(TOOL_PARAMS), ws) + re.escape(f"{TOOL_CALL_END}{TOOL_CALLS_END}"))
        return Index(regex, st["vocab"])

    def matcher(self, st, compiled):
        from outlines_core import Guide

        return Guide(compiled)

    def fill(self, st, matchers, bitmask):
        for i, g in enumerate(matchers):  # no batched call: one row after another
            row = bitmask[i]
            g.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    def advance(self, st, matchers, tokens):
        for g, t in zip(matchers, tokens):
            if int(t) != st["vocab"].get_eos_token_id():
                g.advance(int(t), return_tokens=False)
        return True


LIBRARIES = [LLGuidance(), OutlinesCore(), XGrammar()]


def footprint(dist: str) -> dict:
    """Installed bytes of a distribution and of every dependency it pulls in beyond torch/numpy/typing."""
    base = {"torch", "numpy", "typing-extensions", "typing_extensions"}
    seen, todo, total, parts = set(), [dist], 0, {}
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen or key in base:
            continue
        seen.add(key)
        try:
            d = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        size = sum((f.size or 0) for f in (d.files or []))
        parts[d.metadata["Name"]] = round(size / 2**20, 1)
        total += size
        for req in d.requires or []:
            if "extra ==" in req:
                continue
            req_name = req.split(";")[0].strip().split(" ")[0]
            for sep in "<>=!~[(":
                req_name = req_name.split(sep)[0]
            todo.append(req_name.strip())
    return {"total_mib": round(total / 2**20, 1), "packages_mib": parts}


def walk(lib, state, tok, compiled, tokens, batch, rounds) -> dict:
    """Per-step cost of `batch` matchers walking the reference tokens: fill every row, then advance each."""
    fill_s, advance_s, accepted = [], [], True
    for _ in range(rounds):
        matchers = [lib.matcher(state, compiled) for _ in range(batch)]
        bitmask = torch.full((batch, (tok.vocab_size + 31) // 32), -1, dtype=torch.int32)
        fill = advance = 0.0
        for tk in tokens:
            t0 = time.perf_counter()
            lib.fill(state, matchers, bitmask)
            t1 = time.perf_counter()
            # every row's mask must allow the reference token (a correctness check, not timed)
            accepted &= bool(((bitmask[:, tk // 32] >> (tk % 32)) & 1).all())
            t2 = time.perf_counter()
            accepted &= bool(lib.advance(state, matchers, [tk] * batch))
            advance += time.perf_counter() - t2
            fill += t1 - t0
        fill_s.append(fill / len(tokens))
        advance_s.append(advance / len(tokens))
    f, a = statistics.median(fill_s), statistics.median(advance_s)
    return {"fill_us": round(f * 1e6, 1), "advance_us": round(a * 1e6, 1), "step_us": round((f + a) * 1e6, 1),
            "step_us_per_row": round((f + a) * 1e6 / batch, 1), "accepted_reference_output": accepted}


def measure(lib, state, tok, kind, tokens, rounds) -> dict:
    t = time.perf_counter()
    compiled = lib.compile(state, kind)
    lib.matcher(state, compiled)  # llguidance builds its lexer here
    out = {"compile_ms": round((time.perf_counter() - t) * 1e3, 2), "tokens": len(tokens)}
    for b in (1, 16):
        out[f"batch{b}"] = walk(lib, state, tok, compiled, tokens, b, rounds)
    return out


def trajectory_masks(tok, kind: str) -> list[torch.Tensor] | None:
    """The bitmask rows llguidance produces along a reference output: the masks a sampler really applies."""
    try:
        lib = LLGuidance()
        gt = lib.prepare(tok)
        m = lib.matcher(gt, lib.compile(gt, kind))
    except ImportError:
        return None
    from nanoseek.infer.grammar import allocate_bitmask

    rows = []
    for tk in trajectories(tok)[kind]:
        bm = allocate_bitmask(1, tok.vocab_size)
        m.fill_row(bm[0])
        rows.append(bm[0].clone())
        m.advance(tk)
    return rows


def measure_apply(vocab: int, batch: int, masks: list[torch.Tensor] | None, calls: int) -> dict:
    """Microseconds to mask [batch, vocab] logits: real masks (the reference outputs' steps) and random bits."""
    from nanoseek.infer.grammar import apply_masks

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=g)
    W = (vocab + 31) // 32
    sets = {"random_bits": [torch.randint(-2**31, 2**31 - 1, (batch, W), dtype=torch.int32, generator=g)]}
    if masks:
        sets["reference_outputs"] = [torch.stack([masks[(s + b) % len(masks)] for b in range(batch)])
                                     for s in range(len(masks))]
    fns = {}
    for set_name, bms in sets.items():
        fns[f"nanoseek_apply_masks/{set_name}"] = lambda bms=bms: [apply_masks(logits.clone(), bm) for bm in bms]
        try:
            import xgrammar as xgr

            fns[f"xgrammar_cpu_kernel/{set_name}"] = \
                lambda bms=bms: [xgr.apply_token_bitmask_inplace(logits.clone(), bm) for bm in bms]
        except ImportError:
            pass
        fns[f"clone_only/{set_name}"] = lambda bms=bms: [logits.clone() for _ in bms]
    out = {}
    for name, fn in fns.items():
        n = len(sets[name.split("/")[1]])
        reps = max(1, calls // n)
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name] = (time.perf_counter() - t) / (reps * n) * 1e6
    return {k: round(max(v - out[f"clone_only/{k.split('/')[1]}"], 0.0), 1) for k, v in out.items()
            if not k.startswith("clone_only")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-vocab", type=int, default=4096)
    ap.add_argument("--large-vocab", type=int, default=128_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", default=None, help="directory to keep the trained tokenizers in between runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="bench_grammar_"))
    toks = build_tokenizers(cache, args.small_vocab, args.large_vocab)
    libs = []
    for lib in LIBRARIES:
        try:
            importlib.import_module(lib.dist)
            libs.append(lib)
        except ImportError:
            print(f"{lib.name}: not installed, skipped", flush=True)
    result = {"libraries": {}, "apply_us": {}, "tokenizers": {n: t.vocab_size for n, t in toks.items()},
              "load_average_at_start": list(os.getloadavg())}
    for lib in libs:
        entry = {"version": md.version(lib.dist), "footprint": footprint(lib.dist), "tokenizers": {}}
        for tname, tok in toks.items():
            t = time.perf_counter()
            state = lib.prepare(tok)
            row = {"prepare_tokenizer_ms": round((time.perf_counter() - t) * 1e3, 1)}
            for kind, tokens in trajectories(tok).items():
                try:
                    row[kind] = measure(lib, state, tok, kind, tokens, args.rounds)
                except Exception as e:  # a constraint the library cannot express is a result too
                    row[kind] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(f"{lib.name:14s} {tname:12s} {kind:12s} {json.dumps(row[kind])}", flush=True)
            entry["tokenizers"][tname] = row
        result["libraries"][lib.name] = entry
    for tname, tok in toks.items():
        masks = trajectory_masks(tok, "json_schema")
        result["apply_us"][tname] = {f"batch{b}": measure_apply(tok.vocab_size, b, masks, 200 if b == 1 else 40)
                                     for b in (1, 16)}
        print(f"apply {tname}: {result['apply_us'][tname]}", flush=True)
    result["load_average_at_end"] = list(os.getloadavg())
    # Only the full comparison replaces grammar.json; a venv with fewer libraries writes its own file.
    names = [lib.name for lib in libs]
    path = write_result("grammar" if len(libs) == len(LIBRARIES) else "grammar-" + "-".join(names), result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
