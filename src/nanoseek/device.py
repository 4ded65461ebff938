"""Which device and dtype to run on: helpers shared by training, inference and serving.

Kept apart from `nanoseek.train` so that serving a model never imports the training stack: the
generate/chat/serve commands ask `cpu_has_fast_bf16` whether to upcast fp16 weights, and the training
loop asks the same question to choose its autocast dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanoseek.config import ConfigError


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16. Without them a bf16 matmul on a CPU runs orders of magnitude slower than fp32
    (the AVX2 machines this project is developed on; see the README's "This machine")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a `train.dtype` setting (None = plain fp32): "fp32", "bf16", or "auto" =
    bf16 on CUDA and on CPUs with fast bf16, fp32 elsewhere. Master weights and moments stay fp32."""
    if dtype == "fp32":
        return None
    if dtype == "bf16":
        return torch.bfloat16
    fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    return torch.bfloat16 if fast else None


def resolve_device(name: str, key: str = "device") -> torch.device:
    """"auto" = cuda when available, else cpu; an explicit cuda device must exist (`key` names the setting)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "meta"):
        raise ConfigError(f"{key} {name}: unknown device", hint="use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"{key} {name}: CUDA is not available ({build})", hint="use --device cpu"
                              if key == "--device" else f"set {key} = \"cpu\" or \"auto\"")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{key} {name}: there are {torch.cuda.device_count()} CUDA device(s)",
                              hint=f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def device_peak_flops(device: torch.device, dtype: torch.dtype | None) -> float:
    """Peak matmul FLOP/s of one device: a known GPU's table figure, else measured once and cached
    (nanoseek.mfu.measured_peak_flops)."""
    from nanoseek import mfu

    if device.type == "cuda":
        try:
            return mfu.peak_flops(mfu.device_name(device), "bf16")
        except ValueError:
            pass
    return mfu.measured_peak_flops(device, dtype or torch.float32)
