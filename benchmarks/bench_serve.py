"""Serving benchmarks: a list of named cases, each writing its entry of benchmarks/results/serve.json
({"cases": [{"name": ...}, ...]}; other serving benchmarks keep their own named cases in the same list).

Paged latent cache and prefix caching (nanoseek.infer.cache), on the `bench` preset (random weights, context
4096), through the engine the server runs:

* ttft_cached_prefix: time to first token of a request whose 2,000-token prefix is in the prefix cache
  (a 32-token question after a cached system prompt) against the same request with a prefix never seen;
  rounds alternate, medians reported, and the first tokens of both must be the same greedy token.
* concurrency_before_after: 16 and 64 concurrent requests (128-token prompts, 64 new tokens each, greedy),
  all submitted at once: throughput and cache memory per sequence of this checkout's paged engine against
  the slot engine of `--before-src` (a checkout of main before paging, e.g. `git archive main`), run in
  subprocesses that alternate. Memory per sequence: the slot cache reserves max_len rows per slot (context
  4096 here); the paged cache holds the blocks a sequence uses (peak over the run / running sequences).
* decode_before_after: greedy decode tokens/s at batch 1 and 16 (prompt 32, 64 new, fp32) of the same two
  engines, alternating subprocesses: paging must not slow the C++ decode path down.
* shared_prefix_batch: 16 requests sharing a 1,000-token system prompt, arriving one step apart, with and
  without prefix caching: total time and prompt tokens computed.
* structured_output_overhead: the engine's time per generated token with every row constrained by a
  json_schema grammar (llguidance masks filled before each sampling step, applied to the logits, each
  token fed back; nanoseek.infer.logits) against the same rows unconstrained, at batch 1 and 16, in
  alternating rounds. Target: at most 10% more per token. A byte-level BPE is trained here to the
  preset's vocabulary size. Constrained rows run until their JSON is complete (at most --max-tokens);
  each unconstrained row ignores EOS and generates exactly as many tokens as its constrained twin, so
  both runs decode the same batch sizes step by step (a batch whose rows end early decodes fewer tokens
  per step: that must not count as grammar cost), and time is divided by the tokens generated.

Run: `.venv/bin/python -m benchmarks.bench_serve [--cases a,b] [--before-src DIR/src] [--threads N]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, alternate_checkouts, machine

def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def _model(preset_name: str):
    import nanoseek
    from nanoseek.config import preset

    torch.manual_seed(0)
    return nanoseek.Transformer(preset(preset_name)).eval()


# ----------------------------------------------------------------------------- cases
def case_ttft_cached_prefix(args) -> dict:
    from nanoseek.infer import Engine, SamplingParams

    model = _model(args.preset)
    V = model.config.vocab_size
    # Room for several 2,000-token prompts: the uncached ones of earlier rounds are evicted (least recently
    # used), not the system prompt that every "cached" round touches.
    engine = Engine(model, max_batch_size=1, max_len=4096, block_size=args.block_size,
                    cache_blocks=8 * (4096 // args.block_size))
    system = _prompts(1, 2000, V, seed=1)[0]
    question = _prompts(1, 32, V, seed=2)[0]
    one = SamplingParams(max_tokens=1)
    engine.generate_batch([system + _prompts(1, 32, V, seed=3)[0]], one)  # warm-up; caches the system prompt
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    first: dict[str, set] = {"cached": set(), "uncached": set()}
    cached_tokens = []
    for r in range(args.rounds):
        for kind in (("cached", "uncached") if r % 2 == 0 else ("uncached", "cached")):
            # uncached: a prefix this engine has never seen (so nothing but the question could match)
            prefix = system if kind == "cached" else _prompts(1, 2000, V, seed=100 + r)[0]
            t = time.perf_counter()
            c = engine.generate_batch([prefix + question], one)[0]
            times[kind].append(time.perf_counter() - t)
            if kind == "cached":
                cached_tokens.append(c.cached_tokens)
                first[kind].add(c.token_ids[0])
    # the same request computed in full gives the same first token
    ref = Engine(model, max_batch_size=1, max_len=4096, prefix_caching=False).generate_batch([system + question], one)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"preset": args.preset, "block_size": args.block_size, "prefix_tokens": 2000, "question_tokens": 32,
           "cached_tokens": cached_tokens[0], "ttft_s": {k: round(v, 4) for k, v in med.items()},
           "speedup": round(med["uncached"] / med["cached"], 2), "rounds": args.rounds,
           "same_first_token_as_full_recompute": first["cached"] == {ref[0].token_ids[0]},
           "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()}}
    print(f"ttft: 2,000-token prefix cached {med['cached'] * 1e3:.0f} ms vs not {med['uncached'] * 1e3:.0f} ms -> "
          f"{out['speedup']}x ({out['cached_tokens']} tokens read from the cache)", flush=True)
    return out


def _alternate_workers(kind: str, args, extra: list[str]) -> dict[str, list[dict]]:
    argv = ["--preset", args.preset, *extra, *(["--threads", str(args.threads)] if args.threads else [])]
    return alternate_checkouts("bench_serve", kind, args.before_src, args.rounds, argv)


def case_concurrency_before_after(args) -> dict:
    out = {}
    for n in (16, 64):
        runs = _alternate_workers("concurrency", args, ["--clients", str(n)])
        row = {}
        for side, rs in runs.items():
            row[side] = {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rs), 1),
                         "seconds": [r["seconds"] for r in rs],
                         "cache_mb_per_sequence": rs[0]["cache_mb_per_sequence"],
                         "cache_mb_total": rs[0]["cache_mb_total"], "engine": rs[0]["engine"]}
        if "before" in row:
            row["throughput_ratio_after_vs_before"] = round(row["after"]["tokens_per_s"] / row["before"]["tokens_per_s"], 3)
            row["memory_ratio_before_vs_after"] = round(row["before"]["cache_mb_per_sequence"] /
                                                        row["after"]["cache_mb_per_sequence"], 1)
            row["same_tokens"] = runs["after"][0]["digest"] == runs["before"][0]["digest"]
        out[f"clients_{n}"] = row
        print(f"concurrency {n}: " + ", ".join(f"{s} {v['tokens_per_s']} tok/s, {v['cache_mb_per_sequence']} MB cache "
                                              f"per sequence" for s, v in row.items() if isinstance(v, dict)), flush=True)
    return {"preset": args.preset, "prompt_tokens": 128, "new_tokens": 64, "max_len": 4096, "rounds": args.rounds,
            "before_src": args.before_src, **out}


def case_decode_before_after(args) -> dict:
    runs = _alternate_workers("decode", args, [])
    out = {}
    for B in ("1", "16"):
        row = {side: round(statistics.median(r["tokens_per_s"][B] for r in rs), 1) for side, rs in runs.items()}
        if "before" in row:
            row["ratio_after_vs_before"] = round(row["after"] / row["before"], 3)
            row["same_tokens"] = runs["after"][0]["digest"][B] == runs["before"][0]["digest"][B]
        out[f"batch_{B}_tokens_per_s"] = row
        print(f"decode batch {B}: {row}", flush=True)
    return {"preset": args.preset, "prompt_tokens": 32, "new_tokens": 64, "dtype": "fp32", "rounds": args.rounds,
            "before_src": args.before_src, **out}


def case_shared_prefix_batch(args) -> dict:
    from nanoseek.infer import Engine, SamplingParams

    model = _model(args.preset)
    V = model.config.vocab_size
    system = _prompts(1, 1000, V, seed=5)[0]
    prompts = [system + q for q in _prompts(16, 24, V, seed=6)]
    sp = SamplingParams(max_tokens=16)
    res, outs = {}, {}
    for reuse in (True, False):
        engine = Engine(model, max_batch_size=16, max_len=2048, block_size=args.block_size, prefix_caching=reuse)
        t = time.perf_counter()
        reqs = []
        for p in prompts:  # one arrival per engine step
            reqs.append(engine.submit(p, sp))
            engine.step()
        while not all(r.done.is_set() for r in reqs):
            engine.step()
        seconds = time.perf_counter() - t
        outs[reuse] = [r.result().token_ids for r in reqs]
        res["prefix_caching" if reuse else "no_prefix_caching"] = {
            "seconds": round(seconds, 3), "prompt_tokens_computed": engine.stats.prompt_tokens,
            "prompt_tokens_cached": engine.stats.prompt_cache_hit_tokens}
    res["speedup"] = round(res["no_prefix_caching"]["seconds"] / res["prefix_caching"]["seconds"], 2)
    res["same_tokens"] = outs[True] == outs[False]
    print(f"shared prefix, 16 requests: {res}", flush=True)
    return {"preset": args.preset, "block_size": args.block_size, "system_tokens": 1000, "question_tokens": 24,
            "new_tokens": 16, **res}


SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 24},
    "items": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 40},
    "score": {"type": "number"}}, "required": ["title", "items", "score"], "additionalProperties": False}


def case_structured_output_overhead(args) -> dict:
    from nanoseek.config import preset
    from nanoseek.data.corpus import builtin_corpus
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.grammar import GrammarTokenizer, Matcher, response_format_grammar
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.model import Transformer

    texts = list(builtin_corpus(2000, seed=0)) + [json.dumps({"title": "a list", "items": ["x", "yz"], "score": 1.5})] * 50
    cfg = preset(args.preset)
    tok = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset, vocab_size=tok.vocab_size)).eval()
    gtok = GrammarTokenizer(tok.hf, [tok.eos_id], vocab_size=model.config.vocab_size)
    grammar = gtok.compile(response_format_grammar({"type": "json_schema", "json_schema": {"name": "doc",
                                                                                           "schema": SCHEMA}}))
    g = torch.Generator().manual_seed(0)
    out = {}
    for batch in (1, 16):
        engine = Engine(model, max_batch_size=batch, max_len=256)
        prompts = [torch.randint(20, tok.vocab_size, (16,), generator=g).tolist() for _ in range(batch)]

        lengths = [args.max_tokens] * batch  # per row: the tokens its constrained run generates

        def run(constrained: bool) -> tuple[float, int]:
            reqs = []
            for i, p in enumerate(prompts):
                sp = SamplingParams(max_tokens=args.max_tokens if constrained else lengths[i], temperature=1.0,
                                    seed=i, stop_token_ids=[tok.eos_id] if constrained else [])
                reqs.append(engine.submit(p, sp, matcher=Matcher(gtok, grammar) if constrained else None))
            engine.step()  # the prefill step (its cost is not per generated token)
            n0 = sum(len(r.output) for r in reqs)
            t = time.perf_counter()
            while not all(r.done.is_set() for r in reqs):
                engine.step()
            if constrained:
                lengths[:] = [len(r.output) for r in reqs]
            return time.perf_counter() - t, sum(len(r.output) for r in reqs) - n0

        run(True), run(False)  # warm-up (and each row's length: seeded sampling repeats it every round)
        per_token = {"constrained": [], "unconstrained": []}
        for r in range(args.rounds):
            for kind in (("constrained", "unconstrained") if r % 2 == 0 else ("unconstrained", "constrained")):
                dt, n = run(kind == "constrained")
                per_token[kind].append(dt / max(n, 1))
        c, u = statistics.median(per_token["constrained"]), statistics.median(per_token["unconstrained"])
        out[f"batch_{batch}"] = {"unconstrained_ms_per_token": round(u * 1e3, 4),
                                 "constrained_ms_per_token": round(c * 1e3, 4), "overhead": round(c / u - 1, 4),
                                 "tokens_per_row": list(lengths)}
        print(f"batch {batch:2d}: {u * 1e3:.3f} ms/token free, {c * 1e3:.3f} constrained: overhead {c / u - 1:+.1%}",
              flush=True)
    return {"preset": args.preset, "vocab_size": model.config.vocab_size, "max_tokens": args.max_tokens,
            "rounds": args.rounds, "target_max_overhead": 0.10, **out}


CASES = [
    ("ttft_cached_prefix", case_ttft_cached_prefix),
    ("concurrency_before_after", case_concurrency_before_after),
    ("decode_before_after", case_decode_before_after),
    ("shared_prefix_batch", case_shared_prefix_batch),
    ("structured_output_overhead", case_structured_output_overhead),
]


# ----------------------------------------------------------------------------- workers (run by either checkout)
def _engine_kwargs(Engine) -> dict:
    import inspect

    return {"block_size": 64} if "block_size" in inspect.signature(Engine.__init__).parameters else {}


def _cache_mb_per_sequence(engine, peak_blocks: int, sequences: int) -> tuple[float, float]:
    """(MB of cache per sequence, MB allocated): paged: peak blocks held / sequences; slots: one slot's rows."""
    total = engine.cache.nbytes()
    if hasattr(engine, "block_size"):
        per_block = total / (engine.cache.num_blocks + 1)  # + the sink block
        return round(peak_blocks * per_block / sequences / 1e6, 3), round(total / 1e6, 1)
    return round(total / engine.max_batch_size / 1e6, 3), round(total / 1e6, 1)


