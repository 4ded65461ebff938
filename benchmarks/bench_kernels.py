"""The C++ decode kernels (nanoseek.infer.fast) against the torch paths they replace, piece by piece.

0. the CPU (`lscpu` model and SIMD flags), the instruction sets it runs and the one selected;
1. few-row matmuls: kernels.rows_matmul vs F.linear (and vs the torch-only few-row layouts that
   nanoseek.infer.fast uses without the kernels), weight bandwidth (GB/s) of an 8192x512 weight (the
   `bench` head) at 1, 2 and 16 rows, and the call time on a small 64x128 weight at 2 rows; then the
   same 8192x512 weights as fp32, bf16, int8 (group 128) and int4 (group 32), weight-only and (int8, int4)
   with int8 activations, through each runnable instruction set's build, as GB/s of weight bytes and as the speed-up over F.linear
   on the fp32 weight, from memory and from cache (one 1024x1024 weight again and again: each format's
   compute rate);
1b. the bf16 / int8 prefetch distance each build chose on this machine (nanoseek.infer.fast.prefetch), and
   the calibration the decode paths use (kernels.PATHS, nanoseek.infer.fast.modules.few_rows_linear and
   nanoseek.infer.quant.QuantLinear): kernel vs F.linear measured per shape and row bucket on first use,
   and which one each shape takes on this machine;
2. one `bench` MoE layer (router, routed and shared experts; the model accelerated) at 1 and 16 tokens:
   the kernel vs the torch path (kernels disabled: per-assignment GEMVs or the padded batched GEMM);
3. RMSNorm of one 512-wide row: the kernel vs F.rms_norm;
4. one `bench` decode step (batch 1, kernels on) run on the main thread vs on a second thread: with GNU
   OpenMP the second thread gets its own worker pool, which is why `nanoseek serve` keeps the engine on
   the main thread;
5. whole decode steps at batch 1 and 8, fp32 and bf16 weights, through each runnable build, alternating
   (whether the build selected by instruction set is also the fastest for whole steps here).

Run: `.venv/bin/python -m benchmarks.bench_kernels`. Results: benchmarks/results/kernels.json.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch
import torch.nn.functional as F

import nanoseek
from benchmarks.common import cpu_info, median, write_result
from nanoseek.config import preset
from nanoseek.infer import fast
from nanoseek.infer import quant
from nanoseek.infer.cache import PagedCache
from nanoseek.infer.fast import build, kernels
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


def bench_formats() -> dict:
    """GB/s of weight bytes per (instruction set, weight format, rows), and the speed-up over F.linear fp32:
    over 24 different weights (from memory), and over one 1024 x 1024 weight again and again (`cached`: it
    stays in the last-level cache, so the rate is that of the loop itself: what a format costs to compute).
    `int8_a8` / `int4_a8` are the int8 / int4 weights with int8 activations (kernels.set_int8_activations)."""
    convert = {"fp32": lambda w: (w, None), "bf16": lambda w: (w.bfloat16(), None),
               "int8": lambda w: quant.quantize_int8(w, 128), "int4": lambda w: quant.quantize_int4(w, 32)}
    out = {}
    for where, distinct, repeat in (("memory", [torch.randn(8192, 512) for _ in range(24)], 1),
                                    ("cached", [torch.randn(1024, 1024)], 32)):
        formats = {fmt: [f(w) for w in distinct] * repeat for fmt, f in convert.items()}
        formats["int8_a8"], formats["int4_a8"] = formats["int8"], formats["int4"]
        ws_fp32 = [w for w, _ in formats["fp32"]]
        n_in = distinct[0].shape[1]
        for rows in (1, 2, 16):
            x = torch.randn(rows, n_in)
            t_linear = per_call(lambda: [F.linear(x, w) for w in ws_fp32], 3) / len(ws_fp32)
            for isa in build.runnable_isas():
                ext = build.load(isa=isa)
                if ext is None:
                    continue
                for fmt, ws in formats.items():
                    w0, s0 = ws[0]
                    nbytes = w0.numel() * w0.element_size() + (s0.numel() * 4 if s0 is not None else 0)
                    ext.set_int8_activations(fmt.endswith("_a8"))
                    try:
                        t = per_call(lambda: [ext.rows_matmul(x, w, s) for w, s in ws], 3) / len(ws)
                    finally:
                        ext.set_int8_activations(False)
                    name = f"{isa}_{fmt}_rows_{rows}" + ("_cached" if where == "cached" else "")
                    out[name] = {"weight_gbs": round(nbytes / t / 1e9, 1), "speedup_vs_F.linear_fp32": round(t_linear / t, 2)}
    return out


def bench_calibration(model) -> list[dict]:
    """The kernel-or-torch choice of every few-row shape one decode step of the model meets."""
    kernels.PATHS.clear()
    for rows in (1, 2, 16):
        with torch.inference_mode():
            for lin in {m.weight.shape: m for m in model.modules() if isinstance(m, torch.nn.Linear)}.values():
                lin(torch.randn(rows, lin.in_features))
    return kernels.PATHS.table()


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


def decode_steps(model, batch: int = 1, steps: int = 100):
    """A function timing `steps` decode steps of `batch` rows (after a 32-token prefill per row and 8
    warm-up steps) on the engine's paged layout; it returns ms per step."""
    cache = PagedCache.for_model(model, 4 * batch, 64, torch.float32, "cpu")  # 256 positions per row
    tables = [[cache.pool.allocate() for _ in range(4)] for _ in range(batch)]
    zeros = torch.zeros(batch, dtype=torch.long)
    tok = torch.ones(batch, 1, dtype=torch.long)

    def run() -> float:
        with torch.inference_mode():
            model.forward_cached(torch.randint(3, 1000, (batch, 32)), cache.view(tables, zeros, 32))
            for p in range(32, 40):
                model.forward_cached(tok, cache.view(tables, torch.full((batch,), p), 1))
            t = time.perf_counter()
            for p in range(40, 40 + steps):
                model.forward_cached(tok, cache.view(tables, torch.full((batch,), p), 1))
            return (time.perf_counter() - t) / steps * 1e3

    return run


