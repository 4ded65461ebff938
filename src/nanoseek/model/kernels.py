"""Optional C++ decode kernels (csrc/decode_kernels.cpp), built on first use with torch's extension builder.

Decoding multiplies 1-16 activation rows by large weights; torch's CPU GEMM handles that shape poorly (a
single-threaded GEMV for one row, a re-pack of the whole weight for a few). The kernels stream each weight
row once on all intra-op threads. Measured by benchmarks/bench_kernels.py on the 2-core EPYC dev
machine, fp32: ~30 GB/s against 14 GB/s for F.linear at one row, 30 vs 7 GB/s at two, and a MoE layer of
a 16-token decode step in 2.1 instead of 5.4 ms.

The build needs a C++ compiler and ninja; it takes ~30 s once per machine (torch caches it under
~/.cache/torch_extensions). Without them, or with NANOSEEK_KERNELS=0, everything runs on the plain torch
paths, which compute the same values. Only fp32 CPU tensors go through the kernels.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "decode_kernels.cpp"

_lock = threading.Lock()
_ext = None
_tried = False
_disabled = 0  # > 0 inside `disabled()`


def _isa_flags() -> tuple[str, list[str]]:
    """AVX2 + FMA when this x86 CPU has them (the kernels' 8-lane vectors map to one register), else the
    compiler's baseline; the tag keeps builds for different instruction sets apart in torch's cache."""
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            flags = []
        if "avx2" in flags and "fma" in flags:
            return "avx2", ["-mavx2", "-mfma"]
    return "base", []


def load():
    """The compiled extension, building it on first call; None when it cannot be built or is disabled."""
    global _ext, _tried
    if _tried or os.environ.get("NANOSEEK_KERNELS", "1") == "0":
        return _ext
    with _lock:
        if _tried:
            return _ext
        try:
            from torch.utils.cpp_extension import load as build

            if shutil.which("ninja") is None:  # pip's ninja lives beside the interpreter of a venv
                os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
            tag, isa = _isa_flags()
            # -fopenmp: at::parallel_for is an inline `omp parallel`; without it the kernels run on one thread.
            _ext = build(name=f"nanoseek_decode_{tag}", sources=[str(SOURCE)],
                         extra_cflags=["-O3", "-ffp-contract=fast", "-fopenmp", *isa], extra_ldflags=["-fopenmp"],
                         verbose=False)
        except Exception as e:  # noqa: BLE001 - any build failure means: use the torch paths
            log.warning("nanoseek decode kernels unavailable (%s: %s); using the torch paths",
                        type(e).__name__, str(e).strip().splitlines()[-1][:200] if str(e).strip() else "")
            _ext = None
        _tried = True
    return _ext


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors may go through the kernels: fp32, on CPU, no autograd or autocast, kernels built."""
    if _disabled or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return False
    if not all(t.dtype == torch.float32 and t.is_cpu for t in tensors):
        return False
    return load() is not None


@contextlib.contextmanager
def disabled():
    """Run the block on the torch paths (tests compare the two; benchmarks can measure the difference)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def _built():
    ext = load()
    if ext is None:
        raise RuntimeError("the nanoseek decode kernels are not available (see the warning logged at build time)")
    return ext


def rows_matmul(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2d [M, K] @ weight[N, K]^T for a few rows."""
    return _built().rows_matmul(x2d.contiguous(), weight.contiguous())


def experts_rows(x_ND: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, idx_NK: torch.Tensor,
                 gate_NK: torch.Tensor) -> torch.Tensor:
    """sum_k gate[n, k] * expert_{idx[n, k]}(x[n]) for the stacked SwiGLU experts w1 [E, 2F, D], w2 [E, D, F]."""
    return _built().experts_rows(x_ND.contiguous(), w1.contiguous(), w2.contiguous(), idx_NK.contiguous(),
                             gate_NK.float().contiguous())


def block_decode(*args):
    """One decoder block of a decode step (see Block.forward_decode for the arguments)."""
    return _built().block_decode(*args)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in one loop (torch's CPU rms_norm is a chain of ~8 ops: ~15 us per call)."""
    return _built().rms_norm(x, weight, eps)
