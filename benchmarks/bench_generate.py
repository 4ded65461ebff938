"""Generation benchmarks: nanoseek's engine vs transformers `generate()`, a server load test, MTP speculation.

1. decode: greedy tokens/s of `Engine.generate_batch` against transformers' `DeepseekV3ForCausalLM.generate`
   with the same weights (nanoseek saves, transformers loads), on the `bench` preset, prompt 32 tokens,
   64 new, at batch 1 and 16, in fp32 and in bf16 (transformers cast to bf16; nanoseek as `generate` loads a
   bf16 checkpoint on a CPU: bf16 linear and expert weights, fp32 compute, and in the same rounds the model
   cast to bf16 and computed in bf16 through torch, what `--dtype bfloat16` loads: `nanoseek_bf16_compute`);
   rounds alternate and the median is reported, with the number of sequences whose 64 tokens are identical.
2. server: a real `nanoseek serve` process on loopback; N concurrent clients (a bounded thread pool) send
   the same requests that are then sent one at a time: total time, throughput, p50/p99 latency.
3. mtp: speculative decoding (MTP drafts, one forward verifies) against plain greedy decoding of the same
   model: acceptance rate, speed-up, identical tokens. With `--model DIR` (a trained checkpoint with an MTP
   module) on chat prompts of the built-in tasks; without one, on the small preset trained here for
   `--mtp-train-steps` steps on arithmetic transcripts (or, with 0 steps, on random weights, where
   acceptance is near zero, which the result says).

Run: `.venv/bin/python -m benchmarks.bench_generate [--parts decode,server,mtp] [--model DIR]`.
Results: benchmarks/results/generate.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import nanoseek
from benchmarks.common import (RESULTS, alternate, bandwidth_gbs, experts_touched, fast_dtype, median, step_bytes,
                               write_result)
from nanoseek.config import preset
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.quant import quantize_model


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


# ----------------------------------------------------------------------------- 1. decode vs transformers
def bench_decode(args) -> dict:
    import transformers

    cfg = preset(args.preset)
    torch.manual_seed(0)
    fp32 = nanoseek.Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save(fp32, d)
        theirs32 = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    theirs32.generation_config.eos_token_id = None  # always 64 new tokens, as ours (no stop ids)
    theirs32.generation_config.pad_token_id = 0
    out = {}
    bandwidth = bandwidth_gbs()  # once: the machine's memory, whatever the weights' dtype
    for dtype in args.dtypes:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        # bf16: what `generate` / `serve` load a bf16 checkpoint as on a CPU (bf16 linear and expert weights,
        # fp32 compute: nanoseek.infer.generate.load_model); transformers computes in bf16.
        ours = fp32 if dt == torch.float32 else quantize_model(copy.deepcopy(fp32), "bf16")
        theirs = theirs32 if dt == torch.float32 else copy.deepcopy(theirs32).to(dt)
        # and for bf16, in the same rounds, nanoseek computing in bf16 through torch (`--dtype bfloat16`)
        also = {} if dt == torch.float32 else {"nanoseek_bf16_compute": copy.deepcopy(fp32).to(dt)}
        out[dtype] = _decode_rows(args, cfg, ours, theirs, dtype, bandwidth, also)
    return out


def decode_roofline(model, batch: int, bandwidth_gbs: float) -> dict:
    """The weight bytes one decode step of `batch` rows must read, and the fastest that step can be here.

    A decode step multiplies a few rows by every weight it touches, so it cannot beat streaming those
    weights from memory once: all non-expert weights (the embedding is a lookup) plus, per MoE layer, the
    experts the batch picks (B tokens x K choices; uniform routing is assumed for the expected count):
    benchmarks.common.step_bytes.
    """
    cfg = model.config
    hit = experts_touched(cfg.n_routed_experts, cfg.num_experts_per_tok, batch)
    nbytes = step_bytes(model, batch)
    floor_s = nbytes / (bandwidth_gbs * 1e9)
    return {"weight_mb_per_step": round(nbytes / 1e6, 1), "experts_read_per_layer": round(hit, 1),
            "bandwidth_gbs": round(bandwidth_gbs, 1), "floor_ms_per_step": round(floor_s * 1e3, 2),
            "ceiling_tokens_per_s": round(batch / floor_s, 1)}


def _decode_rows(args, cfg, ours, theirs, dtype: str, bandwidth: float, also: dict | None = None) -> dict:
    """nanoseek's engine against transformers.generate at each batch, rounds alternating; `also` names more
    nanoseek models timed in the same rounds (their tokens/s and their ratio to `ours` are reported)."""
    out = {}
    for B in args.batches:
        prompts = random_prompts(B, args.prompt_len, cfg.vocab_size, seed=B)
        ids = torch.tensor(prompts)
        engine = Engine(ours, max_batch_size=B, max_len=args.prompt_len + args.new_tokens)
        sp = SamplingParams(max_tokens=args.new_tokens)
        results = {}

        def run_ours():
            results["ours"] = [c.token_ids for c in engine.generate_batch(prompts, sp)]

        def runner(model):
            other = Engine(model, max_batch_size=B, max_len=args.prompt_len + args.new_tokens)
            return lambda: other.generate_batch(prompts, sp)

        def run_theirs():
            with torch.inference_mode():
                seq = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                      do_sample=False)
            results["theirs"] = seq[:, args.prompt_len:].tolist()

        fns = {"nanoseek": run_ours, "transformers": run_theirs, **{k: runner(m) for k, m in (also or {}).items()}}
        times = alternate(fns, rounds=args.rounds, warmup=1)
        same_seq = sum(a == b for a, b in zip(results["ours"], results["theirs"]))
        same_tok = sum(x == y for a, b in zip(results["ours"], results["theirs"]) for x, y in zip(a, b))
        tps = {k: B * args.new_tokens / median(v) for k, v in times.items()}
        roof = decode_roofline(ours, B, bandwidth)
        roof["max_speedup_vs_transformers"] = round(roof["ceiling_tokens_per_s"] / tps["transformers"], 2)
        roof["nanoseek_fraction_of_ceiling"] = round(tps["nanoseek"] / roof["ceiling_tokens_per_s"], 2)
        out[f"batch_{B}"] = {"tokens_per_s": tps, "speedup": tps["nanoseek"] / tps["transformers"],
                             "identical_sequences": f"{same_seq}/{B}",
                             "identical_tokens": f"{same_tok}/{B * args.new_tokens}",
                             "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
                             "memory_roofline": roof,
                             **{f"nanoseek_vs_{k}": tps["nanoseek"] / tps[k] for k in also or {}}}
        print(f"decode {dtype} batch {B:>2}: nanoseek {tps['nanoseek']:.0f} tok/s  transformers {tps['transformers']:.0f} "
              f"tok/s  speed-up {tps['nanoseek'] / tps['transformers']:.2f}x  identical sequences {same_seq}/{B}\n"
              f"    roofline: {roof['weight_mb_per_step']} MB of weights per step at {roof['bandwidth_gbs']} GB/s = "
              f"{roof['floor_ms_per_step']} ms -> at most {roof['ceiling_tokens_per_s']:.0f} tok/s, "
              f"{roof['max_speedup_vs_transformers']}x transformers (nanoseek is at "
              f"{roof['nanoseek_fraction_of_ceiling']:.0%} of it)"
              + "".join(f"\n    {k}: {tps[k]:.0f} tok/s (nanoseek {tps['nanoseek'] / tps[k]:.2f}x it)" for k in also or {}),
              flush=True)
    return out


# ----------------------------------------------------------------------------- 2. server load test
def _save_model_with_tokenizer(cfg, out: Path) -> Path:
    from nanoseek.data.tokenizer import train_tokenizer

    text = ["the quick brown fox jumps over the lazy dog", "hello world", "0123456789 + - * / = ?"] * 20
    train_tokenizer(text, 300, out / "tokenizer", min_frequency=1)
    torch.manual_seed(0)
    nanoseek.save(nanoseek.Transformer(cfg).eval(), out / "model", tokenizer_dir=out / "tokenizer")
    return out / "model"


def bench_server(args, preset_name: str) -> dict:
    import httpx

    cfg = preset(preset_name)
    n = args.clients
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _save_model_with_tokenizer(cfg, Path(tmp))
        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--host", "127.0.0.1", "--max-batch-size", str(n), "--max-queue", str(2 * n),
               "--max-len", str(args.prompt_len + args.new_tokens + 8), "--log-level", "warning"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 180
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the server did not start")
                time.sleep(0.3)
            prompts = random_prompts(n, args.prompt_len, cfg.vocab_size, seed=7)
            http = httpx.Client(timeout=600)

            def one(prompt: list[int]) -> tuple[float, int]:
                body = {"model": "model", "prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0,
                        "ignore_eos": True}
                t = time.perf_counter()
                r = http.post(url + "/v1/completions", json=body)
                r.raise_for_status()
                return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

            one(prompts[0])  # warm-up
            t = time.perf_counter()
            seq = [one(p) for p in prompts]
            t_seq = time.perf_counter() - t
            with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:  # bounded: n clients
                t = time.perf_counter()
                conc = list(pool.map(one, prompts))
                t_conc = time.perf_counter() - t
            http.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    def stats(rows, total):
        lat = sorted(r[0] for r in rows)
        toks = sum(r[1] for r in rows)
        return {"total_s": round(total, 3), "tokens": toks, "tokens_per_s": round(toks / total, 1),
                "p50_latency_s": round(statistics.median(lat), 3),
                "p99_latency_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3)}

    res = {"preset": preset_name, "clients": n, "prompt_tokens": args.prompt_len,
           "new_tokens": args.new_tokens, "sequential": stats(seq, t_seq), "concurrent": stats(conc, t_conc),
           "speedup_total_time": round(t_seq / t_conc, 2)}
    print(f"server ({preset_name}) {n} requests: one at a time {t_seq:.1f}s, {n} concurrent {t_conc:.1f}s -> {t_seq / t_conc:.2f}x; "
          f"concurrent p50 {res['concurrent']['p50_latency_s']}s p99 {res['concurrent']['p99_latency_s']}s, "
          f"{res['concurrent']['tokens_per_s']} tok/s", flush=True)
    return res


# ----------------------------------------------------------------------------- 3. MTP speculative decoding
def _quick_trained_model(args):
    """The small preset (with its MTP module) trained briefly on arithmetic chat transcripts."""
    from nanoseek.data.tasks import get_task
    from nanoseek.data.chat import END_THINK, EOS
    from nanoseek.data.tokenizer import train_tokenizer

    task = get_task("arithmetic")
    train = task.examples("train", 2000, seed=0)
    tok = train_tokenizer([f"{e.prompt}\n{e.solution}\n{e.answer}" for e in train], 512, min_frequency=2)
    texts = []
    for e in train:
        prompt = tok.apply_chat_template([{"role": "user", "content": e.prompt}], add_generation_prompt=True)
        texts.append(tok.encode(prompt + f"{e.solution}\n{END_THINK}\n{e.answer}{EOS}"))
    cfg = preset("small", vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = nanoseek.Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    T = max(len(t) for t in texts)
    for step in range(args.mtp_train_steps):
        rows = [texts[i] for i in torch.randint(0, len(texts), (32,), generator=g).tolist()]
        x = torch.full((32, T), tok.pad_id)
        y = torch.full((32, T), -100)
        for i, r in enumerate(rows):
            x[i, :len(r)] = torch.tensor(r)
            y[i, :len(r) - 1] = torch.tensor(r[1:])
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
        loss = model.forward_train(x, y, mtp_weight=0.3).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = task.examples("test", args.mtp_prompts, seed=1)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": e.prompt}],
                                                  add_generation_prompt=True)) for e in test]
    print(f"mtp: trained the small preset for {args.mtp_train_steps} steps (final loss {loss.item():.3f})", flush=True)

    class Tok:  # the two ids the benchmark needs
        eos_id = tok.eos_id

    return model, Tok, prompts


def speculation_costs(model, prompt: list[int], rounds: int = 200) -> dict:
    """Milliseconds of the three calls a speculative step is made of, at batch 1 and this prompt's length:
    a plain one-token step, the two-token verify, and the two-position MTP draft (on the engine's cache,
    with the model as the engine runs it)."""
    from nanoseek.infer import fast
    from nanoseek.infer.cache import PagedCache

    fast.accelerate(model)
    cache = PagedCache.for_model(model, -(-(len(prompt) + 4) // 64), 64, next(model.parameters()).dtype, "cpu")
    table = [list(range(cache.num_blocks))]  # the engine's layout, one sequence
    ids = torch.tensor([prompt])
    zero = torch.zeros(1, dtype=torch.long)
    pos = torch.tensor([len(prompt) - 2])
    with torch.inference_mode():
        _, hidden = model.forward_cached(ids, cache.view(table, zero, len(prompt)))
        calls = {"step_1_token": lambda: model.forward_cached(ids[:, :1], cache.view(table, pos, 1)),
                 "verify_2_tokens": lambda: model.forward_cached(ids[:, :2], cache.view(table, pos, 2)),
                 "mtp_draft": lambda: model.mtp_forward_cached(hidden[:, :2], ids[:, 1:3], cache.view(table, pos, 2))}
        times = alternate(calls, rounds=rounds, warmup=20)
    return {k: round(median(v) * 1e3, 3) for k, v in times.items()}


def bench_mtp(args) -> dict:
    if args.model:
        model = nanoseek.load(args.model).eval()
        from nanoseek.data.tasks import get_task
        from nanoseek.infer.text import ChatTokenizer

        tok = ChatTokenizer(args.model)
        examples = get_task("arithmetic").examples("test", args.mtp_prompts, seed=1)
        prompts = [tok.chat_prompt([{"role": "user", "content": e.prompt}])[0] for e in examples]
        stop, source = [tok.eos_id], f"trained model {args.model}, arithmetic test prompts"
    elif args.mtp_train_steps:
        model, tok, prompts = _quick_trained_model(args)
        stop = [tok.eos_id]
        source = (f"small preset trained here for {args.mtp_train_steps} steps on arithmetic chat data "
                  "(a stand-in for the speedrun's checkpoint; pass --model for that)")
    else:
        cfg = preset(args.preset, num_nextn_predict_layers=1)
        torch.manual_seed(0)
        model = nanoseek.Transformer(cfg).eval()
        prompts = random_prompts(args.mtp_prompts, args.prompt_len, cfg.vocab_size, seed=3)
        stop, source = [], f"RANDOM weights ({args.preset} preset + 1 MTP layer): acceptance is near zero by design"
    if not model.config.num_nextn_predict_layers:
        raise SystemExit("the model has no MTP module (num_nextn_predict_layers = 0)")
    max_len = max(len(p) for p in prompts) + args.new_tokens + 2
    res = {}
    for B in (1, len(prompts)):
        sp = SamplingParams(max_tokens=args.new_tokens, stop_token_ids=stop)
        plain = Engine(model, max_batch_size=B, max_len=max_len)
        spec = Engine(model, max_batch_size=B, max_len=max_len, speculative=True)
        outs = {}
        work = prompts[:1] if B == 1 else prompts
        times = alternate({"plain": lambda: outs.__setitem__("plain", plain.generate_batch(work, sp)),
                           "speculative": lambda: outs.__setitem__("spec", spec.generate_batch(work, sp))},
                          rounds=args.rounds, warmup=1)
        tokens = sum(len(c.token_ids) for c in outs["plain"])
        same = all(a.token_ids == b.token_ids for a, b in zip(outs["plain"], outs["spec"]))
        res[f"batch_{B}"] = {"acceptance_rate": round(spec.stats.acceptance_rate, 4),
                             "speedup": round(median(times["plain"]) / median(times["speculative"]), 3),
                             "tokens_per_s": {k: round(tokens / median(v), 1) for k, v in times.items()},
                             "identical_tokens": same}
        print(f"mtp batch {B:>2}: acceptance {spec.stats.acceptance_rate:.1%}  speed-up "
              f"{res[f'batch_{B}']['speedup']:.2f}x  identical {same}  ({source})", flush=True)
        if B == 1:
            # A speculative step emits 1 + a tokens (a = acceptance) for one verify and one draft call, so
            # plain/speculative time per token is at most (1 + a) * step / (verify + draft).
            cost = speculation_costs(model, work[0])
            a = spec.stats.acceptance_rate
            cost["speedup_bound_at_this_acceptance"] = round((1 + a) * cost["step_1_token"] /
                                                             (cost["verify_2_tokens"] + cost["mtp_draft"]), 3)
            cost["acceptance_needed_for_1_5x"] = round(1.5 * (cost["verify_2_tokens"] + cost["mtp_draft"]) /
                                                      cost["step_1_token"] - 1, 3)
            res["batch_1"]["call_costs_ms"] = cost
            print(f"    calls: step {cost['step_1_token']} ms, 2-token verify {cost['verify_2_tokens']} ms, MTP draft "
                  f"{cost['mtp_draft']} ms -> speed-up bound {cost['speedup_bound_at_this_acceptance']}x at this "
                  f"acceptance; 1.5x would need acceptance {cost['acceptance_needed_for_1_5x']:.2f}", flush=True)
    return {"source": source, **res}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="decode,server,mtp")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    ap.add_argument("--dtypes", type=lambda s: s.split(","), default=None,
                    help="fp32 (identical tokens expected) and/or bf16 (half the weight bytes; tokens may drift); "
                         "default fp32, plus bf16 where bf16 is fast (AMX / AVX512-BF16 CPUs)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--server-presets", type=lambda s: s.split(","), default=["bench", "small"],
                    help="model presets served in the load test (random weights)")
    ap.add_argument("--model", default=None, help="a trained checkpoint with an MTP module, for the mtp part")
    ap.add_argument("--mtp-prompts", type=int, default=8)
    ap.add_argument("--mtp-train-steps", type=int, default=300,
                    help="without --model: train the small preset this long for the mtp part (0: random weights)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = ["fp32"] + (["bf16"] if fast_dtype() == torch.bfloat16 else [])
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the server process
    parts = args.parts.split(",")
    result: dict = {"config": {k: v for k, v in vars(args).items()}}
    if "decode" in parts:
        result["decode"] = bench_decode(args)
    if "server" in parts:
        result["server"] = {p: bench_server(args, p) for p in args.server_presets}
    if "mtp" in parts:
        result["mtp"] = bench_mtp(args)
    # A run of some parts keeps the others' earlier results (named, so that nobody reads them as this run's).
    old_path = RESULTS / "generate.json"
    old = json.loads(old_path.read_text()) if old_path.is_file() else {}
    kept = [k for k in ("decode", "server", "mtp") if k not in parts and k in old]
    result.update({k: old[k] for k in kept})
    if kept:
        result["kept_from_an_earlier_run"] = kept
    path = write_result("generate", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
