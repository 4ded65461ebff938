"""GPU benchmarks: training tok/s and MFU against transformers, FP8 against bf16, decode against generate().

On one CUDA device, side by side in one run, medians of alternating rounds (benchmarks.common.alternate):
  * train: a training step (forward, cross-entropy, backward, fused AdamW) in bf16 autocast with fp32 master
    weights, nanoseek vs transformers' DeepseekV3ForCausalLM with grouped_mm experts and the same weights,
    on the `bench` preset and on a ~1B-parameter MoE (MOE_1B below); tokens/s and MFU against the GPU's
    dense bf16 peak (nanoseek.mfu.GPU_PEAKS);
  * fp8: the same nanoseek step with fp8.enabled (the backend `auto` picks: blockwise on Hopper) against
    bf16, step time and MFU against the FP8 peak;
  * decode: greedy decoding of 64 new tokens after a 32-token prompt at batch 1, 16 and 64, bf16, the
    engine vs transformers generate(), with the number of identical sequences.
Writes benchmarks/results/gpu.json (or --out), which names the GPU. Without CUDA it exits with one line.

    python -m benchmarks.bench_gpu [--quick] [--only train,fp8,decode]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import RESULTS, alternate, machine, median

# ~1.0B parameters in total, ~0.2B active per token: 64 routed experts (top-6) in 9 of 10 layers.
MOE_1B = dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
              num_hidden_layers=10, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=384,
              kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64,
              n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4, num_nextn_predict_layers=0)


def _model_configs(quick: bool):
    from nanoseek.config import preset

    cfgs = {"bench": preset("bench")}
    if not quick:
        cfgs["moe_1b"] = preset("bench", **MOE_1B)
    return cfgs


def _transformers_copy(ours, dev):
    """transformers' model with our weights (saved and loaded as a checkpoint), grouped_mm experts if offered."""
    import transformers

    import nanoseek

    with tempfile.TemporaryDirectory() as d:
        nanoseek.save(ours, d)
        try:
            theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                                        experts_implementation="grouped_mm")
            impl = "grouped_mm"
        except (TypeError, ValueError) as e:  # an older transformers without the experts switch
            print(f"transformers: no experts_implementation=grouped_mm ({e}); using its default", flush=True)
            theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
            impl = "default"
    return theirs.to(dev), impl


def _step_fn(model, x, y, amp, nanoseek_model: bool, losses: list):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)

    def step():
        with amp():
            if nanoseek_model:
                loss = model.forward_train(x, y, mtp_weight=0.0).lm_loss
            else:
                loss = F.cross_entropy(model(input_ids=x).logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return step


def bench_train(args, dev, peak_bf16: float, peak_fp8: float | None) -> dict:
    import nanoseek
    from nanoseek.accounting import training_flops_per_token
    from nanoseek.train.fp8 import enable_fp8
    from nanoseek.train.fp8_gemm import resolve

    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    out = {}
    for name, cfg in _model_configs(args.quick).items():
        torch.manual_seed(0)
        ours = nanoseek.Transformer(cfg).to(dev).train()
        n_params = ours.num_params()
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1),
                            generator=torch.Generator().manual_seed(0)).to(dev)
        x, y = ids[:, :-1], ids[:, 1:]
        flops = training_flops_per_token(cfg, args.seq, include_mtp=False)
        tokens = args.batch * args.seq
        row: dict = {"params": n_params, "flops_per_token": flops, "batch": args.batch, "seq_len": args.seq}
        losses: dict[str, list] = {"nanoseek": [], "transformers": [], "nanoseek_fp8": []}
        fns = {"nanoseek": _step_fn(ours, x, y, amp, True, losses["nanoseek"])}
        if "train" in args.only:
            theirs, impl = _transformers_copy(ours, dev)
            theirs.train()
            row["transformers_experts"] = impl
            fns["transformers"] = _step_fn(theirs, x, y, amp, False, losses["transformers"])
        if "fp8" in args.only:
            ours8 = enable_fp8(copy.deepcopy(ours))
            row["fp8_backend"] = resolve("auto", 128, dev)
            fns["nanoseek_fp8"] = _step_fn(ours8, x, y, amp, True, losses["nanoseek_fp8"])
        times = alternate(fns, rounds=args.rounds, warmup=2)
        tps = {k: tokens / median(v) for k, v in times.items()}
        row["tokens_per_s"] = tps
        row["median_step_s"] = {k: median(v) for k, v in times.items()}
        row["mfu_bf16_peak"] = {k: v * flops / peak_bf16 for k, v in tps.items()}
        if "nanoseek_fp8" in tps:
            row["fp8_step_time_ratio"] = row["median_step_s"]["nanoseek_fp8"] / row["median_step_s"]["nanoseek"]
            if peak_fp8:
                row["mfu_fp8_peak"] = tps["nanoseek_fp8"] * flops / peak_fp8
        if "transformers" in tps:
            row["speedup_vs_transformers"] = tps["nanoseek"] / tps["transformers"]
        row["first_loss"] = {k: float(v[0]) for k, v in losses.items() if v}
        out[name] = row
        print(f"train {name} ({n_params / 1e6:.0f}M params, {args.batch}x{args.seq}, bf16): "
              + "  ".join(f"{k} {v:,.0f} tok/s (MFU {row['mfu_bf16_peak'][k]:.1%})" for k, v in tps.items())
              + (f"  -> {row['speedup_vs_transformers']:.2f}x transformers" if "transformers" in tps else "")
              + (f"; fp8/bf16 step time {row['fp8_step_time_ratio']:.2f} ({row['fp8_backend']})"
                 if "fp8_step_time_ratio" in row else ""), flush=True)
        del fns, ours
        torch.cuda.empty_cache()
    return out


