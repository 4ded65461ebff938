"""`nanoseek plan --search`: every layout of a cluster (pp, ep, schedule, recomputation, ZeRO stage), the
ones that fit ranked by estimated GPU-hours per trillion tokens. A choice the user fixed stays fixed."""

from __future__ import annotations

import dataclasses

from nanoseek.config import ModelConfig
from nanoseek.plan.estimate import estimate
from nanoseek.plan.specs import PRECISIONS, RECOMPUTE, SCHEDULES, Assumptions, Cluster, Layout, PlanError, Precision


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg: ModelConfig, cl: Cluster, base: Layout, pp: int | None = None, ep: int | None = None,
               schedule: str | None = None, recompute: str | None = None, zero: int | None = None):
    """Layouts to try: `base` with each free choice enumerated (None = free)."""
    E = cfg.n_routed_experts
    for p in [pp] if pp else [d for d in _divisors(cl.gpus) if d <= cfg.num_hidden_layers]:
        for e in [ep] if ep else ([d for d in _divisors(E) if (cl.gpus // p) % d == 0] if E else [1]):
            for s in [schedule] if schedule else (SCHEDULES if p > 1 else [None]):
                for r in [recompute] if recompute else RECOMPUTE:
                    for z in [zero] if zero else (1, 2, 3):
                        yield dataclasses.replace(base, pp=p, ep=e, dp=None, schedule=s, recompute=r, zero=z,
                                                  stage_layers=None)


def search(cfg: ModelConfig, cl: Cluster, base: Layout, a: Assumptions = Assumptions(),
           prec: Precision = PRECISIONS["v3"], top: int = 10, **fixed) -> dict:
    """{'evaluated', 'invalid', 'fitting', 'results': the `top` fitting layouts, cheapest first}."""
    evaluated = invalid = 0
    fitting = []
    for lay in candidates(cfg, cl, base, **fixed):
        evaluated += 1
        try:
            est = estimate(cfg, cl, lay, a, prec)
        except PlanError:
            invalid += 1
            continue
        if est["fits"]:
            fitting.append(est)
    fitting.sort(key=lambda r: (r["gpu_hours_per_trillion_tokens"], r["memory_gib_per_gpu"]))
    return {"evaluated": evaluated, "invalid": invalid, "fitting": len(fitting), "results": fitting[:top]}
