"""Greedy decode at batch 1, nanoseek against llama.cpp on the same checkpoint, side by side.

What: one random-weight DeepSeek-V3 model (MLA with q_lora, sigmoid routing with a nonzero
e_score_correction_bias, group-limited routing, a shared expert, a dense first layer; hidden 1536, 16
experts, ~1.5 GB in fp32, so that each decode step streams its weights from memory, not from cache) is
written by nanoseek in HF layout and converted by llama.cpp's own `convert_hf_to_gguf.py` to f32, bf16,
f16 and Q8_0 GGUF files. Each precision decodes the same prompt token ids greedily on both sides:

    llama.cpp f32  <->  nanoseek fp32
    llama.cpp bf16 <->  nanoseek bf16 weights (fp32 compute, nanoseek.infer.quant)
    llama.cpp f16  <->  nanoseek bf16 weights (nanoseek has no f16 weight format; same bytes per weight)
    llama.cpp Q8_0 <->  nanoseek int8 (per group of 128; Q8_0 is per block of 32, fp16 scales)
    llama.cpp Q8_0 <->  nanoseek int8 with int8 activations (`int8-a8`: kernels.set_int8_activations; the
                        scheme Q8_0's own matmuls use, activations quantized per block of 32)

at batch 1, with the same number of threads on both sides (`--threads`, default 1 and 2), for a few
rounds that alternate the two sides; the prompt is excluded (the timer starts after the prompt and the
first decode step) and the median over rounds of the time per generated token is reported. llama.cpp runs
through the `llama_cpp` Python binding of the same sdist (low-level `eval` plus an argmax over the
logits, the same loop shape as nanoseek's engine), in a child process; `llama-bench`'s `tg` number (pure
C++, no Python, random tokens at the same depth, its KV cache in f16 as it offers no f32) is reported
next to it when that tool was built.
Printed and saved: tokens/s of each, the ratio nanoseek / llama.cpp (the target is >= 1.0), and the
fraction of the memory roofline each reaches (weight bytes one step reads, counted from the model in
memory for nanoseek and from the GGUF tensor table for llama.cpp, over the time per token, over the
fastest memory read measured at that thread count: benchmarks.common.bandwidth, whose copy rate is saved
beside it). As a check that both run the same model, the
greedy tokens of llama.cpp f32 and nanoseek fp32 are compared position by position.

The tokenizer: nanoseek trains a small byte-level BPE for the checkpoint. llama.cpp's converter
identifies a BPE pre-tokenizer by hashing its output on a fixed text and refuses unknown ones, so the
conversion runs in a child process that makes the converter name it "deepseek-v3". This does not affect
the comparison: both sides are fed the same prompt token ids, never text.

Not converted: MTP layers (llama.cpp's DeepSeek-V3 converter drops them; the model here has none, and
decoding without speculation uses none on either side).

The llama.cpp build is cached: the llama-cpp-python sdist (version LLAMA_CPP_PYTHON below) is taken from
the cache or fetched once with `pip download --no-binary :all:`; its vendored llama.cpp is built with
CMake (the library, then `llama-bench`), 2 jobs, into `~/.cache/nanoseek/llama-cpp/<version>/` (or
$NANOSEEK_LLAMACPP_CACHE/<version>); `build.json` there records how long the first build took (tens of
minutes on 2 cores). Later runs reuse it. The binding's one missing pure-Python dependency (diskcache)
is pip-installed into the same cache folder. Nothing else is downloaded.

Slow, not part of `make bench` or `make test`: `python -m benchmarks.run_all --slow` runs it.
Run: `.venv/bin/python -m benchmarks.bench_llamacpp [--threads 1,2] [--rounds 3] [--new-tokens 64] [--quick]`.
Results: benchmarks/results/llamacpp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
PRE_TOKENIZER = "deepseek-v3"  # the name the converter is told for nanoseek's BPE (see the docstring)
# (label, GGUF outtype of convert_hf_to_gguf.py, nanoseek weight format of nanoseek.load)
PAIRS = [("f32", "f32", "fp32"), ("bf16", "bf16", "bf16"), ("f16", "f16", "bf16"), ("q8_0", "q8_0", "int8"),
         ("q8_0", "q8_0", "int8-a8")]
NANOSEEK_WEIGHTS = {"fp32": "dense", "bf16": "bf16", "int8": "int8", "int8-a8": "int8"}
INT8_ACTIVATIONS = {"int8-a8"}  # int8 weights and int8 activations (kernels.set_int8_activations), as Q8_0 runs
# the decode-sized model of benchmarks/bench_quant.py with DeepSeek-V3's group-limited routing on
MODEL_OVERRIDES = dict(n_group=4, topk_group=2)


# ----------------------------------------------------------------------------- the cached llama.cpp build
def cache_root() -> Path:
    base = os.environ.get("NANOSEEK_LLAMACPP_CACHE") or Path.home() / ".cache" / "nanoseek" / "llama-cpp"
    return Path(base) / LLAMA_CPP_PYTHON


def cmake_commands(src: Path, build: Path, jobs: int) -> list[list[str]]:
    """Configure the vendored llama.cpp (shared libraries for the binding, native SIMD, no network
    features, no tests/examples/server), build the library, then llama-bench."""
    llama = src / "vendor" / "llama.cpp"
    configure = ["cmake", "-S", str(llama), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                 "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                 "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]
    if not shutil.which("ninja"):
        configure = [a for a in configure if a not in ("-G", "Ninja")]
    return [configure] + [["cmake", "--build", str(build), "--target", t, "-j", str(jobs)]
                          for t in ("llama", "llama-bench")]


def fetch_sdist(root: Path) -> Path:
    """The extracted llama-cpp-python sdist under root/src (pip-downloaded into root once if absent)."""
    src = root / "src"
    if (src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        return src
    tarball = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not tarball.exists():
        root.mkdir(parents=True, exist_ok=True)
        print(f"fetching the llama-cpp-python {LLAMA_CPP_PYTHON} sdist with pip download", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                        "--no-binary", ":all:", "--no-deps", "-d", str(root)], check=True)
    tmp = Path(tempfile.mkdtemp(dir=root))
    with tarfile.open(tarball) as tf:
        tf.extractall(tmp, filter="data")
    (tmp / f"llama_cpp_python-{LLAMA_CPP_PYTHON}").rename(src)
    tmp.rmdir()
    return src


def built(root: Path) -> dict | None:
    """build.json of a finished cached build, None when there is none."""
    stamp = root / "build.json"
    return json.loads(stamp.read_text()) if stamp.exists() else None


def ensure_build(root: Path, jobs: int = 2) -> dict:
    """Build llama.cpp into the cache once (`nice`, `jobs` parallel compiles) and return build.json."""
    if (info := built(root)) is not None:
        return info
    src = fetch_sdist(root)
    print(f"building llama.cpp {LLAMA_CPP_PYTHON} into {root / 'build'} (once; tens of minutes on 2 cores)",
          flush=True)
    t = time.time()
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    steps = {}
    for cmd in cmake_commands(src, root / "build", jobs):
        t_step = time.time()
        subprocess.run(nice + cmd, check=True)
        steps[cmd[cmd.index("--target") + 1] if "--target" in cmd else "configure"] = round(time.time() - t_step)
    deps = root / "pydeps"
    if not (deps / "diskcache").exists():  # the binding imports it at import time
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(deps), "diskcache"],
                       check=True)
    info = {"version": LLAMA_CPP_PYTHON, "build_seconds": round(time.time() - t), "step_seconds": steps, "jobs": jobs,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (root / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def binding_env(root: Path) -> dict:
    """Environment for a child process that imports the sdist's `llama_cpp` over the cached libllama."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root / "pydeps"), str(Path(__file__).parent.parent)])
    env["LLAMA_CPP_LIB_PATH"] = str(root / "build" / "bin")
    return env


