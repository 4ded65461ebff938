"""Weight-only bf16, int8 and int4 decoding (nanoseek.infer.quant) against the fp32 model, side by side.

For one random-weight model (default: a decode-sized config, hidden 1536 and 16 experts per MoE layer,
~1.5 GB in fp32, so that decoding streams its weights from memory rather than from cache) in fp32,
bf16 weights, int8 per group of 128, int8 per row, and int4 per group of 32 and of 128, all weight-only, and
int8 per 128 / int4 per 32 with int8 activations (`int8_g128_a8`, `int4_g32_a8`: the same weights,
nanoseek.infer.fast.kernels.set_int8_activations):
  * quality against fp32: the error of the converted weights (||dq(q(w)) - w|| / ||w|| over all of them),
    the largest logit error relative to the largest fp32 logit, and the agreement of greedy tokens
    (4 prompts x 32 new tokens);
  * greedy decode tokens/s at batch 1 and batch 8 (nanoseek.generate, the kernels on), the formats run
    alternately, and the speed-up over fp32 and over int8 per group of 128;
  * the same decode with each block's step run module by module from Python (kernels.op_by_op) instead of
    one C++ block_decode call per block, in the same rounds: `batch_<b>_whole_block_vs_op_by_op` is what
    the whole-block step gains in each format;
  * the bytes of weight each format holds;
  * where a batch-1 decode step's time goes in each format (`step_profile`: PROFILE_STEPS steps, each split
    into the C++ block calls, the head and the rest, with the weight GB/s of each and of the step), beside
    the rate at which the few-row kernel streams large weights of that format from memory (`stream_gbs`:
    4096 x 1536 weights, 256 MB of them, one row) and the machine's memory read and copy bandwidth
    (`read_gbs`, `copy_gbs`: benchmarks.common.bandwidth).
The CPU (`lscpu` model and SIMD flags) is printed and saved. With `--model DIR --task NAME` (a trained
checkpoint, e.g. `make run`'s runs/speedrun/model and countdown) each format's held-out accuracy too:
pass@1 and cons@k of `nanoseek eval` (the same problems, samples and seeds for every format).

Run: `.venv/bin/python -m benchmarks.bench_quant [--preset bench] [--model DIR [--task countdown]]`.
Results: benchmarks/results/quant.json (quant_checkpoint.json with --model).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch

import nanoseek
from benchmarks.common import bandwidth, cpu_info, int8_activations, step_bytes, write_result
from nanoseek.config import preset
from nanoseek.infer import fast, quant
from nanoseek.infer.cache import PagedCache
from nanoseek.infer.fast import kernels

DECODE_SIZED = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, moe_intermediate_size=1024,
                    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=12, q_lora_rank=512,
                    kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=1, topk_group=1,
                    max_position_embeddings=1024, num_nextn_predict_layers=0, initializer_range=0.05)
FORMATS = {"fp32": None, "bf16": ("bf16", None), "int8_g128": ("int8", 128), "int8_g128_a8": ("int8", 128),
           "int8_row": ("int8", 0), "int4_g32": ("int4", 32), "int4_g32_a8": ("int4", 32), "int4_g128": ("int4", 128)}
# the same weights as the format without `_a8`, with int8 activations (kernels.set_int8_activations)
INT8_ACTIVATIONS = {"int8_g128_a8", "int4_g32_a8"}


def activations_of(fmt: str):
    """Int8 activations on while `fmt` runs, if it is a format that takes them."""
    return int8_activations(fmt in INT8_ACTIVATIONS)


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


def heldout(model, tok, task, args) -> dict:
    """`nanoseek eval`'s held-out pass@1, cons@k and well-formed share of one format (seed 0 for all)."""
    from nanoseek.rl.evaluate import evaluate

    r = evaluate(model, tok, task, n=args.eval_n, k=args.eval_k)
    return {"heldout_task": args.task, "heldout_n": r.n, "heldout_k": r.k, "heldout_pass_at_1": round(r.pass_at_1, 4),
            f"heldout_cons_at_{r.k}": round(r.cons_at_k, 4), "heldout_format_rate": round(r.format_rate, 4)}


