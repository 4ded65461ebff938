"""A 16B-class checkpoint on a small machine: random weights, quantized to int8 shard by shard, decoded.

Slow (not in the default `make bench`; `python -m benchmarks.run_all --slow` runs it). For DeepSeek-V2-Lite's
config (nanoseek's `deepseek-v2-lite` preset) and a Moonlight-16B-A3B-shaped `deepseek_v3` one (V2-Lite's
shapes with V3's sigmoid / noaux_tc router and a 163,840-token vocabulary, the shapes its model card
gives), in separate processes so each stage's peak RSS is its own:
  1. write a random-weight bf16 checkpoint tensor by tensor (2 GB shards; the model is never built);
  2. `nanoseek quantize --to int8` it (tensor by tensor: the fp32 / bf16 model is never held);
  3. load the int8 checkpoint and decode greedily at batch 1 and 8, with the int8 weights alone and with
     int8 activations (nanoseek.infer.fast.kernels.set_int8_activations), the two alternating for 3 rounds
     after a warm-up one (medians): decode tokens/s of the engine's steps after its first (that one, the
     prefill and a token for each prompt, is timed apart), and
     the fraction of the memory roofline reached (bytes of weight one step must read, non-expert weights
     plus the experts a batch touches per layer, divided by the step time, over the fastest memory read
     measured: benchmarks.common.bandwidth).
Disk: the bf16 checkpoint is ~31 GB and the int8 one ~16 GB at full depth; `--layers N` keeps the first
N layers (the per-layer shapes unchanged) for machines without that much disk or memory. Everything is
written under `--dir` and deleted afterwards unless `--keep`.

Results: benchmarks/results/16b.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "deepseek-v2-lite": {},
    "moonlight-16b-a3b": dict(vocab_size=163840, intermediate_size=11264, scoring_func="sigmoid",
                              topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.446,
                              rope_scaling=None, rope_theta=50000.0, max_position_embeddings=8192,
                              bos_token_id=163584, eos_token_id=163585),
}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def model_config(name: str, layers: int | None):
    from nanoseek.config import preset

    cfg = preset("deepseek-v2-lite", **CONFIGS[name])
    return cfg.replace(num_hidden_layers=layers) if layers else cfg


# ----------------------------------------------------------------------------- stage 1: random checkpoint
def write_random(cfg, out: Path, shard_bytes: int = 2 * 1024**3) -> None:
    import torch
    from safetensors.torch import save_file

    from nanoseek.hf import hf_tensors, write_config, write_index
    from nanoseek.model import Transformer

    with torch.device("meta"):
        meta = Transformer(cfg)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shard, size, n = {}, 0, 0
    for name, t in hf_tensors(meta.state_dict(), cfg):
        if t.dim() == 1:  # norms (ones) and the correction bias (zeros)
            value = torch.zeros(t.shape) if name.endswith("bias") else torch.ones(t.shape)
        else:
            value = torch.randn(t.shape, generator=g).mul_(0.02)
        value = value.to(torch.float32 if name.endswith(("gate.weight", "bias")) else torch.bfloat16)
        shard[name] = value
        size += value.numel() * value.element_size()
        if size >= shard_bytes:
            n += 1
            save_file(shard, str(out / f"part-{n}.safetensors"))
            shard, size = {}, 0
    if shard:
        n += 1
        save_file(shard, str(out / f"part-{n}.safetensors"))
    for i in range(1, n + 1):
        (out / f"part-{i}.safetensors").rename(out / f"model-{i:05d}-of-{n:05d}.safetensors")
    write_index(out)
    write_config(cfg, torch.bfloat16, out)


# ----------------------------------------------------------------------------- stage 3: decode
def decode(path: Path, new_tokens: int, rounds: int = 3) -> dict:
    import torch

    import nanoseek
    from benchmarks.common import bandwidth_gbs, int8_activations, median, step_bytes, timed_decode
    from nanoseek.infer import fast

    t = time.perf_counter()
    model = fast.accelerate(nanoseek.load(path))
    load_s = time.perf_counter() - t
    out = {"load_s": round(load_s, 1), "rss_after_load_gb": round(peak_rss_gb(), 2)}
    bw = bandwidth_gbs()
    out["measured_bandwidth_gbs"] = round(bw, 1)
    g = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        prompts = [torch.randint(3, model.config.vocab_size, (16,), generator=g).tolist() for _ in range(batch)]
        runs = {False: [], True: []}
        for r in range(rounds + 1):  # the int8 weights alone and with int8 activations, alternately
            for a8 in ((False, True) if r % 2 == 0 else (True, False)):
                with int8_activations(a8):
                    run = timed_decode(model, prompts, new_tokens)
                if r:  # round 0 warms up: path calibration per mode, allocator
                    runs[a8].append(run)
        for a8 in (False, True):
            key = f"batch_{batch}" + ("_int8_activations" if a8 else "")
            tps = [x["decode_tokens"] / x["decode_s"] for x in runs[a8]]
            steps_per_s = median(tps) / batch  # every row decodes in every step (no stop tokens)
            out[f"{key}_prefill_and_first_step_s"] = round(median([x["first_step_s"] for x in runs[a8]]), 3)
            out[f"{key}_tokens_per_s"] = round(median(tps), 2)
            out[f"{key}_roofline_fraction"] = round(step_bytes(model, batch) * steps_per_s / 1e9 / bw, 3)
            out[f"{key}_tokens_per_s_by_round"] = [round(x, 2) for x in tps]
    out["step_weight_gb_batch_1"] = round(step_bytes(model, 1) / 1e9, 3)
    out["peak_rss_gb"] = round(peak_rss_gb(), 2)
    return out


# ----------------------------------------------------------------------------- driver
def stage(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_16b", "--stage", *args], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"stage {args[0]} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(CONFIGS) + ["both"], default="both")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--stage", nargs="+", help=argparse.SUPPRESS)  # one stage, in a child process
    args = p.parse_args(argv)
    if args.stage:
        what, name, path = args.stage[0], args.stage[1], Path(args.stage[2])
        t = time.perf_counter()
        if what == "write":
            write_random(model_config(name, int(args.stage[3]) or None), path)
            res = {}
        elif what == "quantize":
            from nanoseek.infer.quant_io import quantize_checkpoint

            quantize_checkpoint(path, Path(args.stage[3]), "int8")
            res = {}
        else:
            res = decode(path, args.new_tokens)
        print(json.dumps({**res, "seconds": round(time.perf_counter() - t, 1), "peak_rss_gb": round(peak_rss_gb(), 2)}))
        return res

    from benchmarks.common import cpu_info, write_result
    from nanoseek.accounting import count_params

    root = Path(args.dir or tempfile.mkdtemp(prefix="nanoseek-16b-"))
    names = list(CONFIGS) if args.config == "both" else [args.config]
    result = {"cpu": cpu_info(), "layers": args.layers, "configs": {}}
    try:
        for name in names:
            cfg = model_config(name, args.layers)
            bf16, int8 = root / f"{name}-bf16", root / f"{name}-int8"
            r = {"params_b": round(count_params(cfg).total_params / 1e9, 2),
                 "params_b_full_depth": round(count_params(model_config(name, None)).total_params / 1e9, 2)}
            r["write"] = stage("write", name, str(bf16), str(args.layers or 0))
            r["bf16_gb"] = round(sum(f.stat().st_size for f in bf16.glob("*.safetensors")) / 1e9, 2)
            r["quantize"] = stage("quantize", name, str(bf16), str(int8))
            r["int8_gb"] = round(sum(f.stat().st_size for f in int8.glob("*.safetensors")) / 1e9, 2)
            if not args.keep:
                shutil.rmtree(bf16)
            r["decode"] = stage("decode", name, str(int8))
            if not args.keep:
                shutil.rmtree(int8)
            result["configs"][name] = r
            d = r["decode"]
            print(f"{name} ({args.layers or cfg.num_hidden_layers} layers): bf16 {r['bf16_gb']} GB -> int8 "
                  f"{r['int8_gb']} GB; quantize peak RSS {r['quantize']['peak_rss_gb']} GB; decode peak RSS "
                  f"{d['peak_rss_gb']} GB; batch 1 {d['batch_1_tokens_per_s']} tok/s "
                  f"({d['batch_1_roofline_fraction']:.0%} of the {d['measured_bandwidth_gbs']} GB/s roofline), "
                  f"batch 8 {d['batch_8_tokens_per_s']} tok/s; with int8 activations batch 1 "
                  f"{d['batch_1_int8_activations_tokens_per_s']} tok/s "
                  f"({d['batch_1_int8_activations_roofline_fraction']:.0%}), batch 8 "
                  f"{d['batch_8_int8_activations_tokens_per_s']} tok/s", flush=True)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {write_result('16b', result)}")
    return result


if __name__ == "__main__":
    main()
