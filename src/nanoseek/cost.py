"""`nanoseek cost`: GPU-hours and dollars of a training run, or the MFU implied by a known GPU-hour figure.

GPU-seconds = tokens x training FLOPs per token / (peak FLOP/s x MFU). FLOPs per token come from
`nanoseek.accounting.training_flops_per_token` (6 x active matmul weights + causal attention, MTP
included), peaks from `nanoseek.mfu.GPU_PEAKS` (dense BF16; `--dtype fp8` for FP8 tensor-core peaks).
The default price, $2 per GPU-hour, is the H800 rental price the DeepSeek-V3 report (section 1, table 1)
uses for its $5.576M figure; its pre-training took 2,664K H800 GPU-hours for 14.8T tokens (180K per
trillion), which `--gpu-hours 2.664M` turns into an implied MFU.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass

from nanoseek.accounting import add_model_arguments, error, human, model_from_args, training_flops_per_token
from nanoseek.config import ConfigError
from nanoseek.mfu import GPU_PEAKS, peak_flops, resolve_gpu

_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def parse_count(text: str) -> float:
    """'14.8T' -> 1.48e13, '500B' -> 5e11, '2.664M', '180K', '1e12', '1_000_000', '2,048'. B = billion."""
    s = str(text).strip().replace(",", "").replace("_", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]?)", s)
    if not m or m.group(2).lower() not in _SUFFIXES:
        raise ValueError(f"cannot read {text!r} as a count; use a number with an optional suffix "
                         f"K, M, B (billion), T or P, e.g. 14.8T or 500B")
    value = float(m.group(1)) * _SUFFIXES[m.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} must be a positive number")
    return value


@dataclass(frozen=True)
class CostProjection:
    tokens: float
    flops_per_token: float
    total_flops: float
    peak_flops: float
    mfu: float
    gpu_hours: float
    price_per_gpu_hour: float
    cost_usd: float
    num_gpus: int | None = None
    wall_days: float | None = None


def project(flops_per_token: float, tokens: float, peak: float, mfu: float, price_per_gpu_hour: float = 2.0,
            num_gpus: int | None = None) -> CostProjection:
    """GPU-hours = tokens * flops_per_token / (peak * mfu) / 3600; dollars = GPU-hours * price."""
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu}")
    if peak <= 0 or tokens <= 0 or flops_per_token <= 0:
        raise ValueError("peak, tokens and FLOPs per token must be positive")
    total = tokens * flops_per_token
    hours = total / (peak * mfu) / 3600.0
    days = hours / num_gpus / 24.0 if num_gpus else None
    return CostProjection(tokens, flops_per_token, total, peak, mfu, hours, price_per_gpu_hour,
                          hours * price_per_gpu_hour, num_gpus, days)


def implied_mfu(flops_per_token: float, tokens: float, peak: float, gpu_hours: float) -> float:
    """The MFU at which `gpu_hours` of `peak` FLOP/s GPUs process `tokens` tokens."""
    if gpu_hours <= 0 or peak <= 0:
        raise ValueError("GPU-hours and peak must be positive")
    return tokens * flops_per_token / (peak * gpu_hours * 3600.0)


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--tokens", required=True, metavar="N", help="training tokens, e.g. 14.8T, 500B, 2e9")
    parser.add_argument("--gpu", required=True, metavar="NAME", help=f"one of: {', '.join(GPU_PEAKS)}")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization (default 0.4)")
    parser.add_argument("--price", type=float, default=2.0, metavar="USD_PER_HOUR",
                        help="dollars per GPU-hour (default 2.0, the V3 report's H800 rental price)")
    parser.add_argument("--seq-len", type=int, default=4096, help="training sequence length (default 4096)")
    parser.add_argument("--gpu-hours", metavar="H", help="a known GPU-hour figure (e.g. 2.664M): print its implied MFU")
    parser.add_argument("--num-gpus", type=int, metavar="N", help="cluster size, to also print wall-clock days")
    parser.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16", help="which peak to use (default bf16)")
    parser.add_argument("--no-mtp", action="store_true", help="leave the MTP modules out of FLOPs per token")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    try:
        name, cfg = model_from_args(args)
    except ConfigError as e:
        return error("cost", str(e))
    try:
        tokens = parse_count(args.tokens)
        known_hours = parse_count(args.gpu_hours) if args.gpu_hours is not None else None
        gpu = resolve_gpu(args.gpu)
        peak = peak_flops(gpu, args.dtype)
        if args.seq_len <= 0:
            raise ValueError(f"--seq-len must be positive, got {args.seq_len}")
        if args.price < 0:
            raise ValueError(f"--price must be >= 0, got {args.price}")
        if args.num_gpus is not None and args.num_gpus <= 0:
            raise ValueError(f"--num-gpus must be positive, got {args.num_gpus}")
        fpt = training_flops_per_token(cfg, args.seq_len, include_mtp=not args.no_mtp)
        proj = project(fpt, tokens, peak, args.mfu, args.price, args.num_gpus)
    except ValueError as e:
        return error("cost", str(e))
    out: dict = {"model": name, "gpu": gpu, "dtype": args.dtype, "seq_len": args.seq_len,
                 "include_mtp": not args.no_mtp, **asdict(proj)}
    if known_hours is not None:
        out["known_gpu_hours"] = known_hours
        out["implied_mfu"] = implied_mfu(fpt, tokens, peak, known_hours)
        out["known_cost_usd"] = known_hours * args.price
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    rows = [
        ("model", name),
        ("tokens", f"{human(tokens)} ({tokens:.4g})"),
        (f"FLOPs / token @ {args.seq_len}", human(fpt, "FLOPs") + ("" if args.no_mtp or not cfg.num_nextn_predict_layers
                                                                  else " (MTP included)")),
        ("total FLOPs", f"{proj.total_flops:.4e}"),
        ("GPU peak", f"{gpu}, {peak / 1e12:,.1f} TFLOP/s dense {args.dtype.upper()}"),
        ("assumed MFU", f"{proj.mfu:.1%}"),
        ("GPU-hours", f"{human(proj.gpu_hours)} ({proj.gpu_hours:,.0f})"),
        ("cost", f"${proj.cost_usd:,.0f} at ${args.price:.2f}/GPU-hour"),
    ]
    if proj.wall_days is not None:
        rows.append(("wall-clock", f"{proj.wall_days:,.1f} days on {proj.num_gpus:,} GPUs"))
    if known_hours is not None:
        rows.append(("known GPU-hours", f"{human(known_hours)} (${known_hours * args.price:,.0f})"))
        rows.append(("implied MFU", f"{out['implied_mfu']:.1%}"))
    w = max(len(r[0]) for r in rows)
    print("\n".join(f"{a:<{w}}  {b}" for a, b in rows))
    return 0