# ----------------------------------------------------------------------------- checkpoint and conversion
def model_config(quick: bool):
    from benchmarks.bench_quant import DECODE_SIZED
    from nanoseek.config import ModelConfig, preset

    return preset("bench") if quick else ModelConfig(**{**DECODE_SIZED, **MODEL_OVERRIDES})


def write_checkpoint(cfg, out: Path) -> None:
    """Random weights in HF layout, a random (nonzero) routing correction bias, nanoseek's BPE tokenizer."""
    import torch

    import nanoseek
    from nanoseek.data.corpus import builtin_corpus
    from nanoseek.data.tokenizer import train_tokenizer

    torch.manual_seed(0)
    model = nanoseek.Transformer(cfg).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)  # zero would leave the bias path of both routers untested
    tok = out.parent / "tokenizer"
    train_tokenizer(builtin_corpus(300, seed=0), vocab_size=400, out_dir=tok)
    nanoseek.save(model, out, tokenizer_dir=tok)


def convert_argv(model_dir: Path, out: Path, outtype: str) -> list[str]:
    return ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(out), "--outtype", outtype]


def convert_worker(llama_dir: Path, model_dir: Path, out: Path, outtype: str) -> dict:
    """In a child process: run llama.cpp's converter (told the pre-tokenizer), then read the GGUF tensor table."""
    sys.path[:0] = [str(llama_dir / "gguf-py"), str(llama_dir)]
    import conversion.base as base

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: PRE_TOKENIZER
    import convert_hf_to_gguf

    sys.argv = convert_argv(model_dir, out, outtype)
    convert_hf_to_gguf.main()
    from gguf import GGUFReader

    reader = GGUFReader(str(out))
    return {"file_bytes": out.stat().st_size,
            "tensors": [[t.name, int(t.n_bytes), t.tensor_type.name] for t in reader.tensors]}


