"""Model FLOPs utilization: peak FLOP/s tables for known accelerators, a measured matmul peak, and MFU.

MFU (PaLM, Chowdhery et al. 2022, appendix B) = model FLOPs per token x tokens/s / peak FLOP/s, where the
model FLOPs are `nanoseek.accounting.training_flops_per_token` (no rematerialization counted). The peak is
either the vendor's dense figure for a known GPU (`GPU_PEAKS`, no structured-sparsity doubling) or one
measured on this machine by a large matmul (`measured_peak_flops`, cached per device, dtype, torch
version and core count, since a CPU has no published tensor-core peak).
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import torch

# Dense BF16 tensor-core peak FLOP/s per GPU. Vendors quote "with sparsity" figures twice these.
GPU_PEAKS: dict[str, float] = {
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): BF16 1,979 TFLOPS SXM, 1,513 PCIe,
    # 1,671 NVL, all "with sparsity".
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    # H800 SXM5: the H100 SXM die with NVLink cut to 400 GB/s; compute figures are the H100 SXM's.
    # DeepSeek-V3 trained on these (V3 report section 3.1).
    "H800": 989e12,
    # NVIDIA H200 datasheet: same compute as H100 SXM (BF16 1,979 TFLOPS with sparsity), more HBM.
    "H200": 989e12,
    "H200 NVL": 835e12,  # H200 NVL datasheet: BF16 1,671 TFLOPS with sparsity
    # NVIDIA H20 (China export part) product brief: BF16 148 TFLOPS dense.
    "H20": 148e12,
    # NVIDIA A100 datasheet: BF16 312 TFLOPS (624 with sparsity); the A800 is the same die, slower NVLink.
    "A100": 312e12,
    "A800": 312e12,
    # NVIDIA L40S datasheet: BF16 362.05 TFLOPS (733 with sparsity). L4 datasheet: 242 with sparsity.
    "L40S": 362e12,
    "L4": 121e12,
    # Ada Lovelace architecture whitepaper, appendix: RTX 4090 BF16 tensor with FP32 accumulate 165.2
    # TFLOPS (330.4 with sparsity). Ampere GA102 whitepaper: RTX 3090 71 TFLOPS (142 with sparsity).
    "RTX 4090": 165.2e12,
    "RTX 3090": 71e12,
    # NVIDIA HGX B200 spec: FP16/BF16 36 PFLOPS per 8 GPUs with sparsity -> 2.25 PFLOPS dense per GPU.
    # GB200 NVL72 spec: 360 PFLOPS BF16 per 72 GPUs with sparsity -> 2.5 PFLOPS dense per GPU.
    "B200": 2.25e15,
    "GB200": 2.5e15,
    # AMD Instinct MI300X datasheet: BF16 1,307.4 TFLOPS dense.
    "MI300X": 1307.4e12,
}

# Dense FP8 (E4M3) peaks where the GPU has FP8 tensor cores: twice BF16 on Hopper, Ada and Blackwell
# (same datasheets). V3 ran its GEMMs in FP8, so its MFU against this peak is half the BF16 one.
GPU_FP8_PEAKS: dict[str, float] = {
    "H100 SXM": 1979e12, "H100 PCIe": 1513e12, "H100 NVL": 1671e12, "H800": 1979e12, "H200": 1979e12, "H200 NVL": 1671e12,
    "H20": 296e12, "L40S": 733e12, "L4": 242.5e12, "B200": 4.5e15, "GB200": 5e15, "MI300X": 2614.9e12,
}

# Extra spellings, e.g. what torch.cuda.get_device_name() returns ("NVIDIA H100 80GB HBM3" is the SXM part).
_ALIASES: dict[str, str] = {
    "h100": "H100 SXM", "h100 sxm5": "H100 SXM", "4090": "RTX 4090", "3090": "RTX 3090",
}


def _words(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()


def resolve_gpu(name: str) -> str:
    """The GPU_PEAKS key for a user- or driver-given name ("h800", "NVIDIA H100 PCIe", "rtx-4090").

    The longest known name found inside `name` wins (spaces and dashes optional), and a match must not
    run on into another digit, so "H200" is not read as "H20" nor "L40S" as "L4". Raises ValueError
    listing the known GPUs.
    """
    text = _words(name)
    names = {_words(k): k for k in GPU_PEAKS} | _ALIASES
    for alias in sorted(names, key=lambda a: len(a.replace(" ", "")), reverse=True):
        pattern = r"(?<![a-z0-9])" + r"\s*".join(re.escape(w) for w in alias.split()) + r"(?![0-9])"
        if re.search(pattern, text):
            return names[alias]
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPU_PEAKS)}")


def peak_flops(gpu: str, dtype: str = "bf16") -> float:
    """Dense peak FLOP/s of a known GPU for dtype 'bf16' or 'fp8'."""
    key = resolve_gpu(gpu)
    if dtype == "bf16":
        return GPU_PEAKS[key]
    if dtype == "fp8":
        if key not in GPU_FP8_PEAKS:
            raise ValueError(f"{key} has no FP8 tensor cores in our table; use dtype bf16")
        return GPU_FP8_PEAKS[key]
    raise ValueError(f"dtype must be 'bf16' or 'fp8', got {dtype!r}")


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    """Model FLOPs utilization, a fraction (0.4 = 40%)."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return flops_per_token * tokens_per_s / peak


