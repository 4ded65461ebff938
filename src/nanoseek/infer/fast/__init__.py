"""Fast CPU decoding as a transform: `accelerate(model)` swaps the pure model's modules for subclasses
with decode paths, from outside, the way torchtitan's `parallelize` applies parallelism.

What it swaps (nanoseek.infer.fast.modules): nn.Linear -> FastLinear (few-row layouts and the C++
few-row matmul), RMSNorm -> FastRMSNorm (one C++ loop), GroupedExperts -> FastExperts (the padded GEMM
for mid-sized fp32 batches), MoE -> FastMoE (the C++ routed-expert kernel for up to a few thousand
assignments, one GEMV pair per assignment without it), Block / MTPModule -> FastBlock / FastMTPModule
(a whole decode step of the block in C++, fed a named BlockConfig / BlockWeights / CacheIndex; its
weights fp32, or as nanoseek.infer.quant stores them: bf16, int8 / int4 with scales, mixed freely).

Guarantees:
  * exact: the same values as the pure model up to fp32 rounding (the kernels sum in another order), so
    greedy tokens are the same; tests/test_kernels.py compares them;
  * training-safe: in train mode, with autograd or autocast on, every swapped module runs the pure
    module's own forward (the GRPO trainer trains the model its engine decodes with); `restore(model)`
    puts the pure classes back if wanted;
  * idempotent, and it keeps every parameter, buffer and state-dict name;
  * it leaves alone what it does not know: FP8 training wrappers, expert-parallel MoE, modules under FSDP;
    a swapped block still checks at each call that its parts are the plain ones before running in C++;
  * a model with any parameter off the CPU is returned untouched and the C++ kernels are not built.

The Engine applies it (and so nanoseek.generate, `nanoseek chat`, `serve`, GRPO rollouts and eval).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from . import kernels
from .modules import SWAPS

__all__ = ["accelerate", "restore", "kernels"]

_FAST = set(SWAPS.values())


def _fsdp_type():
    # A process that never imported FSDP has no FSDP module (and importing it costs over a second at start).
    if "torch.distributed.fsdp" not in sys.modules:
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return None
    return FSDPModule


def _plain_modules(module: nn.Module, fsdp):
    """The module tree, skipping every subtree that FSDP manages (its hooks and DTensors are its own)."""
    if fsdp is not None and isinstance(module, fsdp):
        return
    yield module
    for child in module.children():
        yield from _plain_modules(child, fsdp)


def weight_format(model: nn.Module) -> str | None:
    """The format the kernels stream this model's weights in: what nanoseek.infer.quant stored them as
    (bf16 | int8 | int4), fp32 for fp32 linear layers, None where no layer would take the kernels."""
    stored = getattr(model, "weight_format", None)
    if isinstance(stored, dict) and stored.get("format") in ("bf16", "int8", "int4"):
        return stored["format"]
    if any(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in model.modules()):
        return "fp32"
    return None


def accelerate(model: nn.Module) -> nn.Module:
    """Swap in the CPU decode paths, in place; returns the model. A no-op for a model not on the CPU."""
    tensors = list(model.parameters()) + list(model.buffers())
    if not tensors or not all(t.is_cpu for t in tensors):
        return model
    fmt = weight_format(model)
    if fmt is not None:
        kernels.prefer_format(fmt)  # the build measured fastest for this format on this CPU
        kernels.load()  # built (and chosen) now, once per machine, not inside the first request
    for module in list(_plain_modules(model, _fsdp_type())):
        fast = SWAPS.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo accelerate: the pure classes back, in place; returns the model."""
    for module in model.modules():
        if type(module) in _FAST:
            module.__class__ = type(module).pure
            module.__dict__.pop("_kernel_plan", None)
    return model
