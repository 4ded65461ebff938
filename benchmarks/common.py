"""Shared benchmark helpers: alternating timed runs, medians, the fast dtype of this machine, JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

# Where every benchmark writes its JSON: benchmarks/results/, or $NANOSEEK_RESULTS_DIR, so that a second
# kind of machine keeps its own results beside the first's (e.g. benchmarks/results/epyc-avx512/).
RESULTS = Path(os.environ.get("NANOSEEK_RESULTS_DIR") or Path(__file__).parent / "results")
ROOT = Path(__file__).resolve().parent.parent


def fast_dtype(device: str = "cpu") -> torch.dtype:
    """bf16 where it is fast (CUDA, CPUs with AMX/AVX512-BF16), else fp32: the dtype `train.dtype = "auto"`
    picks (nanoseek.device.autocast_dtype), decided from the CPU's flags.

    On an AVX2-only CPU a bf16 matmul runs at ~0.3 GFLOP/s against ~100 for fp32, so "bf16 autocast" would
    benchmark the emulation, not either implementation. (A timing of one small matmul per dtype, used
    before, flipped between runs on a Zen 4 EPYC with AVX512-BF16, so one benchmark took fp32 there and
    another bf16.)
    """
    from nanoseek.device import autocast_dtype

    return autocast_dtype("auto", torch.device(device)) or torch.float32


def alternate(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each function once per round, in alternating order, and return the wall times per name."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            fns[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return times


@contextlib.contextmanager
def int8_activations(on: bool):
    """Int8 activations for int8 weights (nanoseek.infer.fast.kernels.set_int8_activations) on inside the block
    when `on`, off after it; nothing changes when not `on`."""
    if not on:
        yield
        return
    from nanoseek.infer.fast import kernels

    kernels.set_int8_activations(True)
    try:
        yield
    finally:
        kernels.set_int8_activations(False)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed_decode(model, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy decoding of the prompts together in nanoseek's engine, each to new_tokens tokens (no stop
    tokens): the seconds of its first step (the prefill and one token each) apart from the steps after it,
    the tokens those later steps produced, and each prompt's tokens."""
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams

    engine = Engine(model, max_batch_size=len(prompts), max_len=max(map(len, prompts)) + new_tokens + 2,
                    prefix_caching=False)
    reqs = [engine.submit(p, SamplingParams(max_tokens=new_tokens, temperature=0.0)) for p in prompts]
    t = time.perf_counter()
    engine.step()
    first = time.perf_counter() - t
    after_first = sum(len(r.output) for r in reqs)
    t = time.perf_counter()
    while not all(r.done.is_set() for r in reqs):
        engine.step()
    return {"first_step_s": first, "decode_s": time.perf_counter() - t,
            "decode_tokens": sum(len(r.output) for r in reqs) - after_first, "tokens": [list(r.output) for r in reqs]}


SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
              "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile", "asimd", "sve", "bf16", "i8mm")


