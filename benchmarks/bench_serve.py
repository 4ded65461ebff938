"""Serving benchmarks, as a list of named cases in benchmarks/results/serve.json (other cases, such as
time to first token with a cached prefix and paging, append to the same list under their own names).

Case `structured_output_overhead`: the engine's time per generated token with every row constrained by a
json_schema grammar (llguidance masks filled before each sampling step, applied to the logits, each token
fed back; nanoseek.infer.logits) against the same rows unconstrained, at batch 1 and 16, measured in
alternating rounds in one process. Target: at most 10% more per token. The model has random weights
(the mask cost does not depend on them) at the `bench` preset's shape, with a byte-level BPE trained here
to the preset's vocabulary size; unconstrained rows ignore EOS and run to max_tokens, constrained rows
run until their JSON is complete, so time is divided by the tokens each actually generated.

Run: `.venv/bin/python -m benchmarks.bench_serve [--preset bench] [--rounds 3] [--max-tokens 96]`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import RESULTS, machine, median
from nanoseek.config import preset
from nanoseek.data.corpus import builtin_corpus
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.infer.engine import Engine
from nanoseek.infer.grammar import GrammarTokenizer, Matcher, response_format_grammar
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model import Transformer

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 24},
    "items": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 40},
    "score": {"type": "number"}}, "required": ["title", "items", "score"], "additionalProperties": False}


def _structured_overhead(args) -> list[dict]:
    texts = list(builtin_corpus(2000, seed=0)) + [json.dumps({"title": "a list", "items": ["x", "yz"], "score": 1.5})] * 50
    cfg = preset(args.preset)
    tok = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset, vocab_size=tok.vocab_size)).eval()
    gtok = GrammarTokenizer(tok.hf, [tok.eos_id], vocab_size=model.config.vocab_size)
    grammar = gtok.compile(response_format_grammar({"type": "json_schema", "json_schema": {"name": "doc",
                                                                                           "schema": SCHEMA}}))
    g = torch.Generator().manual_seed(0)
    cases = []
    for batch in (1, 16):
        engine = Engine(model, max_batch_size=batch, max_len=256)
        prompts = [torch.randint(20, tok.vocab_size, (16,), generator=g).tolist() for _ in range(batch)]

        def run(constrained: bool) -> tuple[float, int]:
            reqs = []
            for i, p in enumerate(prompts):
                sp = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i,
                                    stop_token_ids=[tok.eos_id] if constrained else [])
                reqs.append(engine.submit(p, sp, matcher=Matcher(gtok, grammar) if constrained else None))
            engine.step()  # the prefill step (its cost is not per generated token)
            n0 = sum(len(r.output) for r in reqs)
            t = time.perf_counter()
            while not all(r.done.is_set() for r in reqs):
                engine.step()
            return time.perf_counter() - t, sum(len(r.output) for r in reqs) - n0

        run(True), run(False)  # warm-up
        per_token = {"constrained": [], "unconstrained": []}
        for r in range(args.rounds):
            for kind in (("constrained", "unconstrained") if r % 2 == 0 else ("unconstrained", "constrained")):
                dt, n = run(kind == "constrained")
                per_token[kind].append(dt / max(n, 1))
        c, u = median(per_token["constrained"]), median(per_token["unconstrained"])
        cases.append({"name": "structured_output_overhead", "batch": batch, "preset": args.preset,
                      "vocab_size": model.config.vocab_size, "max_tokens": args.max_tokens, "rounds": args.rounds,
                      "unconstrained_ms_per_token": round(u * 1e3, 4), "constrained_ms_per_token": round(c * 1e3, 4),
                      "overhead": round(c / u - 1, 4), "target_max_overhead": 0.10})
        print(f"batch {batch:2d}: {u * 1e3:.3f} ms/token free, {c * 1e3:.3f} constrained: overhead {c / u - 1:+.1%}",
              flush=True)
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    cases = _structured_overhead(args)
    path = RESULTS / "serve.json"
    old = json.loads(path.read_text()).get("cases", []) if path.exists() else []
    names = {c["name"] for c in cases}
    # Keep other benchmarks' cases (paging, TTFT) and replace this run's own.
    result = {"cases": [c for c in old if c["name"] not in names] + cases, "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