def bench_decode(args, dev) -> dict:
    import nanoseek
    from nanoseek.config import preset
    from nanoseek.infer import Engine, SamplingParams

    cfg = preset("bench")
    torch.manual_seed(0)
    fp32 = nanoseek.Transformer(cfg).eval()
    theirs, _ = _transformers_copy(fp32, "cpu")
    ours = fp32.cast(torch.bfloat16).to(dev)
    theirs = theirs.to(device=dev, dtype=torch.bfloat16).eval()
    theirs.generation_config.eos_token_id = None  # always the full number of new tokens, as ours
    theirs.generation_config.pad_token_id = 0
    out = {}
    for B in args.batches:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(3, cfg.vocab_size, (B, args.prompt_len), generator=g).tolist()
        ids = torch.tensor(prompts, device=dev)
        engine = Engine(ours, max_batch_size=B, max_len=args.prompt_len + args.new_tokens)
        sp = SamplingParams(max_tokens=args.new_tokens)
        res = {}

        def run_ours():
            res["ours"] = [c.token_ids for c in engine.generate_batch(prompts, sp)]

        def run_theirs():
            with torch.inference_mode():
                seq = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                      do_sample=False)
            res["theirs"] = seq[:, args.prompt_len:].tolist()

        times = alternate({"nanoseek": run_ours, "transformers": run_theirs}, rounds=args.rounds, warmup=1)
        tps = {k: B * args.new_tokens / median(v) for k, v in times.items()}
        same = sum(a == b for a, b in zip(res["ours"], res["theirs"]))
        out[f"batch_{B}"] = {"tokens_per_s": tps, "speedup": tps["nanoseek"] / tps["transformers"],
                             "identical_sequences": f"{same}/{B}"}
        print(f"decode bf16 batch {B:>2}: nanoseek {tps['nanoseek']:,.0f} tok/s  transformers "
              f"{tps['transformers']:,.0f} tok/s  -> {tps['nanoseek'] / tps['transformers']:.2f}x  "
              f"identical sequences {same}/{B}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="train,fp8,decode", help="comma-separated sections: train, fp8, decode")
    ap.add_argument("--quick", action="store_true", help="the bench preset only, fewer rounds")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS / "gpu.json"))
    args = ap.parse_args(argv)
    args.only = set(args.only.split(","))
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False): nothing measured", file=sys.stderr)
        return 2
    from nanoseek import mfu

    if args.quick:
        args.rounds = min(args.rounds, 3)
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(dev)
    try:
        peak_bf16 = mfu.peak_flops(mfu.device_name(dev), "bf16")
    except ValueError:
        peak_bf16 = mfu.measured_peak_flops(dev, torch.bfloat16)
    try:
        peak_fp8 = mfu.peak_flops(mfu.device_name(dev), "fp8")
    except ValueError:
        peak_fp8 = None
    t0 = time.time()
    result: dict = {"benchmark": "gpu", "gpu": gpu, "capability": list(torch.cuda.get_device_capability(dev)),
                    "torch": torch.__version__, "cuda": torch.version.cuda, "peak_bf16_flops": peak_bf16,
                    "peak_fp8_flops": peak_fp8, "moe_1b_overrides_of_bench": MOE_1B}
    if args.only & {"train", "fp8"}:
        result["train"] = bench_train(args, dev, peak_bf16, peak_fp8)
    if "decode" in args.only:
        result["decode"] = bench_decode(args, dev)
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
