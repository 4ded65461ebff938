"""The C++ decode kernels from Python: when a tensor may take them, and one thin wrapper per entry point.

The kernels (csrc/, built once per machine and instruction set by nanoseek.infer.fast.build) compute what
the torch paths compute, for CPU tensors at inference: few-row matmuls that stream each weight once on
all threads (fp32 weights, or bf16 / int8 / int4 weights widened in registers), the routed experts of a few
tokens read once per chosen expert, RMSNorm in one loop, and a whole decoder block of a decode step.
benchmarks/bench_kernels.py measures each against the torch path it replaces (results in
benchmarks/results/kernels.json).

`faster_path` is where a few-row matmul chooses between the kernel and torch's own path: measured once
per (weight format, shape, row bucket, threads) in this process, never assumed (PathChoice).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch

from .build import KERNELS, load, prefer_format, status

__all__ = ["load", "status", "usable", "disabled", "op_by_op", "whole_blocks", "rows_matmul", "experts_rows",
           "rms_norm", "read_streams", "block_decode", "block_config", "block_weights", "cache_index", "isa",
           "faster_path", "row_bucket", "PATHS", "int8_activations", "set_int8_activations",
           "int8_activation_kernel", "prefer_format"]

class _Switch:
    """A process-wide switch that is on inside any open `with switch.on():` block (nested blocks count)."""

    def __init__(self):
        self.depth = 0

    def __bool__(self) -> bool:
        return self.depth > 0

    @contextlib.contextmanager
    def on(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


_disabled = _Switch()  # on inside `disabled()`
_op_by_op = _Switch()  # on inside `op_by_op()`


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors may go through the kernels: fp32, on CPU, no autograd or autocast, kernels built
    (the first call on a CPU builds them if no build exists)."""
    if _disabled or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return False
    if not all(t.dtype == torch.float32 and t.is_cpu for t in tensors):
        return False
    return load() is not None


def disabled():
    """Run on the torch paths (tests compare the two; benchmarks measure the difference)."""
    return _disabled.on()


def op_by_op():
    """Run decode steps block by block from Python, one module at a time (each still takes its kernels),
    instead of one block_decode call per block: what tests and benchmarks compare the C++ block against."""
    return _op_by_op.on()


def whole_blocks() -> bool:
    """Whether a decode step may run each block as one block_decode call (not inside `op_by_op()`)."""
    return not _op_by_op


def _built():
    ext = load()
    if ext is None:
        raise RuntimeError(f"the nanoseek decode kernels are not available ({status()['state']}: "
                           f"{status()['reason'] or 'see the message printed at build time'})")
    return ext


