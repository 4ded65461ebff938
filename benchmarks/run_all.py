"""`make bench`: every benchmark, one after another; each prints its ratios and writes benchmarks/results/NAME.json."""

from __future__ import annotations

import importlib
import sys
import time

BENCHMARKS = [
    ("bench_train", "training step vs transformers (grouped_mm experts)"),
    ("bench_generate", "greedy decode vs transformers generate(), server load test, MTP speculative decoding"),
    ("bench_fp8", "FP8 vs full-precision training loss gap"),
    ("bench_grpo", "GRPO rollout + update throughput, batched engine vs one-by-one"),
    ("bench_grpo_trl", "one GRPO step vs TRL's GRPOTrainer, side by side (needs the [bench] extra)"),
    ("bench_kernels", "C++ decode kernels vs the torch paths they replace, piece by piece"),
    ("bench_quant", "bf16 / int8 weight-only decoding vs fp32: logit error, greedy agreement, tokens/s"),
    ("bench_dsa", "attention cost per token vs context length, MLA vs V3.2 sparse attention"),
    ("bench_passkey", "passkey accuracy: dense V3, converted to V3.2, after the warm-up and sparse training, and a dense control (30-45 min)"),
    ("bench_eplb", "EPLB: max/mean tokens per EP rank before and after, Zipf loads and a trained model's routing"),
    ("bench_grammar", "structured-output libraries: mask cost per step, compile time, footprint"),
    ("bench_serve", "serving: structured-output overhead per generated token at batch 1 and 16"),
]

# long or disk-hungry: only with `python -m benchmarks.run_all --slow`
SLOW = [
    ("bench_16b", "16B-class checkpoints (V2-Lite, Moonlight shapes): int8 quantize shard by shard, peak RSS, tok/s"),
    ("bench_llamacpp", "greedy decode at batch 1 vs llama.cpp (f32, bf16, f16, Q8_0; builds llama.cpp once, cached)"),
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    failed = []
    for name, what in BENCHMARKS + (SLOW if "--slow" in argv else []):
        print(f"\n=== {name}: {what}", flush=True)
        t = time.time()
        try:
            importlib.import_module(f"benchmarks.{name}").main([])
        except (Exception, SystemExit) as e:  # keep going: one broken benchmark must not hide the others' numbers
            failed.append(name)
            print(f"{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"=== {name} took {time.time() - t:.0f}s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