def gguf_step_bytes(tensors: list[list], n_experts: int, top_k: int, batch: int = 1) -> float:
    """Weight bytes one decode step reads from a GGUF tensor table (name, bytes, type): the routed expert
    tensors (`*_exps`) in the fraction the batch touches, the embedding table not at all (a lookup)."""
    from benchmarks.common import touched_bytes

    dense = sum(n for name, n, _ in tensors if "_exps" not in name and not name.startswith("token_embd"))
    experts = sum(n for name, n, _ in tensors if "_exps" in name)
    return touched_bytes(dense, experts, n_experts, top_k, batch)


# ----------------------------------------------------------------------------- decoding, both sides
def llama_worker(gguf: str, threads: int, prompt: list[int], new_tokens: int) -> dict:
    """In a child process: greedy decode through the binding; seconds per token after the first decode step."""
    import numpy as np

    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=len(prompt) + new_tokens + 8, n_batch=max(len(prompt), 8),
                          n_ubatch=max(len(prompt), 8), n_threads=threads, n_threads_batch=threads,
                          logits_all=False, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)  # nanoseek's cache is fp32 too
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    llm.eval(prompt)
    out = [next_token()]
    llm.eval([out[-1]])
    out.append(next_token())
    t = time.perf_counter()
    while len(out) < new_tokens + 1:
        llm.eval([out[-1]])
        out.append(next_token())
    dt = time.perf_counter() - t
    return {"tokens": out[:new_tokens], "seconds_per_token": dt / (len(out) - 2)}


def nanoseek_decode(model, prompt: list[int], new_tokens: int) -> dict:
    """Greedy decode in nanoseek's engine at batch 1; seconds per token after the first step (prefill + one
    decode step), as llama_worker times it."""
    from benchmarks.common import timed_decode

    run = timed_decode(model, [prompt], new_tokens + 1)
    return {"tokens": run["tokens"][0][:new_tokens], "seconds_per_token": run["decode_s"] / run["decode_tokens"]}


def llama_bench(root: Path, gguf: Path, threads: int, prompt_len: int, new_tokens: int, reps: int) -> float | None:
    """llama-bench's generation tokens/s at the prompt's depth (None when llama-bench was not built)."""
    exe = root / "build" / "bin" / "llama-bench"
    if not exe.exists():
        return None
    cmd = [str(exe), "-m", str(gguf), "-p", "0", "-n", str(new_tokens), "-d", str(prompt_len), "-t", str(threads),
           "-r", str(reps), "-o", "json"]  # its KV cache stays f16 (it offers no f32): tiny at this depth
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed:\n{r.stderr[-2000:]}")
    return float(json.loads(r.stdout)[0]["avg_ts"])