def decode_tps(model, prompts, new_tokens: int, op_by_op: bool = False) -> float:
    with kernels.op_by_op() if op_by_op else contextlib.nullcontext():
        t = time.perf_counter()
        out = nanoseek.generate(model, prompts, max_new_tokens=new_tokens)
        return sum(map(len, out)) / (time.perf_counter() - t)


PROFILE_STEPS = 48


def stream_gbs(fmt: str, total_bytes: float = 256e6) -> float:
    """GB/s of weight bytes kernels.rows_matmul reaches on one row over many 4096 x 1536 weights of `fmt`
    (more bytes than any cache: each is read from memory), best of 3 passes."""
    spec = FORMATS[fmt]
    weights, size = [], 0
    while size < total_bytes:
        w = torch.randn(4096, 1536) * 0.05
        w, s = quant.narrow(w, *spec) if spec else (w, None)
        weights.append((w, s))
        size += w.numel() * w.element_size() + (0 if s is None else s.numel() * 4)
    x = torch.randn(1, 1536)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for w, s in weights:
            kernels.rows_matmul(x, w, s)
        best = min(best, time.perf_counter() - t)
    return size / best / 1e9


def step_profile(model, steps: int = PROFILE_STEPS) -> dict:
    """One row's decode steps after a 32-token prefill, each timed whole and split into its C++ block calls
    (kernels.block_decode), the head and the rest (embedding, final norm, Python); the median half of the
    steps by total time, averaged, in ms, with the weight GB/s of the blocks, the head and the step."""
    split = {"blocks": 0.0, "head": 0.0}
    block_decode, head = kernels.block_decode, model.lm_head

    def timed(part, fn):
        def run(*args):
            t = time.perf_counter()
            out = fn(*args)
            split[part] += time.perf_counter() - t
            return out
        return run

    cache = PagedCache.for_model(model, -(-(32 + steps) // 16), 16, torch.float32, "cpu")
    table = [list(range(cache.num_blocks))]
    ids = torch.randint(3, model.config.vocab_size, (1, 32 + steps), generator=torch.Generator().manual_seed(2))
    rows = []
    kernels.block_decode, head.forward = timed("blocks", block_decode), timed("head", head.forward)
    try:
        with torch.inference_mode():
            model.forward_cached(ids[:, :32], cache.view(table, torch.zeros(1, dtype=torch.long), 32))
            for pos in range(32, 32 + steps):
                split["blocks"] = split["head"] = 0.0
                t = time.perf_counter()
                model.forward_cached(ids[:, pos:pos + 1], cache.view(table, torch.tensor([pos]), 1))
                rows.append((time.perf_counter() - t, split["blocks"], split["head"]))
    finally:
        kernels.block_decode = block_decode
        del head.forward  # back to the class's forward
    rows.sort()
    mid = rows[len(rows) // 4: 3 * len(rows) // 4]
    step, blocks, head_s = (sum(r[i] for r in mid) / len(mid) for i in range(3))
    head_bytes = sum(t.numel() * t.element_size() for t in model.lm_head.parameters())
    total = step_bytes(model, 1)
    return {"step_ms": round(step * 1e3, 2), "blocks_ms": round(blocks * 1e3, 2), "head_ms": round(head_s * 1e3, 2),
            "rest_ms": round((step - blocks - head_s) * 1e3, 2), "step_gb": round(total / 1e9, 4),
            "step_gbs": round(total / step / 1e9, 2), "blocks_gbs": round((total - head_bytes) / blocks / 1e9, 2),
            "head_gbs": round(head_bytes / head_s / 1e9, 2)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["decode", "bench"], default="decode")
    p.add_argument("--model", default=None, help="a checkpoint directory instead of random weights")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--task", default=None, help="with --model: each format's held-out pass@1 / cons@k on this task")
    p.add_argument("--eval-n", type=int, default=200, help="held-out problems for --task")
    p.add_argument("--eval-k", type=int, default=4, help="samples per problem for --task")
    p.add_argument("--no-profile", action="store_true", help="skip the step profile and the streaming rates")
    args = p.parse_args(argv)
    if args.task and not args.model:
        p.error("--task needs --model (a trained checkpoint: random weights solve nothing)")
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
    if args.task:  # read once, evaluated in every format
        from nanoseek.data.tasks import get_task
        from nanoseek.data.tokenizer import load_tokenizer

        tok, task = load_tokenizer(args.model), get_task(args.task)
    prompts = [ids[i].tolist() for i in range(4)]
    for fmt, m in models.items():
        with torch.inference_mode(), activations_of(fmt):
            err = ((m(ids) - ref).abs().max() / ref.abs().max()).item()
        with activations_of(fmt):
            greedy[fmt] = nanoseek.generate(m, prompts, max_new_tokens=args.new_tokens)
        agree = sum(a == b for p, q in zip(greedy["fp32"], greedy[fmt]) for a, b in zip(p, q))
        quality[fmt] = {"weight_error_rel": round(weight_error(models["fp32"], m), 5),
                        "max_logit_error_rel": round(err, 5),
                        "greedy_agreement": round(agree / sum(map(len, greedy["fp32"])), 4),
                        "weight_gb": round(weight_bytes(m) / 1e9, 3)}
        if args.task:
            with activations_of(fmt):
                quality[fmt].update(heldout(m, tok, task, args))
    speed: dict[str, dict] = {fmt: {} for fmt in FORMATS}
    for batch in (1, 8):
        batch_prompts = [torch.randint(3, cfg.vocab_size, (16,), generator=g).tolist() for _ in range(batch)]
        # (format, op by op): the whole-block C++ step and the module-by-module one, alternately
        runs: dict[tuple[str, bool], list[float]] = {(fmt, o): [] for fmt in FORMATS for o in (False, True)}
        for fmt, m in models.items():  # warm-up: kernel builds, path calibration, allocator
            with activations_of(fmt):
                decode_tps(m, batch_prompts, 4)
                decode_tps(m, batch_prompts, 4, op_by_op=True)
        for r in range(args.rounds):
            for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                with activations_of(key[0]):
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
    profile = {}
    for fmt, m in ({} if args.no_profile else models).items():
        with activations_of(fmt):
            profile[fmt] = {**step_profile(m), "stream_gbs": round(stream_gbs(fmt), 2)}
    result = {"cpu": cpu, "kernel_isa": kernels.isa(), "int8_activation_kernel": kernels.int8_activation_kernel(),
              "step_profile": profile,
              **({} if args.no_profile else bandwidth()),
              "config": "checkpoint " + args.model if args.model else args.preset,
              "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
              "load_average_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
              "formats": {fmt: {**quality[fmt], **speed[fmt]} for fmt in FORMATS}}
    for fmt, r in result["formats"].items():
        speeds = ", ".join(f"batch {b} {r[f'batch_{b}_tokens_per_s']} tok/s ({r[f'batch_{b}_vs_fp32']}x fp32, "
                           f"{r[f'batch_{b}_vs_int8_g128']}x int8, {r[f'batch_{b}_whole_block_vs_op_by_op']}x "
                           "op by op)" for b in (1, 8))
        acc = (f", held-out {r['heldout_task']} pass@1 {r['heldout_pass_at_1']:.1%} "
               f"({r['heldout_n']} x {r['heldout_k']})" if "heldout_pass_at_1" in r else "")
        print(f"{fmt:>10}: {r['weight_gb']} GB, weight error {r['weight_error_rel']:.2e}, logit error "
              f"{r['max_logit_error_rel']:.2e}, greedy agreement {r['greedy_agreement']:.0%}{acc}, {speeds}")
    if profile:
        print(f"memory: read {result['read_gbs']} GB/s, copy {result['copy_gbs']} GB/s; a batch-1 step (ms, and "
              "GB/s of weights):")
    for fmt, r in profile.items():
        print(f"{fmt:>10}: {r['step_ms']} = blocks {r['blocks_ms']} ({r['blocks_gbs']} GB/s) + head {r['head_ms']} "
              f"({r['head_gbs']} GB/s) + rest {r['rest_ms']}; step {r['step_gbs']} GB/s; the kernel streams "
              f"{r['stream_gbs']} GB/s")
    # a checkpoint's run beside the random model's, not over it
    print(f"wrote {write_result('quant_checkpoint' if args.model else 'quant', result)}")
    return result


if __name__ == "__main__":
    main()
