"""The `nanoseek plan` command: argument parsing, the plan table, the search table, one-line errors.

    nanoseek plan --preset deepseek-v3 --gpu H800 --gpus 2048 --gpus-per-node 8 --pp 16 --ep 64 \\
        --schedule DualPipeV --zero 1 [--json]
    nanoseek plan --preset deepseek-v3 --gpu H100 --gpus 512 --gpus-per-node 8 --search
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from nanoseek.accounting import add_model_arguments, error, human, model_from_args
from nanoseek.config import ConfigError
from nanoseek.mfu import GPU_PEAKS
from nanoseek.plan.estimate import estimate
from nanoseek.plan.search import search
from nanoseek.plan.specs import (PRECISIONS, RECOMPUTE, SCHEDULES, V3_GLOBAL_BATCH, V3_SEQ_LEN, Assumptions, Layout,
                                 PlanError, make_cluster)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    c = parser.add_argument_group("cluster")
    c.add_argument("--gpu", required=True, metavar="KIND", help=f"one of: {', '.join(GPU_PEAKS)}")
    c.add_argument("--gpus", type=int, required=True, metavar="N", help="GPUs in the cluster")
    c.add_argument("--gpus-per-node", type=int, required=True, metavar="N", help="GPUs per node (NVLink domain)")
    c.add_argument("--nvlink-gbps", type=float, metavar="GB/s", help="intra-node bandwidth per GPU and direction, "
                   "in gigaBYTES/s (default: the GPU's)")
    c.add_argument("--network-gbps", type=float, metavar="GB/s", help="inter-node bandwidth per GPU and direction, "
                   "in gigaBYTES/s (default: the GPU's)")
    c.add_argument("--memory-gib", type=float, metavar="GiB", help="memory per GPU (default: the GPU's)")
    c.add_argument("--mfu", type=float, help="model FLOPs utilization while computing (default: the one V3's "
                   "published cost implies, as `nanoseek cost` derives it, about 40%%)")
    g = parser.add_argument_group("layout")
    g.add_argument("--pp", type=int, help="pipeline-parallel degree (required unless --search)")
    g.add_argument("--ep", type=int, help="expert-parallel degree (required unless --search)")
    g.add_argument("--dp", type=int, help="expert data-parallel degree (default: gpus / (pp x ep); checked if given)")
    g.add_argument("--tp", type=int, default=1, help="tensor parallelism: only 1 is modelled")
    g.add_argument("--schedule", choices=SCHEDULES, help="pipeline schedule (default 1F1B when pp > 1)")
    g.add_argument("--virtual-stages", type=int, default=2, metavar="V", help="Interleaved1F1B chunks per rank (default 2)")
    g.add_argument("--stage-layers", metavar="N,N,...", help="decoder layers per stage (default: balanced by FLOPs)")
    g.add_argument("--micro-batch", type=int, default=1, metavar="SEQS", help="sequences per micro-batch per "
                   "data-parallel rank (default 1)")
    g.add_argument("--global-batch", type=int, default=V3_GLOBAL_BATCH, metavar="SEQS",
                   help=f"sequences per step (default {V3_GLOBAL_BATCH}, V3's)")
    g.add_argument("--seq-len", type=int, default=V3_SEQ_LEN, help=f"sequence length (default {V3_SEQ_LEN})")
    g.add_argument("--recompute", choices=RECOMPUTE, help="activation recomputation (default selective: V3's)")
    g.add_argument("--zero", type=int, choices=(1, 2, 3), help="ZeRO stage of the data parallelism (default 1)")
    g.add_argument("--precision", choices=sorted(PRECISIONS), default="v3",
                   help="byte sizes of weights/grads/optimizer/activations (default v3: DeepSeek-V3's FP8 recipe)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                        help="override one assumption or precision field, e.g. --set fragmentation=0.1 (repeatable)")
    parser.add_argument("--search", action="store_true",
                        help="rank every layout that fits (the layout options given stay fixed)")
    parser.add_argument("--top", type=int, default=10, help="layouts --search prints (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _coerce(name: str, text: str, current):
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {name}: expected true or false, got {text!r}")
    try:
        value = type(current)(text)
    except ValueError:
        raise ValueError(f"--set {name}: expected a {type(current).__name__}, got {text!r}") from None
    if value < 0:
        raise ValueError(f"--set {name}: must be >= 0, got {text!r}")
    return value


def apply_sets(sets: list[str], a: Assumptions, prec):
    """--set NAME=VALUE onto the Assumptions or the Precision (whichever has the field)."""
    a_fields = {f.name for f in dataclasses.fields(a)}
    p_fields = {f.name for f in dataclasses.fields(prec)} - {"name"}
    for item in sets:
        name, eq, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not eq:
            raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
        if name in a_fields:
            a = dataclasses.replace(a, **{name: _coerce(name, text.strip(), getattr(a, name))})
        elif name in p_fields:
            prec = dataclasses.replace(prec, **{name: _coerce(name, text.strip(), getattr(prec, name))})
        else:
            raise ValueError(f"--set: unknown name {name!r}; assumptions: {', '.join(sorted(a_fields))}; "
                             f"precision: {', '.join(sorted(p_fields))}")
    if a.loss_chunks < 1 or a.zero3_prefetch_layers < 1:
        raise ValueError("loss_chunks and zero3_prefetch_layers must be >= 1")
    return a, prec


def _stage_layers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"--stage-layers expects comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    try:
        name, cfg = model_from_args(args)
    except ConfigError as e:
        return error("plan", str(e))
    try:
        a, prec = apply_sets(args.sets, Assumptions(), PRECISIONS[args.precision])
        cl = make_cluster(args.gpu, args.gpus, args.gpus_per_node, args.mfu, args.nvlink_gbps, args.network_gbps,
                          args.memory_gib)
        base = Layout(pp=args.pp or 1, ep=args.ep or 1, dp=args.dp, schedule=args.schedule,
                      virtual_stages=args.virtual_stages, micro_batch=args.micro_batch, global_batch=args.global_batch,
                      seq_len=args.seq_len, recompute=args.recompute or "selective", zero=args.zero or 1,
                      stage_layers=_stage_layers(args.stage_layers), tp=args.tp)
        if args.search:
            if args.top < 1:
                raise ValueError("--top must be >= 1")
            if args.stage_layers is not None or args.dp is not None:
                raise ValueError("--search picks pp, ep and dp itself: --stage-layers and --dp apply to one layout")
            out = search(cfg, cl, base, a, prec, args.top, pp=args.pp, ep=args.ep, schedule=args.schedule,
                         recompute=args.recompute, zero=args.zero)
        else:
            if args.pp is None or args.ep is None:
                raise ValueError("--pp and --ep are required (or --search to enumerate layouts)")
            out = estimate(cfg, cl, base, a, prec)
    except ValueError as e:  # PlanError included
        return error("plan", str(e))
    out = {"model": name, **out}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(format_search(out) if args.search else format_plan(out))
    return 0


# ----------------------------------------------------------------------------- tables
def _hours(x: float) -> str:
    return human(x) if x >= 1000 else f"{x:.3g}"


def _layout_line(p: dict) -> str:
    lay = p["layout"]
    sched = "" if lay["schedule"] == "none" else f" ({lay['schedule']}, {lay['chunks_per_rank']} chunk(s)/rank)"
    return (f"PP{lay['pp']}{sched} x EP{lay['ep']} x DP{lay['dp']}, ZeRO-{lay['zero']}, recompute {lay['recompute']}, "
            f"{lay['micro_batches']} micro-batches of {lay['micro_batch']} x {lay['seq_len']} tokens")


def format_plan(p: dict) -> str:
    cl, mem, t, lay = p["cluster"], p["memory"], p["time"], p["layout"]
    lines = [f"model    {p['model']} on {cl['gpus']:,} x {cl['gpu']} ({cl['memory_gib']:g} GiB, {cl['gpus_per_node']} per "
             f"node; NVLink {cl['nvlink_gbps']:g} GB/s, network {cl['network_gbps']:g} GB/s), MFU {cl['mfu']:.1%}",
             f"layout   {_layout_line(p)}",
             f"stages   decoder layers per stage: {','.join(map(str, lay['stage_layers']))}",
             f"memory   busiest GPU (pipeline rank {mem['rank']}): {p['memory_gib_per_gpu']:.1f} of "
             f"{p['memory_capacity_gib']:g} GiB -> {'fits' if p['fits'] else 'does NOT fit'}"]
    rows = [("weights", mem["weights_gib"], ""), ("gradients", mem["gradients_gib"], ""),
            ("optimizer state", mem["optimizer_gib"], ""),
            ("activations", mem["activations_gib"], f"{mem['in_flight_micro_batches']:g} micro-batches in flight x "
                                                    f"{mem['activations_per_micro_batch_gib']:.2f} GiB"),
            ("logits", mem["logits_gib"], ""), ("MoE dispatch buffers", mem["moe_dispatch_buffers_gib"], ""),
            ("recompute workspace", mem["recompute_workspace_gib"], ""),
            ("ZeRO-3 gathered weights", mem["zero3_gathered_weights_gib"], ""),
            ("fragmentation", mem["fragmentation_gib"], ""), ("runtime reserve", mem["runtime_reserve_gib"], "")]
    lines += [f"  {k:<24}{v:>8.2f} GiB  {note}".rstrip() for k, v, note in rows[:4] + [r for r in rows[4:] if r[1]]]
    lines.append("  per rank " + ", ".join(f"{r['rank']}: {r['memory_gib']:.1f}" for r in p["ranks"]))
    imb = "counted" if t["stage_imbalance_counted"] else "not counted, --set count_stage_imbalance=true"
    busiest = f"busiest rank {t['busiest_rank']} does {t['stage_imbalance']:.2f}x the mean ({imb})"
    trows = [("compute", t["compute_s"], busiest),
             ("pipeline bubble", t["bubble_s"], ""),
             ("EP all-to-all", t["ep_exposed_s"], f"exposed of {t['ep_all_to_all_s']:.2f} s; per micro-batch and GPU "
                                                  f"{t['ep_network_gb_per_micro_batch']:.2f} GB network, "
                                                  f"{t['ep_nvlink_gb_per_micro_batch']:.2f} GB NVLink"),
             ("pipeline p2p", t["pp_p2p_exposed_s"], f"exposed of {t['pp_p2p_s']:.2f} s"),
             ("DP collectives", t["dp_exposed_s"], f"exposed of {t['dp_collectives_s']:.2f} s over {t['dp_over']}"),
             ("step", p["step_time_s"], f"{human(p['tokens_per_step'])} tokens")]
    lines.append("time per step")
    lines += [f"  {k:<24}{v:>8.2f} s    {note}".rstrip() for k, v, note in trows]
    lines.append(f"GPU-hours per 1T tokens   {_hours(p['gpu_hours_per_trillion_tokens'])}  "
                 f"({p['days_per_trillion_tokens']:.1f} days per 1T tokens; achieved MFU {p['achieved_mfu']:.1%})")
    return "\n".join(lines)


def format_search(s: dict) -> str:
    head = (f"{s['evaluated']} layouts tried, {s['invalid']} impossible, {s['fitting']} fit; "
            f"the {len(s['results'])} cheapest:")
    if not s["results"]:
        return head.replace("; the 0 cheapest:", ": none fits (try more GPUs, --recompute full or --zero 3)")
    rows = [("pp", "ep", "dp", "schedule", "recompute", "zero", "GiB/GPU", "GPU-h/1T", "step s", "MFU")]
    for p in s["results"]:
        lay = p["layout"]
        rows.append((str(lay["pp"]), str(lay["ep"]), str(lay["dp"]), lay["schedule"], lay["recompute"], str(lay["zero"]),
                     f"{p['memory_gib_per_gpu']:.1f}", _hours(p["gpu_hours_per_trillion_tokens"]),
                     f"{p['step_time_s']:.2f}", f"{p['achieved_mfu']:.1%}"))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join([head] + ["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows])
