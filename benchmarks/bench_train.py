"""Training-step throughput: nanoseek vs transformers.DeepseekV3ForCausalLM (grouped_mm experts).

Same weights (nanoseek saves, transformers loads), same batch, same optimizer (AdamW), one process,
alternating steps, medians. A step is forward, cross-entropy, backward and AdamW. Autocast uses the
machine's fast dtype (bf16 on GPUs and AMX CPUs, fp32 on AVX2-only CPUs; see common.fast_dtype).

    python -m benchmarks.bench_train [--batch 8 --seq 256 --rounds 6] [--before-src DIR/src]

With --before-src (the src/ of another checkout, e.g. `git archive <commit> | tar -x -C DIR`), the same
nanoseek step is also timed for both checkouts in subprocesses that alternate (`before_after` in the
JSON): a refactor must not slow training down, and equal first losses show the same mathematics.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.accounting import training_flops_per_token
from nanoseek.config import preset
from nanoseek.mfu import measured_peak_flops

from .common import alternate, alternate_checkouts, fast_dtype, median, write_result


def worker_step(args) -> dict:
    """One checkout's nanoseek training step alone (forward, LM loss, backward, fused AdamW): median seconds."""
    dev = args.device
    dtype = {"auto": fast_dtype(dev), "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = nanoseek.Transformer(cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    amp = (lambda: torch.autocast(dev.split(":")[0], dtype=torch.bfloat16)) if dtype == torch.bfloat16 \
        else contextlib.nullcontext
    losses = []

    def step():
        with amp():
            loss = model.forward_train(ids[:, :-1], ids[:, 1:], mtp_weight=0.0).lm_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    times = alternate({"step": step}, rounds=args.rounds, warmup=1)["step"]
    return {"engine": nanoseek.__file__, "median_step_s": median(times), "first_loss": losses[0]}


def before_after(args) -> dict:
    argv = ["--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq), "--rounds", str(args.rounds),
            "--device", args.device, "--dtype", args.dtype]
    runs = alternate_checkouts("bench_train", "step", args.before_src, 3, argv)
    out = {"before_src": args.before_src}
    for side, rs in runs.items():
        out[side] = {"tokens_per_s": args.batch * args.seq / median([r["median_step_s"] for r in rs]),
                     "first_loss": rs[0]["first_loss"], "engine": rs[0]["engine"]}
    out["ratio_after_vs_before"] = out["after"]["tokens_per_s"] / out["before"]["tokens_per_s"]
    out["same_first_loss"] = abs(out["after"]["first_loss"] - out["before"]["first_loss"]) < 1e-4
    print(f"before/after: {out['after']['tokens_per_s']:.0f} vs {out['before']['tokens_per_s']:.0f} tok/s, "
          f"ratio {out['ratio_after_vs_before']:.3f}; first loss {out['after']['first_loss']:.5f} vs "
          f"{out['before']['first_loss']:.5f}", flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the nanoseek model")
    ap.add_argument("--before-src", default=None, help="also time this checkout's step against another's src/")
    ap.add_argument("--before-after-only", action="store_true",
                    help="with --before-src: only the two checkouts (results/train_before_after.json), no transformers")
    ap.add_argument("--worker", choices=["step"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        import json

        print(json.dumps(worker_step(args)))
        return {}
    if args.before_after_only:
        if not args.before_src:
            ap.error("--before-after-only needs --before-src")
        result = {"benchmark": "train_step_before_after", "preset": args.preset, "batch": args.batch,
                  "seq_len": args.seq, "rounds": args.rounds, **before_after(args)}
        print("wrote", write_result("train_before_after", result))
        return result
    import transformers

    dev = args.device
    dtype = {"auto": fast_dtype(dev), "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cfg = preset(args.preset)
    torch.manual_seed(0)
    ours = nanoseek.Transformer(cfg).to(dev).train()
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save(ours, d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float32, experts_implementation="grouped_mm").to(dev).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    x, y = ids[:, :-1], ids[:, 1:]
    amp = (lambda: torch.autocast(dev.split(":")[0], dtype=torch.bfloat16)) if dtype == torch.bfloat16 \
        else contextlib.nullcontext
    # The same optimizer on both sides (fused AdamW, transformers' Trainer default): the model is what differs.
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    step_model = torch.compile(ours) if args.compile else ours
    losses = {"nanoseek": [], "transformers": []}

    def step_ours():
        with amp():
            out = step_model.forward_train(x, y, mtp_weight=0.0) if not args.compile else None
            loss = out.lm_loss if out is not None else F.cross_entropy(step_model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        losses["nanoseek"].append(loss.item())

    def step_theirs():
        with amp():
            logits = theirs(input_ids=x).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        losses["transformers"].append(loss.item())

    times = alternate({"nanoseek": step_ours, "transformers": step_theirs}, rounds=args.rounds, warmup=1)
    tokens = args.batch * args.seq
    tps = {k: tokens / median(v) for k, v in times.items()}
    flops = training_flops_per_token(cfg, args.seq, include_mtp=False)
    peak = measured_peak_flops(dev, dtype)
    result = {
        "benchmark": "train_step", "preset": args.preset, "batch": args.batch, "seq_len": args.seq,
        "dtype": str(dtype).removeprefix("torch."), "device": dev, "rounds": args.rounds,
        "tokens_per_s": tps, "speedup": tps["nanoseek"] / tps["transformers"],
        "mfu": {k: v * flops / peak for k, v in tps.items()}, "flops_per_token": flops, "peak_flops": peak,
        "first_loss": {k: v[0] for k, v in losses.items()},
        "median_step_s": {k: median(v) for k, v in times.items()},
    }
    if args.before_src:
        result["before_after"] = before_after(args)
    print(f"train step ({args.preset}, {args.batch}x{args.seq}, {result['dtype']}, {dev}): "
          f"nanoseek {tps['nanoseek']:.0f} tok/s  transformers {tps['transformers']:.0f} tok/s  "
          f"ratio {result['speedup']:.2f}x  MFU {result['mfu']['nanoseek']:.1%} vs {result['mfu']['transformers']:.1%} "
          f"(peak {peak / 1e9:.0f} GFLOP/s); first loss {result['first_loss']}")
    print("wrote", write_result("train", result))
    return result


if __name__ == "__main__":
    main()
