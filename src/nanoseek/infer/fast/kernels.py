"""The C++ decode kernels from Python: when a tensor may take them, and one thin wrapper per entry point.

The kernels (csrc/decode_kernels.cpp, built once per machine by nanoseek.infer.fast.build) compute what
the torch paths compute, for fp32 CPU tensors at inference: few-row matmuls that stream each weight
once on all threads, the routed experts of a few tokens read once per chosen expert, RMSNorm in one
loop, and a whole decoder block of a decode step. benchmarks/bench_kernels.py measures each against the
torch path it replaces (results in benchmarks/results/kernels.json).
"""

from __future__ import annotations

import contextlib

import torch

from .build import load, status

__all__ = ["load", "status", "usable", "disabled", "rows_matmul", "experts_rows", "rms_norm", "block_decode",
           "block_config", "block_weights", "cache_index"]

_disabled = 0  # > 0 inside `disabled()`


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors may go through the kernels: fp32, on CPU, no autograd or autocast, kernels built
    (the first call on a CPU builds them if no build exists)."""
    if _disabled or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return False
    if not all(t.dtype == torch.float32 and t.is_cpu for t in tensors):
        return False
    return load() is not None


@contextlib.contextmanager
def disabled():
    """Run on the torch paths (tests compare the two; benchmarks measure the difference)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def _built():
    ext = load()
    if ext is None:
        raise RuntimeError(f"the nanoseek decode kernels are not available ({status()['state']}: "
                           f"{status()['reason'] or 'see the message printed at build time'})")
    return ext


def rows_matmul(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2d [M, K] @ weight[N, K]^T for a few rows (M >= 1)."""
    return _built().rows_matmul(x2d.contiguous(), weight.contiguous())


def experts_rows(x_ND: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, idx_NK: torch.Tensor,
                 gate_NK: torch.Tensor) -> torch.Tensor:
    """sum_k gate[n, k] * expert_{idx[n, k]}(x[n]) for the stacked SwiGLU experts w1 [E, 2F, D], w2 [E, D, F]."""
    return _built().experts_rows(x_ND.contiguous(), w1.contiguous(), w2.contiguous(), idx_NK.contiguous(),
                                 gate_NK.float().contiguous())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in one loop (torch's CPU rms_norm is a chain of small ops)."""
    return _built().rms_norm(x, weight, eps)


def block_decode(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_layer: torch.Tensor, index,
                 weights, config) -> torch.Tensor:
    """One decoder block of a decode step: x [B, T, D] and its rope angles, this layer's cache rows, a
    CacheIndex (cache_index), the block's BlockWeights and BlockConfig (block_weights, block_config)."""
    return _built().block_decode(x, cos, sin, kv_layer, index, weights, config)


def block_config(**fields):
    """A BlockConfig with the given fields (ModelConfig's names; see csrc/decode_kernels.cpp)."""
    cfg = _built().BlockConfig()
    for name, value in fields.items():
        setattr(cfg, name, value)
    cfg.check()
    return cfg


def block_weights(**tensors: torch.Tensor):
    """A BlockWeights holding the given tensors under their module names."""
    w = _built().BlockWeights()
    for name, t in tensors.items():
        setattr(w, name, t)
    return w


def cache_index(slots: torch.Tensor, positions: torch.Tensor, first_slot: int | None, kv_len: int,
                bias: torch.Tensor | None):
    """Where a batch's rows live in the cache: slots [B], positions [B, T], the first slot of a contiguous
    range (None if the slots are not one), positions read [0, kv_len), the additive mask [B, T*H, kv_len]."""
    return _built().CacheIndex(slots=slots.contiguous(), positions=positions.contiguous(),
                               first_slot=-1 if first_slot is None else first_slot, kv_len=kv_len, bias=bias)
