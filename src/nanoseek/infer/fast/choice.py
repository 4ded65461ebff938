"""Which build runs a weight format fastest on this CPU: measured once per machine, format and thread count.

A CPU with AVX-512 also runs the avx2 build, and the wider vectors are not faster for every format: on a
CPU that executes 512-bit operations as two 256-bit halves (AMD Zen 4) the avx2 build's fp32 loops beat
the avx512 ones, while the avx512 build's VNNI loops win with int8 activations (benchmarks/bench_kernels.py,
`decode_step_by_isa`; README, "One build per instruction set"). So when a model is accelerated
(nanoseek.infer.fast.accelerate names its weight format) and this CPU runs more than one vector build,
the first process to need the choice times few-row matmuls through each build over that format's weights,
one set from cache and one far larger than the caches, at 1, 2 and 8 activation rows, the builds
alternating, and records the fastest beside the builds (`isa-choice-<digest>.json` under the build root;
the digest names the CPU and the builds, so another CPU or another source gets its own record). Later
processes read it. It costs a second or so, plus building the second instruction set once.

`NANOSEEK_KERNEL_ISA=avx2|avx512|portable` forces a build for every format (no measurement); kernels used
before any model was accelerated take the best build by CPU flags.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

# the formats a decode step streams its weights in, and their bytes per weight
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5}
WEIGHT_FORMATS = tuple(ELEMENT_BYTES)
# the scale groups nanoseek quantize writes by default: nanoseek.infer.quant.DEFAULT_GROUPS (equal, tested; not
# imported, since quant imports the kernels that import this)
GROUPS = {"int8": 128, "int4": 32}
# the keys a choice is measured under ("-a8": int8 / int4 weights with int8 activations)
FORMATS = WEIGHT_FORMATS + tuple(f"{fmt}-a8" for fmt in GROUPS)
ROWS = (1, 2, 8)                     # a decode step at batch 1, a two-token verify, a batch of 8
CACHED_SHAPE = (1536, 512)           # an expert-sized matrix: read from the caches when it repeats
STREAMED_BYTES = 64 << 20            # per format: far above the L3 of a desktop or small-server CPU
SAMPLE_SECONDS = 0.004               # each timing runs the matmul at least this long
TIE = 0.02                           # a build must beat the flags' first choice by more than this share


def record_path(root: Path, cpu: str, builds: dict[str, str]) -> Path:
    """The record for this CPU (its model name and flags) and these builds ({isa: extension name})."""
    digest = hashlib.sha256(json.dumps([cpu, sorted(builds.items())]).encode()).hexdigest()[:16]
    return root / f"isa-choice-{digest}.json"


def format_key(fmt: str, int8_activations: bool) -> str:
    """The key a model's weight format is measured under: int8 / int4 carry the activation mode."""
    return f"{fmt}-a8" if int8_activations and fmt in GROUPS else fmt


def choose(key: str, modules: dict, root: Path, cpu: str, threads: int) -> dict:
    """The build for `key` at `threads` threads among `modules` ({isa: extension}, best by flags first):
    this machine's record, else measured now (and recorded). Returns {"isa", "source", ...}."""
    builds = {isa: m.__name__ for isa, m in modules.items()}
    path = record_path(root, cpu, builds)
    entry = f"{key}@{threads}"
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        recorded = {}
    hit = recorded.get("choices", {}).get(entry) if isinstance(recorded, dict) else None
    if isinstance(hit, dict) and hit.get("isa") in modules:
        return {**hit, "source": str(path)}
    result = measure(key, modules)
    try:  # merged with what other processes recorded meanwhile, written whole, then renamed
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError):
            recorded = {}
        choices = recorded.get("choices", {}) if isinstance(recorded, dict) else {}
        choices[entry] = result
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"cpu": cpu, "builds": builds, "choices": choices}, indent=2) + "\n")
        tmp.replace(path)
    except OSError:
        pass
    return {**result, "source": "measured"}


def probe_weights(key: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """One cached-size and one streamed-size weight in the key's format (constant fills: values do not
    change the speed, and they are cheap to make)."""
    fmt = key.removesuffix("-a8")
    K = 2048
    shapes = [CACHED_SHAPE, (int(STREAMED_BYTES / (K * ELEMENT_BYTES[fmt])), K)]
    out = []
    for N, K in shapes:
        if fmt == "fp32":
            out.append((torch.full((N, K), 0.5), None))
        elif fmt == "bf16":
            out.append((torch.full((N, K), 0.5, dtype=torch.bfloat16), None))
        elif fmt == "int8":
            out.append((torch.full((N, K), 3, dtype=torch.int8), torch.full((N, K // GROUPS[fmt]), 0.01)))
        else:  # packed int4: two inputs a byte
            out.append((torch.full((N, K // 2), 0x13, dtype=torch.uint8), torch.full((N, K // GROUPS[fmt]), 0.01)))
    return out


def inputs(w: torch.Tensor) -> int:
    """The inputs per row of a stored weight (packed int4: two a byte)."""
    return w.shape[1] * (2 if w.dtype == torch.uint8 else 1)


def measure(key: str, modules: dict, rounds: int = 3) -> dict:
    """Time rows_matmul through each build on the key's probe weights at each of ROWS, rounds alternating
    the builds (the first warms up; the least time of the rest counts); each build's score is the mean over
    the cases of its time over the best build's. The flags' first choice keeps its place unless another
    build scores lower by more than TIE."""
    isas = list(modules)
    a8 = key.endswith("-a8")
    before = {isa: m.int8_activations() for isa, m in modules.items()}
    cases = [(w, s, torch.randn(rows, inputs(w))) for w, s in probe_weights(key) for rows in ROWS]
    best = [{isa: float("inf") for isa in isas} for _ in cases]
    reps = []
    try:
        for m in modules.values():
            m.set_int8_activations(a8)
        for w, s, x in cases:  # repetitions per timing, from one call of the flags' first build
            t = time.perf_counter()
            modules[isas[0]].rows_matmul(x, w, s)
            reps.append(max(1, int(SAMPLE_SECONDS / max(time.perf_counter() - t, 1e-7))))
        for r in range(rounds + 1):
            for isa in (isas if r % 2 == 0 else isas[::-1]):
                m = modules[isa]
                for i, (w, s, x) in enumerate(cases):
                    t = time.perf_counter()
                    for _ in range(reps[i]):
                        m.rows_matmul(x, w, s)
                    if r:
                        best[i][isa] = min(best[i][isa], (time.perf_counter() - t) / reps[i])
    finally:
        for isa, m in modules.items():
            m.set_int8_activations(before[isa])
    score = {isa: sum(b[isa] / min(b.values()) for b in best) / len(best) for isa in isas}
    chosen = min(score, key=score.get)
    if score[chosen] > score[isas[0]] * (1 - TIE):
        chosen = isas[0]
    return {"isa": chosen, "score": {isa: round(v, 3) for isa, v in score.items()},
            "us": {f"{tuple(w.shape)} x{x.shape[0]}": {isa: round(b[isa] * 1e6, 1) for isa in isas}
                   for (w, _, x), b in zip(cases, best)},
            "threads": torch.get_num_threads(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