def cpu_info() -> dict:
    """`lscpu`'s model name, CPU family and model number (a VM may show only "AMD EPYC": family 25 is
    Zen 3 / Zen 4, 26 is Zen 5), and the SIMD flags that decide which kernels and dtypes are fast."""
    import subprocess

    model, flags, ids = platform.processor() or platform.machine(), set(), {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            model = value.strip()
        elif key.strip() in ("CPU family", "Model"):
            ids["family" if key.strip() == "CPU family" else "model_number"] = value.strip()
        elif key.strip() == "Flags":
            flags = set(value.split())
    return {"model": model, **ids, "simd_flags": [f for f in SIMD_FLAGS if f in flags]}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu": cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------- the memory roofline
def bandwidth() -> dict:
    """What this machine's memory reaches at torch's thread count over 256 MB (far above any cache), best of 5:
    `copy_gbs`, a copy (read + write bytes); `read_gbs`, the fastest read: torch's sum (one stream per thread)
    or the kernels' read probe at 2, 4 and 8 streams per thread (kernels.read_streams: reading several parts
    of a buffer at once, the way the few-row matmuls read their weights; a single core's prefetchers follow
    one stream only so far). A decode step only reads its weights, so `read_gbs` is its roofline."""
    from nanoseek.infer.fast import kernels

    a, b = torch.empty(256 * 1024**2 // 4), torch.empty(256 * 1024**2 // 4)
    a.fill_(1.0)

    def best(fn) -> float:
        fn()
        t_best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            fn()
            t_best = min(t_best, time.perf_counter() - t)
        return t_best

    reads = {"torch_sum": a.nbytes / best(a.sum) / 1e9}
    if kernels.load() is not None:
        for streams in (2, 4, 8):
            reads[f"streams_{streams}"] = a.nbytes / best(lambda: kernels.read_streams(a, streams)) / 1e9
    return {"copy_gbs": round(2 * a.nbytes / best(lambda: b.copy_(a)) / 1e9, 2),
            "read_gbs": round(max(reads.values()), 2),
            "read_by_pattern_gbs": {k: round(v, 2) for k, v in reads.items()}}


def bandwidth_gbs() -> float:
    """The roofline bandwidth of a decode step: bandwidth()'s fastest read."""
    return bandwidth()["read_gbs"]


def step_bytes(model, batch: int) -> float:
    """Weight bytes one decode step reads: everything but the routed experts, plus the experts the batch
    is expected to touch per layer (all of top-k at batch 1; E * (1 - (1 - k/E)^batch) beyond). Counted
    from the tensors in memory, so bf16 / int8 / int4 weights and their scales count what they store. The
    MTP modules are left out: decoding without speculation never runs them."""
    from nanoseek.infer.quant import QuantExperts

    cfg = model.config
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    total, experts = 0, 0
    for name, m in model.named_modules():
        if name == "mtp" or name.startswith("mtp."):
            continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            nbytes = t.numel() * t.element_size()
            total += nbytes
            if isinstance(m, QuantExperts) or type(m).__name__ in ("GroupedExperts", "FastExperts"):
                experts += nbytes
    embed = model.embed_tokens.weight
    total -= embed.numel() * embed.element_size()  # a lookup reads one row, not the table
    return touched_bytes(total - experts, experts, E, K, batch)


def experts_touched(n_experts: int, top_k: int, batch: int) -> float:
    """How many of a layer's E routed experts a batch of independent tokens is expected to touch (uniform
    routing): E * (1 - (1 - k/E)^batch), k at batch 1."""
    return n_experts * (1 - (1 - top_k / n_experts) ** batch) if n_experts else 0.0


def touched_bytes(dense: float, experts: float, n_experts: int, top_k: int, batch: int) -> float:
    """Bytes a decode step reads: all the `dense` bytes, and of the routed experts' `experts` bytes the
    fraction a batch of independent tokens is expected to touch (experts_touched / E)."""
    if not n_experts:
        return dense + experts
    return dense + experts * experts_touched(n_experts, top_k, batch) / n_experts


# ----------------------------------------------------------------------------- this checkout against another
def run_worker(module: str, worker: str, src: str | None, argv: list[str]) -> dict:
    """Run `python -m benchmarks.MODULE --worker WORKER ARGV` with nanoseek imported from `src` (another
    checkout's src/ directory; None: this checkout) and return the JSON its last stdout line holds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()) if src else str(ROOT / "src"), str(ROOT)])
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--worker", worker, *argv]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"the {worker} worker ({src or 'this checkout'}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternate_checkouts(module: str, worker: str, before_src: str | None, rounds: int,
                        argv: list[str]) -> dict[str, list[dict]]:
    """Worker results per side, "after" (this checkout) and "before" (before_src, when given), in
    subprocesses that alternate round by round, so that a change in machine load hits both sides alike."""
    if not before_src:
        print(f"{worker}: no --before-src given, measuring this checkout only", flush=True)
    sides = {"after": None, **({"before": before_src} if before_src else {})}
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(rounds):
        for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            runs[side].append(run_worker(module, worker, sides[side], argv))
    return runs