def bench_threads(model) -> dict:
    run = decode_steps(model)
    result = {"main_thread_ms": round(run(), 2)}
    helper = threading.Thread(target=lambda: result.__setitem__("second_thread_ms", round(run(), 2)))
    helper.start()
    helper.join()
    return result


def bench_isa_steps(models: dict, rounds: int = 3) -> dict:
    """ms per decode step of each model at batch 1 and 8 through each runnable build's kernels
    (NANOSEEK_KERNEL_ISA, which the kernels read at every call), the builds alternating over rounds
    (medians): whether the selected build is also the fastest for whole steps on this CPU."""
    isas = [isa for isa in build.runnable_isas() if build.load(isa=isa) is not None]
    before = os.environ.get(build.ISA_ENV)
    out = {}
    try:
        for name, model in models.items():
            for batch in (1, 8):
                run = decode_steps(model, batch, steps=30)
                times = {isa: [] for isa in isas}
                for r in range(rounds + 1):
                    for isa in (isas if r % 2 == 0 else isas[::-1]):
                        os.environ[build.ISA_ENV] = isa
                        t = run()
                        if r:  # round 0 warms each build up
                            times[isa].append(t)
                out[f"{name}_batch_{batch}_ms"] = {isa: round(median(v), 2) for isa, v in times.items()}
    finally:
        if before is None:
            os.environ.pop(build.ISA_ENV, None)
        else:
            os.environ[build.ISA_ENV] = before
    return out


def main(argv=None) -> dict:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    if kernels.load() is None:
        raise SystemExit("the decode kernels could not be built here (see the warning above)")
    torch.manual_seed(0)
    model = fast.accelerate(nanoseek.Transformer(preset("bench")).eval())
    cpu = cpu_info()
    print(f"CPU: {cpu['model']}; SIMD flags: {' '.join(cpu['simd_flags'])}")
    print(f"kernel builds this CPU runs: {', '.join(build.runnable_isas())}; selected: {kernels.isa()}")
    with torch.inference_mode():
        result = {"cpu": cpu, "runnable_isas": build.runnable_isas(), "selected_isa": kernels.isa(),
                  "int8_activation_kernel": kernels.int8_activation_kernel(),
                  "matmul": bench_matmul(), "formats": bench_formats(), "experts": bench_experts(model),
                  "rmsnorm": bench_rmsnorm()}
    # the bf16 / int8 prefetch distance each build measured (or was told) here: nanoseek.infer.fast.prefetch
    result["prefetch"] = {isa: build.status(isa)["prefetch"] for isa in build.runnable_isas()}
    print("bf16 / int8 prefetch by build: " + ", ".join(f"{isa} {p.get('bytes')} B ({p.get('read_gbs', p.get('source'))})"
                                                        for isa, p in result["prefetch"].items()))
    result["calibration"] = bench_calibration(model)
    result["decode_step_batch_1"] = bench_threads(model)
    torch.manual_seed(0)
    bf16 = fast.accelerate(quant.quantize_model(nanoseek.Transformer(preset("bench")).eval(), "bf16"))
    result["decode_step_by_isa"] = bench_isa_steps({"fp32": model, "bf16": bf16})
    m, e = result["matmul"], result["experts"]
    for rows in (1, 2, 16):
        r = m[f"rows_{rows}_gbs"]
        print(f"matmul 8192x512, {rows:>2} row(s): F.linear {r['F.linear']} GB/s, torch fallback "
              f"{r['torch_fallback']} GB/s, kernel {r['kernel']} GB/s")
    for name, r in result["formats"].items():
        print(f"matmul 8192x512 {name}: {r['weight_gbs']} GB/s of weight, {r['speedup_vs_F.linear_fp32']}x F.linear fp32")
    for c in result["calibration"]:
        print(f"calibration {' '.join(c['key'])}: kernel {c['kernel_s'] * 1e6:.0f} us, F.linear {c['torch_s'] * 1e6:.0f} us"
              f" -> {c['path']}" if c["kernel_s"] is not None else f"calibration {' '.join(c['key'])}: {c['path']} (forced)")
    s = m["small_64x128_rows_2_us"]
    print(f"matmul 64x128, 2 rows: F.linear {s['F.linear']} us, kernel {s['kernel']} us")
    for tokens in (1, 16):
        r = e[f"tokens_{tokens}_ms_per_layer"]
        print(f"MoE layer, {tokens:>2} token(s): torch {r['torch']} ms/layer, kernel {r['kernel']} ms/layer")
    print(f"RMSNorm 512: F.rms_norm {result['rmsnorm']['us']['F.rms_norm']} us, kernel {result['rmsnorm']['us']['kernel']} us")
    d = result["decode_step_batch_1"]
    print(f"decode step, batch 1: main thread {d['main_thread_ms']} ms, second thread {d['second_thread_ms']} ms")
    for name, r in result["decode_step_by_isa"].items():
        print(f"decode step {name} by build: " + ", ".join(f"{isa} {ms} ms" for isa, ms in r.items())
              + f" (selected: {result['selected_isa']})")
    print(f"wrote {write_result('kernels', result)}")
    return result


if __name__ == "__main__":
    main()
