"""The estimate of one layout: memory per GPU, step time, GPU-hours per trillion tokens (formulas and
their sources: the nanoseek.plan docstring)."""

from __future__ import annotations

import dataclasses

from nanoseek.accounting import training_flops_per_token
from nanoseek.config import ModelConfig
from nanoseek.plan.blocks import Piece, chunks_per_rank, pieces, split_layers, stage_rank
from nanoseek.plan.specs import (PRECISIONS, RECOMPUTE, SCHEDULES, Assumptions, Cluster, GiB, Layout, PlanError,
                                 Precision)


def _in_flight(schedule: str | None, pp: int, r: int, v: int, m: int) -> float:
    """Micro-batches whose activations rank r holds at its peak, in units of the rank's whole share."""
    if schedule is None:
        n = 1.0
    elif schedule == "1F1B":
        n = pp - r
    elif schedule == "Interleaved1F1B":
        n = ((pp - r - 1) * 2 + (v - 1) * pp + 1) / v
    elif schedule == "ZBVZeroBubble":
        n = pp
    else:  # DualPipeV
        n = pp + 0.5
    return min(float(m), n)


def _bubble(schedule: str | None, pp: int, v: int, F: float, B: float, W: float) -> float:
    if schedule is None:
        return 0.0
    if schedule == "1F1B":
        return (pp - 1) * (F + B)
    if schedule == "Interleaved1F1B":
        return (pp - 1) * (F + B) / v
    if schedule == "ZBVZeroBubble":
        return (pp - 1) * max(0.0, F + B - 3 * W) / 2
    return (pp - 1) * ((F + B) + B - 3 * W) / 2  # DualPipeV, F&B = F + B


