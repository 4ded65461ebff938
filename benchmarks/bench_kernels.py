"""The C++ decode kernels (nanoseek.infer.fast) against the torch paths they replace, piece by piece.

1. few-row matmuls: kernels.rows_matmul vs F.linear (and vs the torch-only few-row layouts that
   nanoseek.infer.fast uses without the kernels), weight bandwidth (GB/s) of an 8192x512 weight (the
   `bench` head) at 1, 2 and 16 rows, and the call time on a small 64x128 weight at 2 rows;
2. one `bench` MoE layer (router, routed and shared experts; the model accelerated) at 1 and 16 tokens:
   the kernel vs the torch path (kernels disabled: per-assignment GEMVs or the padded batched GEMM);
3. RMSNorm of one 512-wide row: the kernel vs F.rms_norm;
4. one `bench` decode step (batch 1, kernels on) run on the main thread vs on a second thread: with GNU
   OpenMP the second thread gets its own worker pool, which is why `nanoseek serve` keeps the engine on
   the main thread.

Run: `.venv/bin/python -m benchmarks.bench_kernels`. Results: benchmarks/results/kernels.json.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
import torch.nn.functional as F

import nanoseek
from benchmarks.common import write_result
from nanoseek.config import preset
from nanoseek.infer import fast
from nanoseek.infer.cache import SlotCache
from nanoseek.infer.fast import kernels
from nanoseek.infer.fast.modules import few_rows_linear


def per_call(fn, calls: int) -> float:
    """Seconds per call, after a warm-up call."""
    fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def bench_matmul() -> dict:
    out = {}
    weights = [torch.randn(8192, 512) for _ in range(24)]  # 400 MB: every call streams from memory
    gb = weights[0].numel() * 4 / 1e9
    for rows in (1, 2, 16):
        x = torch.randn(rows, 512)
        t_torch = per_call(lambda: [F.linear(x, w) for w in weights], 3) / len(weights)
        t_kernel = per_call(lambda: [kernels.rows_matmul(x, w) for w in weights], 3) / len(weights)
        with kernels.disabled():  # the torch-only few-row layouts (split GEMV, W @ x^T)
            t_fallback = per_call(lambda: [few_rows_linear(x, w) for w in weights], 3) / len(weights)
        out[f"rows_{rows}_gbs"] = {"F.linear": round(gb / t_torch, 1), "torch_fallback": round(gb / t_fallback, 1),
                                   "kernel": round(gb / t_kernel, 1)}
    small, x = torch.randn(64, 128), torch.randn(2, 128)
    out["small_64x128_rows_2_us"] = {"F.linear": round(per_call(lambda: F.linear(x, small), 2000) * 1e6, 1),
                                     "kernel": round(per_call(lambda: kernels.rows_matmul(x, small), 2000) * 1e6, 1)}
    return out


def bench_experts(model) -> dict:
    out = {}
    moes = model.moe_layers(include_mtp=False)
    for tokens in (1, 16):
        x = torch.randn(1, tokens, model.config.hidden_size)

        def run():
            for m in moes:
                m(x)

        t_kernel = per_call(run, 20) / len(moes)
        with kernels.disabled():
            t_torch = per_call(run, 20) / len(moes)
        out[f"tokens_{tokens}_ms_per_layer"] = {"torch": round(t_torch * 1e3, 3), "kernel": round(t_kernel * 1e3, 3)}
    return out


def bench_rmsnorm() -> dict:
    x, w = torch.randn(1, 1, 512), torch.ones(512)
    return {"us": {"F.rms_norm": round(per_call(lambda: F.rms_norm(x, (512,), w, 1e-6), 5000) * 1e6, 1),
                   "kernel": round(per_call(lambda: kernels.rms_norm(x, w, 1e-6), 5000) * 1e6, 1)}}


def bench_threads(model) -> dict:
    cache = SlotCache.for_model(model, 1, 256, torch.float32, "cpu")
    zero = torch.zeros(1, dtype=torch.long)
    model.forward_cached(torch.randint(3, 1000, (1, 32)), cache.view(zero, zero, 32))
    tok = torch.ones(1, 1, dtype=torch.long)
    result = {}

    def steps(name: str) -> None:
        with torch.inference_mode():
            for p in range(32, 40):
                model.forward_cached(tok, cache.view(zero, torch.tensor([p]), 1))
            t = time.perf_counter()
            for p in range(40, 140):
                model.forward_cached(tok, cache.view(zero, torch.tensor([p]), 1))
            result[name] = round((time.perf_counter() - t) / 100 * 1e3, 2)

    steps("main_thread_ms")
    helper = threading.Thread(target=steps, args=("second_thread_ms",))
    helper.start()
    helper.join()
    return result


def main(argv=None) -> dict:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    if kernels.load() is None:
        raise SystemExit("the decode kernels could not be built here (see the warning above)")
    torch.manual_seed(0)
    model = fast.accelerate(nanoseek.Transformer(preset("bench")).eval())
    with torch.inference_mode():
        result = {"matmul": bench_matmul(), "experts": bench_experts(model), "rmsnorm": bench_rmsnorm()}
    result["decode_step_batch_1"] = bench_threads(model)
    m, e = result["matmul"], result["experts"]
    for rows in (1, 2, 16):
        r = m[f"rows_{rows}_gbs"]
        print(f"matmul 8192x512, {rows:>2} row(s): F.linear {r['F.linear']} GB/s, torch fallback "
              f"{r['torch_fallback']} GB/s, kernel {r['kernel']} GB/s")
    s = m["small_64x128_rows_2_us"]
    print(f"matmul 64x128, 2 rows: F.linear {s['F.linear']} us, kernel {s['kernel']} us")
    for tokens in (1, 16):
        r = e[f"tokens_{tokens}_ms_per_layer"]
        print(f"MoE layer, {tokens:>2} token(s): torch {r['torch']} ms/layer, kernel {r['kernel']} ms/layer")
    print(f"RMSNorm 512: F.rms_norm {result['rmsnorm']['us']['F.rms_norm']} us, kernel {result['rmsnorm']['us']['kernel']} us")
    d = result["decode_step_batch_1"]
    print(f"decode step, batch 1: main thread {d['main_thread_ms']} ms, second thread {d['second_thread_ms']} ms")
    print(f"wrote {write_result('kernels', result)}")
    return result


if __name__ == "__main__":
    main()