def worker(kind: str, root: Path, *args: str) -> dict:
    env = binding_env(root)
    cmd = [sys.executable, "-m", "benchmarks.bench_llamacpp", "--worker", kind, str(root), *args]
    r = subprocess.run(cmd, env=env, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"the {kind} worker failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- results
def ratio_row(label: str, gguf_type: str, ours: str, llama_spt: float, ours_spt: float, llama_bytes: float,
              ours_bytes: float, bandwidth_gbs: float, bench_tps: float | None) -> dict:
    """One precision's numbers from seconds per token and bytes per step (the ratio is nanoseek / llama.cpp)."""
    llama_tps, ours_tps = 1 / llama_spt, 1 / ours_spt
    bw = bandwidth_gbs * 1e9
    return {"precision": label, "gguf": gguf_type, "nanoseek": ours, "llama_tokens_per_s": round(llama_tps, 2),
            "nanoseek_tokens_per_s": round(ours_tps, 2), "ratio": round(ours_tps / llama_tps, 3),
            "llama_step_gb": round(llama_bytes / 1e9, 4), "nanoseek_step_gb": round(ours_bytes / 1e9, 4),
            "llama_roofline": round(llama_bytes / llama_spt / bw, 3),
            "nanoseek_roofline": round(ours_bytes / ours_spt / bw, 3),
            "llama_bench_tokens_per_s": None if bench_tps is None else round(bench_tps, 2),
            "ratio_vs_llama_bench": None if bench_tps is None else round(ours_tps / bench_tps, 3)}


def format_table(rows: list[dict], threads: int, bandwidth_gbs: float) -> str:
    head = (f"{'precision':<9} {'nanoseek':<8} {'llama tok/s':>11} {'nanoseek tok/s':>14} {'ratio':>6} "
            f"{'llama roof':>10} {'ours roof':>9} {'llama-bench':>11}")
    lines = [f"threads {threads}, roofline: a {bandwidth_gbs:.1f} GB/s read (benchmarks.common.bandwidth)", head]
    for r in rows:
        lb = "-" if r["llama_bench_tokens_per_s"] is None else f"{r['llama_bench_tokens_per_s']:.2f}"
        lines.append(f"{r['precision']:<9} {r['nanoseek']:<8} {r['llama_tokens_per_s']:>11.2f} "
                     f"{r['nanoseek_tokens_per_s']:>14.2f} {r['ratio']:>5.2f}x {r['llama_roofline']:>10.0%} "
                     f"{r['nanoseek_roofline']:>9.0%} {lb:>11}")
    return "\n".join(lines)


def agreement(a: list[int], b: list[int]) -> dict:
    n = min(len(a), len(b))
    prefix = next((i for i in range(n) if a[i] != b[i]), n)
    return {"positions": n, "same_position": sum(x == y for x, y in zip(a, b)), "common_prefix": prefix}


# ----------------------------------------------------------------------------- driver
def run(args) -> dict:
    import torch

    import nanoseek
    from benchmarks.common import (bandwidth, cpu_info, int8_activations, machine, median, step_bytes,
                                   write_result)

    root = cache_root()
    info = ensure_build(root, args.jobs)
    print(f"llama.cpp {LLAMA_CPP_PYTHON} (llama-cpp-python sdist) built in {root} "
          f"(first build took {info['build_seconds']}s)", flush=True)
    llama_dir = root / "src" / "vendor" / "llama.cpp"
    cfg = model_config(args.quick)
    work = Path(args.dir or tempfile.mkdtemp(prefix="nanoseek-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = work / "hf"
        t = time.perf_counter()
        write_checkpoint(cfg, ckpt)
        print(f"wrote the checkpoint in {time.perf_counter() - t:.0f}s", flush=True)
        ggufs, tables = {}, {}
        for outtype in dict.fromkeys(p[1] for p in PAIRS):  # each GGUF type once (two rows share Q8_0)
            ggufs[outtype] = work / f"model-{outtype}.gguf"
            t = time.perf_counter()
            tables[outtype] = worker("convert", root, str(llama_dir), str(ckpt), str(ggufs[outtype]), outtype)
            print(f"converted to {outtype} in {time.perf_counter() - t:.0f}s "
                  f"({tables[outtype]['file_bytes'] / 1e9:.2f} GB)", flush=True)
        models = {fmt: nanoseek.load(ckpt, dtype=torch.float32, weights=NANOSEEK_WEIGHTS[fmt])
                  for fmt in sorted({p[2] for p in PAIRS})}
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(17, cfg.vocab_size, (args.prompt_tokens,), generator=g).tolist()
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        result = {"cpu": cpu_info(), "llama_cpp": {"llama_cpp_python": LLAMA_CPP_PYTHON, **info,
                                                   "interface": "llama_cpp Python binding (low-level eval + argmax)"},
                  "config": "bench preset" if args.quick else "bench_quant DECODE_SIZED + n_group=4, topk_group=2",
                  "params": sum(p.numel() for p in models["fp32"].parameters()),
                  "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
                  "pre_tokenizer_forced": PRE_TOKENIZER,
                  "gguf_types": {outtype: sorted({t[2] for t in tables[outtype]["tensors"]}) for outtype in ggufs},
                  "threads": {}}
        for threads in args.threads:
            torch.set_num_threads(threads)
            mem = bandwidth()
            bw = mem["read_gbs"]
            for fmt, m in models.items():  # warm-up: kernel builds, path calibration, allocator
                with int8_activations(fmt in INT8_ACTIVATIONS):
                    nanoseek_decode(m, prompt, 4)
            # per row of PAIRS (two rows share the Q8_0 file: nanoseek's int8 without and with int8 activations)
            times = [{"llama": [], "nanoseek": []} for _ in PAIRS]
            tokens: list[dict[str, list[int]]] = [{} for _ in PAIRS]
            for r in range(args.rounds):
                for i, (label, outtype, fmt) in enumerate(PAIRS):
                    sides = ["llama", "nanoseek"] if r % 2 == 0 else ["nanoseek", "llama"]
                    for side in sides:
                        if side == "llama":
                            out = worker("llama", root, str(ggufs[outtype]), str(threads), ",".join(map(str, prompt)),
                                         str(args.new_tokens))
                        else:
                            with int8_activations(fmt in INT8_ACTIVATIONS):
                                out = nanoseek_decode(models[fmt], prompt, args.new_tokens)
                        times[i][side].append(out["seconds_per_token"])
                        tokens[i][side] = out["tokens"]
            rows = []
            for i, (label, outtype, fmt) in enumerate(PAIRS):
                bench_tps = llama_bench(root, ggufs[outtype], threads, args.prompt_tokens, args.new_tokens,
                                        max(args.rounds, 2)) if not args.no_llama_bench else None
                rows.append(ratio_row(label, outtype, fmt, median(times[i]["llama"]),
                                      median(times[i]["nanoseek"]), gguf_step_bytes(tables[outtype]["tensors"], E, K),
                                      step_bytes(models[fmt], 1), bw, bench_tps))
                rows[-1]["greedy_agreement"] = agreement(tokens[i]["llama"], tokens[i]["nanoseek"])
                rows[-1]["seconds_per_token"] = {k: [round(x, 5) for x in v] for k, v in times[i].items()}
            print(format_table(rows, threads, bw), flush=True)
            f32 = rows[0]["greedy_agreement"]
            print(f"greedy tokens, llama.cpp f32 vs nanoseek fp32: {f32['same_position']}/{f32['positions']} "
                  f"positions agree, first {f32['common_prefix']} identical", flush=True)
            result["threads"][str(threads)] = {"bandwidth_gbs": round(bw, 2), "bandwidth": mem, "rows": rows}
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
            print(f"wrote {out}")
        elif not args.quick:
            print(f"wrote {write_result('llamacpp', result)}")
        return result
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--jobs", type=int, default=2, help="parallel compiles of the one-time llama.cpp build")
    p.add_argument("--quick", action="store_true",
                   help="the small `bench` preset, the first --threads value, 1 round, 16 new tokens; results only "
                        "to --out")
    p.add_argument("--no-llama-bench", action="store_true", help="skip the llama-bench column")
    p.add_argument("--dir", default=None, help="where the checkpoint and GGUF files go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep them")
    p.add_argument("--out", default=None, help="the results file (default: benchmarks/results/llamacpp.json)")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # a child process: convert or llama
    args = p.parse_args(argv)
    if args.worker:
        kind, rest = args.worker[0], args.worker[2:]
        if kind == "convert":
            out = convert_worker(Path(rest[0]), Path(rest[1]), Path(rest[2]), rest[3])
        else:
            out = llama_worker(rest[0], int(rest[1]), [int(x) for x in rest[2].split(",")], int(rest[3]))
        print(json.dumps(out))
        return out
    if args.quick:
        args.threads, args.rounds, args.new_tokens, args.prompt_tokens = args.threads[:1], 1, 16, 16
    return run(args)


if __name__ == "__main__":
    main()