# ----------------------------------------------------------------------------- measured peak
def default_cache_path() -> Path:
    root = os.environ.get("NANOSEEK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanoseek")
    return Path(root) / "peak.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:  # platform.processor() is often empty on Linux; /proc/cpuinfo has the model name
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return str(device)


def _cache_key(device: torch.device, dtype: torch.dtype, size: int | None) -> str:
    # The CPU peak depends on how many cores torch may use, and kernels change between torch versions.
    return (f"{device_name(device)}|{device.type}|{str(dtype).replace('torch.', '')}"
            + (f"|n={size}" if size else "")
            + f"|torch {torch.__version__}|cpus {os.cpu_count()}|threads {torch.get_num_threads()}")


def _read_cache(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
        return {k: float(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError, TypeError):
        return {}  # missing or corrupt cache: measure again and rewrite it


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_matmul_flops(device: torch.device, dtype: torch.dtype, size: int, warmup: int = 2, iters: int = 5) -> float:
    """Best-of-`iters` FLOP/s of one size^3 matmul (2*size^3 FLOPs). Best, not mean: the peak is what the
    hardware can do, and the slower samples measure interference from the other processes."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(warmup):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def probe_size(device: torch.device, dtype: torch.dtype, max_size: int, target_s: float = 0.1) -> int:
    """The matmul size (a multiple of 256, at most max_size) that takes about `target_s` here.

    Needed because bf16 speed spans orders of magnitude across machines: a CPU without AVX-512 BF16 or
    AMX emulates bf16 matmuls (a 2048^3 product can take a minute there), one with AMX runs them in
    hardware."""
    rate = probe_matmul_flops(device, dtype, 256, warmup=1, iters=1)
    n = int((target_s * rate / 2.0) ** (1 / 3)) // 256 * 256
    return max(256, min(max_size, n))


def measured_peak_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                        size: int | None = None, cache_path: str | Path | None = None,
                        refresh: bool = False) -> float:
    """The matmul peak of this machine, measured once and cached in ~/.cache/nanoseek/peak.json
    ($NANOSEEK_CACHE_DIR overrides the folder), keyed by device name, dtype, torch version and cores.

    Without `size`, the probe is the largest square matmul up to 2048 (CPU) or 8192 (GPU, where smaller
    ones do not fill the device) that takes ~0.1 s, so the whole measurement stays around a second."""
    dev = torch.device(device)
    path = Path(cache_path) if cache_path else default_cache_path()
    key = _cache_key(dev, dtype, size)
    cache = _read_cache(path)
    if not refresh and key in cache:
        return cache[key]
    n = size or probe_size(dev, dtype, 8192 if dev.type == "cuda" else 2048)
    value = probe_matmul_flops(dev, dtype, n)
    cache[key] = value
    try:  # write-then-rename so a concurrent reader never sees half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home still gets a measured value, just not a cached one
    return value