def rows_matmul(x2d: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x2d [M, K] fp32 @ weight[N, K]^T for a few rows (M >= 1); weight fp32, bf16, or int8 / packed int4
    (uint8 [N, K / 2]) with its scale [N, K / group] fp32 (each row's groups of inputs share one scale)."""
    return _built().rows_matmul(x2d.contiguous(), weight.contiguous(), scale)


def experts_rows(x_ND: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, idx_NK: torch.Tensor,
                 gate_NK: torch.Tensor, s1: torch.Tensor | None = None, s2: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k gate[n, k] * expert_{idx[n, k]}(x[n]) for the stacked SwiGLU experts w1 [E, 2F, D], w2 [E, D, F]
    (fp32, bf16, or int8 with scales s1 [E, 2F, D / g1], s2 [E, D, F / g2])."""
    return _built().experts_rows(x_ND.contiguous(), w1.contiguous(), w2.contiguous(), idx_NK.contiguous(),
                                 gate_NK.float().contiguous(), s1, s2)


def read_streams(x: torch.Tensor, streams: int) -> float:
    """x.sum() of a 1-D fp32 tensor, each thread's share read as `streams` (1, 2, 4, 8) equal parts at once:
    the memory-read probe of the benchmarks (rows_matmul's access pattern, without the multiply)."""
    return _built().read_streams(x.contiguous(), streams)


def int8_activations() -> bool:
    """Whether int8 and int4 weights take int8 activations in the kernels (False without kernels)."""
    ext = load()
    return False if ext is None else ext.int8_activations()


def set_int8_activations(on: bool) -> None:
    """Switch int8 activations for int8 and int4 weights on or off, process-wide (csrc/gemv_int8act.h): each
    few-row matmul against such weights quantizes its activation rows per block of up to 128 inputs and sums
    exact integer products, faster where the weight-only loop is bound by widening weights, not by memory;
    the logits move by the activations' rounding (benchmarks/bench_quant.py measures both against fp32).
    Weights whose groups fit no block (fewer than 32 inputs, or not a multiple of 32; int4 rows that are not
    a multiple of 64 inputs on x86) keep the weight-only loop. Raises where the kernels are not available
    (the torch paths have no int8 activations)."""
    _built()
    KERNELS.set_int8_activations(on)  # every loaded build, and those loaded later


def int8_activation_kernel() -> str | None:
    """The int8-activation loop this CPU runs (avx512-vnni | avx2 | portable), None without kernels."""
    ext = load()
    return None if ext is None else ext.int8_activation_kernel()


def isa() -> str | None:
    """The instruction set of the loaded kernels (avx512 | avx2 | portable), None without them."""
    ext = load()
    return None if ext is None else ext.kernel_isa()


# ----------------------------------------------------------------------------- kernel or torch, measured
PATHS_ENV = "NANOSEEK_KERNEL_PATHS"  # measure (default) | kernel | torch


def row_bucket(rows: int) -> int:
    """Rows rounded up to a power of two: one measurement stands for 5-8 rows, 9-16, ..."""
    return 1 << max(0, rows - 1).bit_length()


class PathChoice:
    """Which of two equal computations is faster, per key, measured on first use in this process.

    A key is (weight format, weight shape, row bucket) and the thread count it runs at (what is faster on
    one thread need not be on several). The first call with a key runs both paths on its real input,
    alternately (REPEATS each, after one warm-up), and keeps the one with the lower best time; later calls
    take it at a dict lookup. NANOSEEK_KERNEL_PATHS=kernel|torch skips the measurement.
    `table()` is what bench_kernels prints.
    """

    REPEATS = 3

    def __init__(self):
        self.lock = threading.Lock()
        self.choices: dict[tuple, dict] = {}

    def run(self, key: tuple, kernel_fn, torch_fn, *args):
        key = (*key, torch.get_num_threads())
        choice = self.choices.get(key)
        if choice is not None:
            return (kernel_fn if choice["path"] == "kernel" else torch_fn)(*args)
        mode = os.environ.get(PATHS_ENV, "measure")
        if mode in ("kernel", "torch"):
            self.choices[key] = {"path": mode, "kernel_s": None, "torch_s": None}
            return (kernel_fn if mode == "kernel" else torch_fn)(*args)
        times = {"kernel": [], "torch": []}
        out = None
        for i in range(self.REPEATS + 1):
            for name, fn in (("kernel", kernel_fn), ("torch", torch_fn)):
                t0 = time.perf_counter()
                out = fn(*args)
                if i:  # the first round warms caches and allocators up
                    times[name].append(time.perf_counter() - t0)
        best = {name: min(t) for name, t in times.items()}
        with self.lock:
            self.choices[key] = {"path": min(best, key=best.get), "kernel_s": best["kernel"], "torch_s": best["torch"]}
        return out  # torch's output (both are the same values up to fp32 rounding)

    def table(self) -> list[dict]:
        return [{"key": list(map(str, k)), **v} for k, v in sorted(self.choices.items(), key=str)]

    def clear(self):
        self.choices.clear()


PATHS = PathChoice()


def faster_path(key: tuple, kernel_fn, torch_fn, *args):
    """kernel_fn(*args) or torch_fn(*args), whichever PATHS measured faster for this key."""
    return PATHS.run(key, kernel_fn, torch_fn, *args)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in one loop (torch's CPU rms_norm is a chain of small ops)."""
    return _built().rms_norm(x, weight, eps)


def block_decode(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_layer: torch.Tensor, index,
                 weights, config) -> torch.Tensor:
    """One decoder block of a decode step: x [B, T, D] and its rope angles, this layer's cache rows, a
    CacheIndex (cache_index), the block's BlockWeights and BlockConfig (block_weights, block_config).
    The projections and experts may be fp32, bf16, or int8 / packed int4 with their `<name>_scale`."""
    return _built().block_decode(x, cos, sin, kv_layer, index, weights, config)


def block_config(**fields):
    """A BlockConfig with the given fields (ModelConfig's names; see csrc/decode_kernels.cpp)."""
    cfg = _built().BlockConfig()
    for name, value in fields.items():
        setattr(cfg, name, value)
    cfg.check()
    return cfg


def block_weights(**tensors: torch.Tensor):
    """A BlockWeights holding the given tensors under their module names (an int8 / int4 weight's scales
    under `<name>_scale`)."""
    w = _built().BlockWeights()
    for name, t in tensors.items():
        setattr(w, name, t)
    return w


def cache_index(block_table: torch.Tensor, write_rows: torch.Tensor, block_size: int, kv_len: int,
                bias: torch.Tensor | None):
    """Where a batch's rows live in the paged cache: block_table [B, nb] (position p of row b is in block
    block_table[b, p // block_size]), write_rows [B, T] (each new token's row in the [blocks * block_size, W]
    view of a layer), positions read [0, kv_len), the additive mask [B, T*H, kv_len]."""
    return _built().CacheIndex(block_table=block_table.contiguous(), write_rows=write_rows.contiguous(),
                               block_size=block_size, kv_len=kv_len, bias=bias)