def _validate(cfg: ModelConfig, cl: Cluster, lay: Layout) -> tuple[int, int, str | None, int]:
    """(dp, micro-batches per step, schedule, chunks per rank) or a PlanError naming the problem."""
    E = cfg.n_routed_experts
    if lay.tp != 1:
        raise PlanError("tensor parallelism is not modelled (V3 used none): use --tp 1")
    if lay.pp < 1 or lay.ep < 1:
        raise PlanError(f"--pp and --ep must be >= 1, got pp={lay.pp}, ep={lay.ep}")
    if E == 0 and lay.ep > 1:
        raise PlanError(f"ep={lay.ep} but the model has no routed experts")
    if E and E % lay.ep:
        raise PlanError(f"ep={lay.ep} must divide n_routed_experts={E}")
    if cl.gpus % (lay.pp * lay.ep):
        raise PlanError(f"pp x ep = {lay.pp * lay.ep} must divide --gpus {cl.gpus}")
    dp = cl.gpus // (lay.pp * lay.ep)
    if lay.dp is not None and lay.dp != dp:
        raise PlanError(f"pp x ep x dp = {lay.pp * lay.ep * lay.dp} != --gpus {cl.gpus}")
    g = cl.gpus_per_node
    if (lay.ep <= g and g % lay.ep) or (lay.ep > g and lay.ep % g):
        raise PlanError(f"an EP group of {lay.ep} GPUs must fill whole nodes of {g} or divide one")
    schedule = lay.schedule
    if schedule is not None and schedule not in SCHEDULES:
        raise PlanError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if lay.pp == 1 and schedule is not None:
        raise PlanError(f"--schedule {schedule} needs --pp > 1")
    if lay.pp > 1 and schedule is None:
        schedule = "1F1B"
    if lay.recompute not in RECOMPUTE:
        raise PlanError(f"--recompute must be one of {', '.join(RECOMPUTE)}, got {lay.recompute!r}")
    if lay.zero not in (1, 2, 3):
        raise PlanError(f"--zero must be 1, 2 or 3, got {lay.zero}")
    if min(lay.micro_batch, lay.global_batch, lay.seq_len) <= 0:
        raise PlanError("--micro-batch, --global-batch and --seq-len must be positive")
    if lay.virtual_stages < 2 and schedule == "Interleaved1F1B":
        raise PlanError("Interleaved1F1B needs --virtual-stages >= 2")
    stage_gpus = lay.ep * dp
    if lay.global_batch % (stage_gpus * lay.micro_batch):
        raise PlanError(f"--global-batch {lay.global_batch} is not a multiple of data-parallel ranks x micro-batch "
                        f"= {stage_gpus} x {lay.micro_batch}")
    m = lay.global_batch // (stage_gpus * lay.micro_batch)
    if schedule in ("1F1B", "Interleaved1F1B", "ZBVZeroBubble") and m < lay.pp:
        raise PlanError(f"{schedule} needs at least pp={lay.pp} micro-batches per step, got {m}")
    if schedule == "DualPipeV" and m < 2 * lay.pp:
        raise PlanError(f"DualPipeV needs at least 2 x pp = {2 * lay.pp} micro-batches per step, got {m}")
    if schedule == "Interleaved1F1B" and m % max(1, m // lay.pp):
        raise PlanError(f"Interleaved1F1B needs the {m} micro-batches to be a multiple of the rounds ({m // lay.pp})")
    return dp, m, schedule, chunks_per_rank(schedule, lay.virtual_stages)


def _node_fanout(cfg: ModelConfig, ep_nodes: int, a: Assumptions) -> int:
    """Nodes a token's routed experts span at most (V3: M = topk_group = 4 of the 8 nodes)."""
    if a.node_fanout > 0:
        return min(a.node_fanout, ep_nodes)
    limit = cfg.num_experts_per_tok
    if cfg.n_group > 1 and cfg.n_group % ep_nodes == 0:  # whole groups per node: node-limited routing
        limit = min(limit, cfg.topk_group)
    return min(limit, ep_nodes)


def _ring(nbytes: float, n: int) -> float:
    return nbytes * (n - 1) / n if n > 1 else 0.0


# ----------------------------------------------------------------------------- the estimate
def estimate(cfg: ModelConfig, cl: Cluster, lay: Layout, a: Assumptions = Assumptions(),
             prec: Precision = PRECISIONS["v3"]) -> dict:
    """Memory per GPU, step time and GPU-hours per trillion tokens of one layout (see the module docstring)."""
    dp, m, schedule, v = _validate(cfg, cl, lay)
    pp, ep, g, mode = lay.pp, lay.ep, cl.gpus_per_node, lay.recompute
    layers, emb, head, mtp = pieces(cfg, lay.seq_len, prec)
    S = pp * v
    ranks_of = [stage_rank(s, pp, schedule) for s in range(S)]
    speed = cl.peak_flops * cl.mfu

    def cost(p: Piece) -> float:  # seconds-proportional work of a piece per token: forward, backward, recompute
        return p.fwd_flops * (1 + a.backward_to_forward) + p.recompute_flops[mode]

    extras = [0.0] * S
    extras[0] += cost(emb)
    extras[-1] += cost(head) + sum(cost(p) for p in mtp)
    if lay.stage_layers is not None:
        counts = list(lay.stage_layers)
        if len(counts) != S or sum(counts) != len(layers) or min(counts) < 0:
            raise PlanError(f"--stage-layers needs {S} non-negative counts summing to {len(layers)} layers, got {counts}")
    else:
        counts = split_layers([cost(p) for p in layers], extras, ranks_of, pp,
                              may_be_empty=[s in (0, S - 1) for s in range(S)])
    held: list[list[Piece]] = [[] for _ in range(pp)]
    i = 0
    for s, n in enumerate(counts):
        held[ranks_of[s]] += layers[i:i + n]
        i += n
    held[ranks_of[0]].append(emb)
    held[ranks_of[-1]] += [head, *mtp]
    if mtp and ranks_of[0] != ranks_of[-1]:  # MTP needs the embedding where the head is: a synced copy
        held[ranks_of[-1]].append(dataclasses.replace(emb, name="embedding copy for MTP"))

    tokens_mb = lay.micro_batch * lay.seq_len
    n_ne, n_ex = ep * dp, dp  # data-parallel group sizes of non-expert and expert weights
    spans_nodes = ep * dp > g
    dp_bw = cl.spec.network_gbps if spans_nodes else cl.spec.nvlink_gbps
    pp_bw = cl.spec.network_gbps if ep * dp >= g else cl.spec.nvlink_gbps
    ep_nodes = max(1, ep // g)
    K, D = cfg.num_experts_per_tok, cfg.hidden_size
    per_elem = prec.dispatch_bytes + 3 * prec.comm_bytes  # dispatch, combine, and their two gradients
    if ep > 1 and ep_nodes > 1:
        fanout = _node_fanout(cfg, ep_nodes, a)
        net_tok = fanout * (ep_nodes - 1) / ep_nodes * D * per_elem
        nv_tok = K * (g - 1) / g * D * per_elem
    else:
        fanout, net_tok = (1 if ep > 1 else 0), 0.0
        nv_tok = K * (ep - 1) / ep * D * per_elem if ep > 1 else 0.0
    concurrent = 2 if schedule == "DualPipeV" else 1  # micro-batches communicating at once

    rank_rows = []
    for r in range(pp):
        ps = held[r]
        dense = sum(p.dense_params for p in ps)
        expert = sum(p.expert_params for p in ps) / ep
        w_bytes = (dense / (n_ne if lay.zero == 3 else 1) + expert / (n_ex if lay.zero == 3 else 1)) * prec.weight_bytes
        g_bytes = (dense / (n_ne if lay.zero >= 2 else 1) + expert / (n_ex if lay.zero >= 2 else 1)) * prec.grad_bytes
        o_bytes = (dense / n_ne + expert / n_ex) * (prec.master_bytes + 2 * prec.moment_bytes)
        flight = _in_flight(schedule, pp, r, v, m)
        act_mb = tokens_mb * sum(p.act[mode] for p in ps)
        trans = {"logits": 0.0, "moe_dispatch_buffers": 0.0, "recompute_workspace": 0.0, "zero3_gathered_weights": 0.0}
        if head in ps:
            trans["logits"] = tokens_mb * cfg.vocab_size * a.logits_bytes * (2 + len(mtp)) / a.loss_chunks
        n_moe = sum(p.moe for p in ps)
        if ep > 1 and n_moe:
            trans["moe_dispatch_buffers"] = concurrent * tokens_mb * K * D * (prec.dispatch_bytes + prec.comm_bytes) \
                * a.dispatch_headroom
        blocks = [p for p in ps if p.fwd_flops and p is not head]
        if mode == "full" and blocks:
            trans["recompute_workspace"] = tokens_mb * max(p.act["none"] for p in blocks)
        if lay.zero == 3 and blocks:
            trans["zero3_gathered_weights"] = a.zero3_prefetch_layers * prec.weight_bytes * \
                max(p.dense_params + p.expert_params / ep for p in blocks)
        allocated = w_bytes + g_bytes + o_bytes + flight * act_mb + sum(trans.values())
        total = allocated * (1 + a.fragmentation) + a.runtime_reserve_gib * GiB
        fwd = tokens_mb * sum(p.fwd_flops for p in ps) / speed
        rec = tokens_mb * sum(p.recompute_flops[mode] for p in ps) / speed
        rank_rows.append({
            "rank": r, "holds": _describe(ps), "decoder_layers": sum(p.layer for p in ps), "moe_layers": n_moe,
            "params": dense + expert, "memory_gib": total / GiB,
            "memory": {"weights_gib": w_bytes / GiB, "gradients_gib": g_bytes / GiB, "optimizer_gib": o_bytes / GiB,
                       "activations_gib": flight * act_mb / GiB, "in_flight_micro_batches": flight,
                       "activations_per_micro_batch_gib": act_mb / GiB,
                       **{k + "_gib": val / GiB for k, val in trans.items()},
                       "fragmentation_gib": allocated * a.fragmentation / GiB, "runtime_reserve_gib": a.runtime_reserve_gib},
            "forward_s": fwd, "backward_s": a.backward_to_forward * fwd, "recompute_s": rec,
            "ep_network_bytes": tokens_mb * n_moe * net_tok, "ep_nvlink_bytes": tokens_mb * n_moe * nv_tok,
            "dp_params": (dense, expert)})

    work = [x["forward_s"] * (1 + a.backward_to_forward) + x["recompute_s"] for x in rank_rows]
    busiest = max(range(pp), key=work.__getitem__)
    if a.count_stage_imbalance:  # the pipeline runs at its slowest rank
        F, R = rank_rows[busiest]["forward_s"], rank_rows[busiest]["recompute_s"]
    else:  # the MFU is the job's average utilisation: every rank as busy as the mean one
        F, R = (sum(x[k] for x in rank_rows) / pp for k in ("forward_s", "recompute_s"))
    B = a.backward_to_forward * F + R
    W = a.weight_grad_share * a.backward_to_forward * F
    compute = m * (F + B)
    bubble = _bubble(schedule, pp, v, F, B, W)
    ep_time = m * max(max(x["ep_network_bytes"] for x in rank_rows) / (cl.spec.network_gbps * 1e9),
                      max(x["ep_nvlink_bytes"] for x in rank_rows) / (cl.spec.nvlink_gbps * 1e9))
    overlap = a.dualpipev_ep_overlap if schedule == "DualPipeV" else a.other_ep_overlap
    ep_exposed = ep_time - overlap * min(ep_time, compute)
    p2p_bytes = 2 * v * tokens_mb * D * prec.comm_bytes if pp > 1 else 0.0  # per micro-batch, fwd + bwd
    p2p_time = m * p2p_bytes / (pp_bw * 1e9)
    dp_times = []
    for x in rank_rows:
        dense, expert = x.pop("dp_params")
        rs = _ring(dense * prec.grad_bytes, n_ne) + _ring(expert * prec.grad_bytes, n_ex)
        ag = _ring(dense * prec.weight_bytes, n_ne) + _ring(expert * prec.weight_bytes, n_ex)
        rounds = {1: rs + ag, 2: m * rs + ag, 3: m * (rs + 2 * ag)}[lay.zero]
        dp_times.append(rounds / (dp_bw * 1e9))
    dp_time = max(dp_times)
    step = compute + bubble + ep_exposed + (1 - a.pp_p2p_overlap) * p2p_time + (1 - a.dp_overlap) * dp_time
    tokens_step = lay.global_batch * lay.seq_len
    fpt = training_flops_per_token(cfg, lay.seq_len, include_mtp=True)
    worst = max(rank_rows, key=lambda x: x["memory_gib"])
    return {
        "fits": worst["memory_gib"] <= cl.spec.memory_gib,
        "memory_gib_per_gpu": worst["memory_gib"],
        "memory_capacity_gib": cl.spec.memory_gib,
        "gpu_hours_per_trillion_tokens": step * cl.gpus / 3600 * 1e12 / tokens_step,
        "step_time_s": step,
        "tokens_per_step": tokens_step,
        "days_per_trillion_tokens": step * 1e12 / tokens_step / 86400,
        "achieved_mfu": fpt * tokens_step / (step * cl.gpus * cl.peak_flops),
        "cluster": {"gpu": cl.gpu, "gpus": cl.gpus, "gpus_per_node": g, "nodes": max(1, cl.gpus // g),
                    "peak_tflops_bf16": cl.peak_flops / 1e12, "mfu": cl.mfu, **dataclasses.asdict(cl.spec)},
        "layout": {"pp": pp, "ep": ep, "dp": dp, "tp": 1, "schedule": schedule or "none", "chunks_per_rank": v,
                   "stages": S, "stage_layers": counts, "micro_batch": lay.micro_batch, "micro_batches": m,
                   "global_batch": lay.global_batch, "seq_len": lay.seq_len, "recompute": mode, "zero": lay.zero,
                   "ep_nodes": ep_nodes, "node_fanout": fanout},
        "memory": {"rank": worst["rank"], **worst["memory"]},
        "time": {"compute_s": compute, "bubble_s": bubble, "busiest_rank": busiest,
                 "stage_imbalance": work[busiest] / (sum(work) / pp), "stage_imbalance_counted": a.count_stage_imbalance,
                 "forward_per_micro_batch_s": F, "backward_per_micro_batch_s": B,
                 "ep_all_to_all_s": ep_time, "ep_exposed_s": ep_exposed, "ep_overlap": overlap,
                 "ep_network_gb_per_micro_batch": max(x["ep_network_bytes"] for x in rank_rows) / 1e9,
                 "ep_nvlink_gb_per_micro_batch": max(x["ep_nvlink_bytes"] for x in rank_rows) / 1e9,
                 "pp_p2p_s": p2p_time, "pp_p2p_exposed_s": (1 - a.pp_p2p_overlap) * p2p_time,
                 "dp_collectives_s": dp_time, "dp_exposed_s": (1 - a.dp_overlap) * dp_time,
                 "dp_over": "network" if spans_nodes else "nvlink"},
        "flops_per_token": fpt,
        "ranks": [{k: val for k, val in x.items() if not k.startswith("ep_")} for x in rank_rows],
        "assumptions": dataclasses.asdict(a), "precision": dataclasses.asdict(prec),
    }


def _describe(ps: list[Piece]) -> str:
    n = sum(p.layer for p in ps)
    rest = [p.name for p in ps if not p.layer]
    return ", ".join(([f"{n} decoder layers"] if n else []) + rest)
