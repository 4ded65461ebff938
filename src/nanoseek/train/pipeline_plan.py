"""The layout of a pipelined run (nanoseek.train.pipeline), decided before any process group exists: which
torch schedule class a `parallel.pp_schedule` name is, how many stages each rank runs, the layer plan
(decoder layers per stage, and which pipeline rank runs each stage) and how many micro-batches a step has.
Every check raises a one-line ConfigError naming the key.

Stage placement: stage s runs on pipeline rank s % pp ("loop" order: 1F1B, Interleaved1F1B) or, for the
V-shaped schedules (ZBVZeroBubble, DualPipeV: exactly 2 stages per rank), on rank s for s < pp and 2pp-1-s
after, so the first and the last stage share rank 0 (V3 report section 3.2.1, DualPipe). These are the
placements torch's schedules assume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nanoseek.config import ConfigError

# config name -> class name in torch.distributed.pipelining (looked up at run time: torch versions differ)
SCHEDULES = {"1F1B": "Schedule1F1B", "Interleaved1F1B": "ScheduleInterleaved1F1B",
             "ZBVZeroBubble": "ScheduleZBVZeroBubble", "DualPipeV": "ScheduleDualPipeV"}
V_SHAPED = ("ZBVZeroBubble", "DualPipeV")


def schedule_class(name: str):
    """The torch schedule class for a config name, or a ConfigError saying this torch lacks it."""
    if name not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule must be one of {tuple(SCHEDULES)}, got {name!r}")
    import torch.distributed.pipelining as pipelining

    cls = getattr(pipelining, SCHEDULES[name], None)
    if cls is None:
        have = [k for k, v in SCHEDULES.items() if hasattr(pipelining, v)]
        raise ConfigError(f"parallel.pp_schedule={name}: torch {torch.__version__} has no {SCHEDULES[name]} "
                          f"(available: {have})")
    return cls


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class StagePlan:
    """Which decoder layers each stage runs and which pipeline rank runs it."""
    pp: int
    schedule: str
    layers: tuple[tuple[int, ...], ...]   # per stage, its decoder layer indices
    rank_of: tuple[int, ...]              # per stage, its pipeline rank

    @property
    def n_stages(self) -> int:
        return len(self.layers)

    def stages_of(self, pp_rank: int) -> list[int]:
        return [s for s, r in enumerate(self.rank_of) if r == pp_rank]


def stages_per_rank(schedule: str, virtual: int) -> int:
    if virtual:
        return virtual
    return 1 if schedule == "1F1B" else 2


def layer_counts(n_layers: int, n_stages: int, given: Sequence[int] = ()) -> list[int]:
    """Layers per stage: `given`, or as even as possible with the remainder on the earlier stages (the
    last stage also runs the head and the MTP block(s))."""
    if given:
        counts = list(given)
        if len(counts) != n_stages:
            raise ConfigError(f"parallel.pp_layers has {len(counts)} entries but there are {n_stages} stages")
        if any(not isinstance(c, int) or c < 0 for c in counts) or sum(counts) != n_layers:
            raise ConfigError(f"parallel.pp_layers={counts} must be counts >= 0 adding up to "
                              f"num_hidden_layers={n_layers}")
        return counts
    base, extra = divmod(n_layers, n_stages)
    return [base + (1 if s < extra else 0) for s in range(n_stages)]


def make_plan(n_layers: int, pp: int, schedule: str, virtual: int = 0, given: Sequence[int] = ()) -> StagePlan:
    v = stages_per_rank(schedule, virtual)
    S = pp * v
    counts = layer_counts(n_layers, S, given)
    for s in range(1, S - 1):
        if counts[s] == 0:
            raise ConfigError(f"pipeline stage {s} of {S} would hold no decoder layer (parallel.pp_layers={counts})")
    starts = [sum(counts[:s]) for s in range(S)]
    layers = tuple(tuple(range(starts[s], starts[s] + counts[s])) for s in range(S))
    if schedule in V_SHAPED:
        rank_of = tuple(s if s < pp else 2 * pp - 1 - s for s in range(S))
    else:
        rank_of = tuple(s % pp for s in range(S))
    return StagePlan(pp, schedule, layers, rank_of)


def check_config(run_cfg) -> None:
    """The checks that need no process group: schedule name, stages per rank, layer plan. One-line errors."""
    par = run_cfg.parallel
    if par.pp < 1:
        raise ConfigError(f"parallel.pp must be >= 1, got {par.pp}")
    if par.pp_schedule not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule must be one of {tuple(SCHEDULES)}, got {par.pp_schedule!r}")
    if par.pp_microbatches < 0 or par.pp_virtual_stages < 0:
        raise ConfigError("parallel.pp_microbatches and parallel.pp_virtual_stages must be >= 0")
    v = stages_per_rank(par.pp_schedule, par.pp_virtual_stages)
    if par.pp_schedule == "1F1B" and v != 1:
        raise ConfigError(f"parallel.pp_schedule=1F1B runs one stage per rank; got pp_virtual_stages={v} "
                          "(use Interleaved1F1B)")
    if par.pp_schedule in V_SHAPED and v != 2:
        raise ConfigError(f"parallel.pp_schedule={par.pp_schedule} is V-shaped and needs exactly 2 stages per rank, "
                          f"got pp_virtual_stages={v}")
    if par.pp_schedule == "Interleaved1F1B" and v < 2:
        raise ConfigError("parallel.pp_schedule=Interleaved1F1B needs pp_virtual_stages >= 2")
    cfg = run_cfg.model_config()
    make_plan(cfg.num_hidden_layers, par.pp, par.pp_schedule, par.pp_virtual_stages, par.pp_layers)


def microbatches(run_cfg, world: int) -> tuple[int, str]:
    """How many micro-batches each data-parallel rank's batch is cut into, and a note when that is not what
    train.micro_batch_size alone would give. parallel.pp_microbatches wins when set; otherwise the count of
    train.micro_batch_size, raised to the schedule's minimum when it is below it."""
    par, t = run_cfg.parallel, run_cfg.train
    pp = par.pp
    if world % pp:
        raise ConfigError(f"parallel.pp={pp} must divide the number of processes ({world}); "
                          f"start {pp} x N processes with torchrun --nproc_per_node")
    dp = world // pp
    if dp % par.ep:
        raise ConfigError(f"parallel.ep={par.ep} must divide the data-parallel ranks of a stage "
                          f"(world {world} / pp {pp} = {dp})")
    if t.batch_size % dp:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by the data-parallel degree "
                          f"world / pp = {dp}")
    per_rank = t.batch_size // dp
    S = pp * stages_per_rank(par.pp_schedule, par.pp_virtual_stages)
    need = {"1F1B": pp, "DualPipeV": S}.get(par.pp_schedule, 1)
    by_micro = per_rank // t.micro_batch_size if t.micro_batch_size else 0
    n = par.pp_microbatches
    if not n:
        n = max(by_micro, need)
        while per_rank % n and n < per_rank:
            n += 1
    if per_rank % n:
        raise ConfigError(f"the per-rank batch ({t.batch_size} / {dp} = {per_rank}) must split into "
                          f"parallel.pp_microbatches={n} equal micro-batches")
    if n < need:
        raise ConfigError(f"parallel.pp_schedule={par.pp_schedule} needs at least {need} micro-batches per step, "
                          f"got {n} (raise parallel.pp_microbatches or train.batch_size)")
    if par.pp_schedule == "Interleaved1F1B" and n % max(1, n // pp):
        raise ConfigError(f"Interleaved1F1B needs the micro-batches ({n}) to be a multiple of "
                          f"max(1, {n} // pp) = {max(1, n // pp)}")
    note = ""
    if by_micro and n != by_micro:
        note = (f"pipeline: {n} micro-batches of {per_rank // n} per data-parallel rank (train.micro_batch_size="
                f"{t.micro_batch_size} would give {by_micro}; " +
                ("parallel.pp_microbatches is set)" if par.pp_microbatches else
                 f"{par.pp_schedule} needs at least {need})"))
    return n, note
