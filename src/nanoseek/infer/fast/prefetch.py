"""How far ahead the one- and two-row matmuls prefetch bf16 and int8 weights: measured once per build and machine.

One core decoding at batch 1 reads weights as fast as its outstanding memory requests allow, and a software
prefetch a fixed distance ahead of each weight stream adds requests. The best distance is a property of
the machine's memory (its latency times the rate one core consumes), not of the instruction set: the
two CPU kinds measured want different distances, and the avx2 and avx512 builds on one of them the same
(README, "One build per instruction set"). So the first process that loads a build times one- and
two-row matmuls over bf16 and int8 weights far larger than the caches at each distance the kernels offer
(0, 512, 1024, 2048 bytes; about a second, once), keeps the fastest, and records it beside the build
(`<build name>.prefetch.json` under the build root); later processes read it.

`NANOSEEK_PREFETCH=0|512|1024|2048` sets the distance without measuring (tests; a machine known better).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

DISTANCES = (0, 512, 1024, 2048)
ENV = "NANOSEEK_PREFETCH"
PROBE_BYTES = 128 << 20  # per format: several times the L3 of a desktop or small-server CPU


def record_path(root: Path, name: str) -> Path:
    return root / f"{name}.prefetch.json"


def configure(module, root: Path, name: str) -> dict:
    """Set the module's prefetch distance: NANOSEEK_PREFETCH, else this build's record, else measured now
    (and recorded). Returns what was set and where it came from."""
    forced = os.environ.get(ENV, "").strip()
    if forced:
        if forced in map(str, DISTANCES):
            module.set_narrow_prefetch(int(forced))
            return {"bytes": int(forced), "source": ENV}
        print(f"nanoseek: {ENV}={forced!r} ignored (choose one of {', '.join(map(str, DISTANCES))}); "
              "using the measured distance", file=sys.stderr, flush=True)
    path = record_path(root, name)
    try:
        record = json.loads(path.read_text())
        module.set_narrow_prefetch(int(record["bytes"]))
        return {**record, "source": str(path)}
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        pass
    record = measure(module)
    module.set_narrow_prefetch(record["bytes"])
    try:  # written whole, then renamed: parallel test processes may measure at once
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)
    except OSError:
        pass
    return {**record, "source": "measured"}


def measure(module, rounds: int = 3) -> dict:
    """Time one- and two-row matmuls on one thread over PROBE_BYTES of bf16 and of int8 weights (row length 2048,
    scales per 128) at each distance, rounds alternating; the distance with the least total time wins (at
    more threads the cores share the memory's bandwidth and the distance matters less). Values do not
    matter to the speed, so the weights are constant fills, cheap to make."""
    K, N = 2048, 4096
    per = max(2, PROBE_BYTES // (N * K))  # int8 matrices; bf16 ones have half as many for the same bytes
    int8 = [(torch.full((N, K), 3, dtype=torch.int8), torch.full((N, K // 128), 0.01)) for _ in range(per)]
    bf16 = [(torch.full((N, K), 0.5, dtype=torch.bfloat16), None) for _ in range(max(1, per // 2))]
    xs = [torch.randn(1, K), torch.randn(2, K)]  # a decode step at batch 1, and a two-token verify
    weights = int8 + bf16

    def one_pass() -> float:
        t = time.perf_counter()
        for x in xs:
            for w, s in weights:
                module.rows_matmul(x, w, s)
        return time.perf_counter() - t

    best = {d: float("inf") for d in DISTANCES}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core's outstanding requests are what the distance is about
    try:
        for r in range(rounds + 1):
            for d in (DISTANCES if r % 2 == 0 else DISTANCES[::-1]):
                module.set_narrow_prefetch(d)
                t = one_pass()
                if r:  # the first round warms up
                    best[d] = min(best[d], t)
    finally:
        torch.set_num_threads(threads)
    nbytes = len(xs) * sum(w.numel() * w.element_size() + (s.numel() * 4 if s is not None else 0) for w, s in weights)
    chosen = min(best, key=best.get)
    return {"bytes": chosen, "threads": 1,
            "read_gbs": {str(d): round(nbytes / t / 1e9, 1) for d, t in best.items()},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
