"""A few training steps of the tiny model on fixed data, under torchrun or in one process.

Used by tests/test_parallel.py: `torchrun --nproc_per_node 2 tests/parallel_worker.py --ep 2 --out F` and
`python tests/parallel_worker.py --out F` must report the same losses. Each step: forward_train on this
rank's rows of the global batch, backward, global grad clip, AdamW, then the aux-loss-free bias update
from all-reduced expert loads (V3 section 2.1.2). Rank 0 writes a JSON report and the gathered state, with the
full gradients of the first step (after clipping) under "grad/<name>".

--redundant N adds N expert replicas per MoE layer (EPLB, re-placed every --rebalance-every steps from the
measured loads, weights and AdamW moments moved along); --bf16 runs under bf16 autocast, and under torchrun
FSDP2 then all-gathers bf16 parameters (MixedPrecisionPolicy: fp32 reduce, fp32 master weights).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from types import SimpleNamespace

import torch

from nanoseek.config import preset
from nanoseek.model import Transformer
from nanoseek.train import parallel as par


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--no-fsdp", action="store_true", help="replicate instead of sharding (parallel.fsdp=false)")
    ap.add_argument("--redundant", type=int, default=0, help="parallel.redundant_experts")
    ap.add_argument("--rebalance-every", type=int, default=0, help="parallel.eplb_interval")
    ap.add_argument("--bf16", action="store_true", help="train.dtype=bf16: autocast, FSDP2 mixed precision")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    dist = par.init_distributed()
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    if args.fp8:
        from nanoseek.train.fp8 import enable_fp8
        enable_fp8(model, SimpleNamespace(enabled=True))
    run_cfg = SimpleNamespace(parallel=SimpleNamespace(ep=args.ep, fsdp=not args.no_fsdp, redundant_experts=args.redundant,
                                                       eplb_interval=args.rebalance_every),
                              train=SimpleNamespace(dtype="bf16" if args.bf16 else "fp32"))
    par.parallelize(model, run_cfg, dist)
    compute_dtypes = set()  # the dtype of a projection's weight as its forward runs (FSDP2 unshards it then)
    probe = next(m for m in model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    hooks = [probe.register_forward_pre_hook(lambda mod, inputs: compute_dtypes.add(str(mod.weight.dtype)))]
    router_dtypes = set()  # the routers stay fp32 under FSDP2 mixed precision
    hooks += [m.gate.register_forward_pre_hook(lambda mod, inputs: router_dtypes.add(str(mod.weight.dtype)))
              for m in model.moe_layers()]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1234)
    rows = args.batch // dist.world
    V = model.config.vocab_size
    report: dict = {"loss": [], "mtp_loss": [], "grad_norm": [], "world": dist.world, "ep": dist.ep,
                    "rebalances": 0, "received": []}
    replicas = dist.replicas if dist.world > 1 else None
    first_grads: dict = {}
    model.train()
    amp = torch.autocast(dist.device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    for step in range(args.steps):
        data = torch.randint(0, V, (args.batch, args.seq + 1), generator=gen)
        mine = data[dist.rank * rows:(dist.rank + 1) * rows].to(dist.device)
        with amp:
            out = model.forward_train(mine[:, :-1], mine[:, 1:], mtp_weight=0.3, aux_alpha=1e-4)
        out.loss.backward()
        norm = par.clip_grad_norm(model, 1.0, dist)
        if step == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            first_grads = {f"grad/{n}": par._gather(n, g, dist).detach().cpu().clone() if dist.world > 1 else
                           g.detach().clone() for n, g in grads.items()}
            report["grad_dtypes"] = sorted({str(g.dtype) for g in grads.values()})
            report["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
        loads = []
        with torch.no_grad():
            for moe in model.moe_layers():
                load = par.all_reduce_sum(moe.load.clone(), dist)
                moe.gate.e_score_correction_bias += 1e-3 * torch.sign(load.mean() - load)
                loads.append(load)
        report["received"].append(sum(m.last_received for m in model.moe_layers()
                                      if isinstance(m, par.ExpertParallelMoE)))
        if replicas is not None:
            replicas.observe(torch.stack(loads))
            if replicas.due(step + 1):
                replicas.rebalance(model, opt, dist)
                report["rebalances"] += 1
        model.reset_load()
        report["loss"].append(par.all_reduce_mean(out.lm_loss.detach().clone(), dist).item())
        report["mtp_loss"].append(par.all_reduce_mean(out.mtp_loss.detach().clone(), dist).item())
        report["grad_norm"].append(norm.item())
    # The balancing bias must stay identical on every rank.
    bias = torch.cat([m.gate.e_score_correction_bias for m in model.moe_layers()])
    spread = par.all_reduce_sum((bias - par.all_reduce_mean(bias.clone(), dist)).abs().sum(), dist)
    report["bias_spread"] = spread.item()
    for h in hooks:
        h.remove()
    report["compute_dtypes"], report["router_dtypes"] = sorted(compute_dtypes), sorted(router_dtypes)
    policy = getattr(getattr(model.layers[0], "_get_fsdp_state", lambda: None)(), "_mp_policy", None)
    report["fsdp_reduce_dtype"] = str(policy.reduce_dtype) if policy is not None else None
    if replicas is not None:
        from nanoseek.train.expert_replicas import replica_divergence

        report["replica_divergence"] = replica_divergence(replicas, dist)
        report["replicated_experts"] = int((replicas.placement.logcnt > 1).sum())
        report["phy2log"] = replicas.placement.phy2log.tolist()
        # Rows each physical slot computed in the last forward, over the EP group: a hot expert's replicas
        # must all have served tokens, evenly (round-robin: within one row per source rank).
        spread, least = 0, None
        for layer, moe in enumerate(model.moe_layers()):
            parts = [torch.empty_like(moe.last_slot_counts) for _ in range(dist.ep)]
            torch.distributed.all_gather(parts, moe.last_slot_counts.contiguous(), group=dist.ep_group)
            per_slot = torch.cat(parts)
            for e in torch.nonzero(replicas.placement.logcnt[layer] > 1).flatten().tolist():
                c = per_slot[[p for p in replicas.placement.log2phy[layer, e].tolist() if p >= 0]]
                spread, least = max(spread, int(c.max() - c.min())), min(least or 10**9, int(c.min()))
        report["replica_token_spread"], report["replica_min_tokens"] = spread, least
    state, optim = par.gather_full_state(model, opt, dist)
    # Round trip: scramble parameters and moments, load the gathered state back, gather again.
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
            for v in opt.state[p].values():
                v.zero_()
    main = par.is_main(dist)
    par.load_full_state(model, opt, state if main else {}, optim if main else {}, dist)
    again, optim_again = par.gather_full_state(model, opt, dist)
    if main:
        report["roundtrip_max_diff"] = max((a[k].float() - b[k].float()).abs().max().item()
                                           for a, b in ((state, again), (optim, optim_again)) for k in a)
        report["optim_keys"] = len(optim)
        report["state_shapes"] = {k: list(v.shape) for k, v in state.items()}
        torch.save({**state, **first_grads}, args.out + ".pt")
        with open(args.out, "w") as f:
            json.dump(report, f)
    par.destroy(dist)


if __name__ == "__main__":
    main()
