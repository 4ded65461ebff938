"""Weight-only bf16, int8 and int4 decoding (nanoseek.infer.quant) against the fp32 model, side by side.

For one random-weight model (default: a decode-sized config, hidden 1536 and 16 experts per MoE layer,
~1.5 GB in fp32, so that decoding streams its weights from memory rather than from cache) in fp32,
bf16 weights, int8 per group of 128, int8 per row, and int4 per group of 32 and of 128:
  * quality against fp32: the error of the converted weights (||dq(q(w)) - w|| / ||w|| over all of them),
    the largest logit error relative to the largest fp32 logit, and the agreement of greedy tokens
    (4 prompts x 32 new tokens);
  * greedy decode tokens/s at batch 1 and batch 8 (nanoseek.generate, the kernels on), the formats run
    alternately, and the speed-up over fp32 and over int8 per group of 128;
  * the same decode with each block's step run module by module from Python (kernels.op_by_op) instead of
    one C++ block_decode call per block, in the same rounds: `batch_<b>_whole_block_vs_op_by_op` is what
    the whole-block step gains in each format;
  * the bytes of weight each format holds.
The CPU (`lscpu` model and SIMD flags) is printed and saved. Held-out task accuracy of the trained
speedrun model is not measured here (it needs a trained checkpoint; see `--model`).

Run: `.venv/bin/python -m benchmarks.bench_quant [--preset bench] [--model DIR]`.
Results: benchmarks/results/quant.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch

import nanoseek
from benchmarks.common import cpu_info, write_result
from nanoseek.config import preset
from nanoseek.infer import fast, quant
from nanoseek.infer.fast import kernels

DECODE_SIZED = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, moe_intermediate_size=1024,
                    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=12, q_lora_rank=512,
                    kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=1, topk_group=1,
                    max_position_embeddings=1024, num_nextn_predict_layers=0, initializer_range=0.05)
FORMATS = {"fp32": None, "bf16": ("bf16", None), "int8_g128": ("int8", 128), "int8_row": ("int8", 0),
           "int4_g32": ("int4", 32), "int4_g128": ("int4", 128)}


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def weight_error(dense, model) -> float:
    """||dequantized - fp32|| / ||fp32|| over every weight the format converted (0 for fp32)."""
    ref, err, norm = dict(dense.named_modules()), 0.0, 0.0
    for name, m in model.named_modules():
        if isinstance(m, quant.QuantLinear):
            pairs = [(m.dense_weight(), ref[name].weight)]
        elif isinstance(m, quant.QuantExperts):
            pairs = [(quant.dequantize(getattr(m, p), getattr(m, p + "_scale")), getattr(ref[name], p))
                     for p in ("gate_up_proj", "down_proj")]
        else:
            continue
        for got, want in pairs:
            err += (got - want.float()).pow(2).sum().item()
            norm += want.float().pow(2).sum().item()
    return (err / norm) ** 0.5 if norm else 0.0


def build(args, fmt):
    if args.model:  # loaded dense, then quantized here: nanoseek.load's conversion takes each format's default group
        model = nanoseek.load(args.model, dtype=torch.float32, weights="dense")
    else:
        torch.manual_seed(0)
        cfg = preset("bench") if args.preset == "bench" else nanoseek.ModelConfig(**DECODE_SIZED)
        model = nanoseek.Transformer(cfg).eval()
    if FORMATS[fmt]:
        quant.quantize_model(model, *FORMATS[fmt])
    return model


def decode_tps(model, prompts, new_tokens: int, op_by_op: bool = False) -> float:
    with kernels.op_by_op() if op_by_op else contextlib.nullcontext():
        t = time.perf_counter()
        out = nanoseek.generate(model, prompts, max_new_tokens=new_tokens)
        return sum(map(len, out)) / (time.perf_counter() - t)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["decode", "bench"], default="decode")
    p.add_argument("--model", default=None, help="a checkpoint directory instead of random weights")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    cpu = cpu_info()
    load_start = round(os.getloadavg()[0], 2)  # the machine's other work: these are shared machines
    print(f"CPU: {cpu['model']}; SIMD flags: {' '.join(cpu['simd_flags'])}; kernels: {kernels.isa()}")
    models = {fmt: fast.accelerate(build(args, fmt)) for fmt in FORMATS}
    cfg = models["fp32"].config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (4, 24), generator=g)
    with torch.inference_mode():
        ref = models["fp32"](ids)
    quality, greedy = {}, {}
    prompts = [ids[i].tolist() for i in range(4)]
    for fmt, m in models.items():
        with torch.inference_mode():
            err = ((m(ids) - ref).abs().max() / ref.abs().max()).item()
        greedy[fmt] = nanoseek.generate(m, prompts, max_new_tokens=args.new_tokens)
        agree = sum(a == b for p, q in zip(greedy["fp32"], greedy[fmt]) for a, b in zip(p, q))
        quality[fmt] = {"weight_error_rel": round(weight_error(models["fp32"], m), 5),
                        "max_logit_error_rel": round(err, 5),
                        "greedy_agreement": round(agree / sum(map(len, greedy["fp32"])), 4),
                        "weight_gb": round(weight_bytes(m) / 1e9, 3)}
    speed: dict[str, dict] = {fmt: {} for fmt in FORMATS}
    for batch in (1, 8):
        batch_prompts = [torch.randint(3, cfg.vocab_size, (16,), generator=g).tolist() for _ in range(batch)]
        # (format, op by op): the whole-block C++ step and the module-by-module one, alternately
        runs: dict[tuple[str, bool], list[float]] = {(fmt, o): [] for fmt in FORMATS for o in (False, True)}
        for fmt, m in models.items():  # warm-up: kernel builds, path calibration, allocator
            decode_tps(m, batch_prompts, 4)
            decode_tps(m, batch_prompts, 4, op_by_op=True)
        for r in range(args.rounds):
            for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                runs[key].append(decode_tps(models[key[0]], batch_prompts, args.new_tokens, op_by_op=key[1]))
        for fmt in FORMATS:
            best, ops = max(runs[fmt, False]), max(runs[fmt, True])
            speed[fmt][f"batch_{batch}_tokens_per_s"] = round(best, 2)
            speed[fmt][f"batch_{batch}_op_by_op_tokens_per_s"] = round(ops, 2)
            speed[fmt][f"batch_{batch}_whole_block_vs_op_by_op"] = round(best / ops, 2)
        for fmt in FORMATS:
            for base in ("fp32", "int8_g128"):
                speed[fmt][f"batch_{batch}_vs_{base}"] = round(speed[fmt][f"batch_{batch}_tokens_per_s"]
                                                               / speed[base][f"batch_{batch}_tokens_per_s"], 2)
    result = {"cpu": cpu, "kernel_isa": kernels.isa(), "config": "checkpoint " + args.model if args.model else args.preset,
              "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
              "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
              "formats": {fmt: {**quality[fmt], **speed[fmt]} for fmt in FORMATS}}
    for fmt, r in result["formats"].items():
        speeds = ", ".join(f"batch {b} {r[f'batch_{b}_tokens_per_s']} tok/s ({r[f'batch_{b}_vs_fp32']}x fp32, "
                           f"{r[f'batch_{b}_vs_int8_g128']}x int8, {r[f'batch_{b}_whole_block_vs_op_by_op']}x "
                           "op by op)" for b in (1, 8))
        print(f"{fmt:>10}: {r['weight_gb']} GB, weight error {r['weight_error_rel']:.2e}, logit error "
              f"{r['max_logit_error_rel']:.2e}, greedy agreement {r['greedy_agreement']:.0%}, {speeds}")
    print(f"wrote {write_result('quant', result)}")
    return result


if __name__ == "__main__":
    main()