def worker_concurrency(args) -> dict:
    import hashlib

    import nanoseek
    from nanoseek.infer import Engine, SamplingParams

    model = _model(args.preset)
    n = args.clients
    prompts = _prompts(n, 128, model.config.vocab_size, seed=11)
    engine = Engine(model, max_batch_size=n, max_len=4096, **_engine_kwargs(Engine))
    sp = SamplingParams(max_tokens=64)
    engine.generate_batch(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    peak = 0
    t = time.perf_counter()
    reqs = [engine.submit(p, sp, bounded=False) for p in prompts]
    while not all(r.done.is_set() for r in reqs):
        engine.step()
        if hasattr(engine, "block_size"):
            peak = max(peak, engine.cache_metrics()["blocks_used"])
    seconds = time.perf_counter() - t
    toks = [r.result().token_ids for r in reqs]
    per_seq, total = _cache_mb_per_sequence(engine, peak, n)
    return {"engine": nanoseek.__file__, "seconds": round(seconds, 3), "tokens_per_s": sum(map(len, toks)) / seconds,
            "cache_mb_per_sequence": per_seq, "cache_mb_total": total,
            "digest": hashlib.sha256(json.dumps(toks).encode()).hexdigest()[:16]}


def worker_decode(args) -> dict:
    import hashlib

    import nanoseek
    from nanoseek.infer import Engine, SamplingParams

    model = _model(args.preset)
    out, digest = {}, {}
    for B in (1, 16):
        prompts = _prompts(B, 32, model.config.vocab_size, seed=B)
        engine = Engine(model, max_batch_size=B, max_len=96, **_engine_kwargs(Engine))
        sp = SamplingParams(max_tokens=64)
        engine.generate_batch(prompts, sp)  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            toks = [c.token_ids for c in engine.generate_batch(prompts, sp)]
            times.append(time.perf_counter() - t)
        out[str(B)] = B * 64 / statistics.median(times)
        digest[str(B)] = hashlib.sha256(json.dumps(toks).encode()).hexdigest()[:16]
    return {"engine": nanoseek.__file__, "tokens_per_s": out, "digest": digest}


WORKERS = {"concurrency": worker_concurrency, "decode": worker_decode}


def write_cases(results: dict) -> Path:
    """Replace this run's cases in serve.json ({"cases": [{"name": ..., ...}, ...]}), keeping the others
    (structured-output overhead and any case not run now)."""
    path = RESULTS / "serve.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()).get("cases", []) if path.is_file() else []
    if isinstance(old, dict):  # the first layout of this file: {name: case}
        old = [{"name": k, **v} for k, v in old.items()]
    kept = [c for c in old if c.get("name") not in results]
    new = [{"name": k, **v, "machine": machine()} for k, v in results.items()]
    path.write_text(json.dumps({"cases": kept + new}, indent=2) + "\n")
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(name for name, _ in CASES))
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96, help="new tokens per row (structured_output_overhead)")
    ap.add_argument("--before-src", default=None,
                    help="the src/ directory of a checkout before paging (e.g. `git archive main | tar -x -C DIR`)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--worker", choices=sorted(WORKERS), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--clients", type=int, default=16, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return {}
    known = dict(CASES)
    chosen = [c for c in args.cases.split(",") if c]
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(known)}")
    results = {}
    for name in chosen:  # written after each case: a long run that stops keeps what it measured
        results[name] = known[name](args)
        path = write_cases({name: results[name]})
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
