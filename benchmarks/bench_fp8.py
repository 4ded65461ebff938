"""FP8 vs high-precision training loss gap (V3 report section 3.3: relative loss error below 0.25%).

Trains the same model twice with nanoseek.train.loop (same seed, same data, same steps): once with the
baseline precision (bf16 autocast by default, or fp32) and once with fp8.enabled (fine-grained FP8 for
the attention, MLP and expert linears; emulated on CPU). Reports the relative gap of the final smoothed
language-model loss (mean of the last `--window` logged steps), and writes benchmarks/results/fp8.json.

    .venv/bin/python -m benchmarks.bench_fp8 --steps 150
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS

ROOT = Path(__file__).resolve().parents[1]


def run(config: Path, out: Path, overrides: list[str]) -> tuple[list[dict], float]:
    from nanoseek.train.config import load_run_config
    from nanoseek.train.loop import train

    cfg = load_run_config(config, overrides)
    t = time.perf_counter()
    train(cfg, out, progress=False)
    secs = time.perf_counter() - t
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()], secs


def fp8_backend(config: Path, overrides: list[str]) -> str:
    """Which FP8 GEMMs the fp8 run used: the native blockwise kernels or the emulation (see train/fp8_gemm)."""
    import torch

    from nanoseek.train.config import load_run_config
    from nanoseek.train.fp8_gemm import resolve

    cfg = load_run_config(config, overrides + ["fp8.enabled=true"])
    name = cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    backend = resolve(cfg.fp8.backend, cfg.fp8.block, torch.device(name))
    what = {"emulate": "emulated (quantize/dequantize, fp32 GEMMs)", "blockwise": "native blockwise scaled_mm",
            "scaled_mm": "row-wise scaled_mm per 128-wide K slice"}[backend]
    return f"{what} on {name}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="run config (default configs/small.toml, else tiny.toml "
                                                   "with the small model preset)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--baseline", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 where it is fast (GPUs, AMX CPUs), fp32 on AVX2-only CPUs")
    ap.add_argument("--window", type=int, default=20, help="steps averaged for the smoothed final loss")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra section.key=value")
    ap.add_argument("--out", default=str(RESULTS / "fp8.json"))
    args = ap.parse_args(argv)

    small = ROOT / "configs" / "small.toml"
    if args.config:
        config, base = Path(args.config), []
    elif small.exists():
        config, base = small, []
    else:
        config, base = ROOT / "configs" / "tiny.toml", ["model.preset=small", "data.vocab_size=2048"]
    common = [*base, f"train.steps={args.steps}", "train.save_every=0", "train.log_every=1",
              f"train.dtype={args.baseline}", *args.overrides]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("baseline", ["fp8.enabled=false"]), ("fp8", ["fp8.enabled=true"])):
            metrics, secs = run(config, Path(tmp) / name, common + extra)
            losses = [m["loss"] for m in metrics]
            tail = losses[-args.window:]
            results[name] = {"final_smoothed_loss": sum(tail) / len(tail), "first_loss": losses[0],
                             "seconds": round(secs, 1), "losses": losses}
            print(f"{name}: first loss {losses[0]:.4f}, final smoothed loss {results[name]['final_smoothed_loss']:.4f} "
                  f"({secs:.0f}s)", flush=True)
    b, f = results["baseline"]["final_smoothed_loss"], results["fp8"]["final_smoothed_loss"]
    gap = (f - b) / b
    report = {"benchmark": "fp8_loss_gap", "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT)
                                                        else config),
              "overrides": common, "steps": args.steps, "baseline": args.baseline, "window": args.window,
              "relative_gap": gap, "relative_gap_pct": 100 * gap, "paper_bound_pct": 0.25,
              "fp8": fp8_backend(config, common), "machine": platform.processor() or platform.machine(),
              "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"relative gap of the final smoothed loss: {100 * gap:+.3f}% (paper: < 0.25%) -> {args.out}")
    return report


if __name__ == "__main__":
    main()
