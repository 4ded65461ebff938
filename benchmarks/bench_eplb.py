"""EPLB: max / mean routed tokens per EP rank, before (contiguous experts, one copy each) and after EPLB.

Two kinds of load, each measured both on the loads EPLB was fitted on ("fit") and on a second,
independent batch of the same traffic ("held-out": the placement is planned from past counts and
serves future ones, as in deployment):

  zipf   DeepSeek-V3's MoE shape (256 routed experts in 8 groups, top-8, 8 GPUs per node) with Zipf-like
         expert popularity (expert of rank r gets p ~ 1/r^s, a random permutation per layer), token
         counts drawn from a multinomial; EP 8/16/32/64, 0/1/2/4 redundant slots per rank, hierarchical
         (one node per 8 ranks) and global policy.
  train  real routing counts of a model trained by `nanoseek train` (the `small` preset: 16 experts in
         4 groups, top-2), counted on held-out built-in text; once as trained (auxiliary-loss-free
         balancing on) and once trained with balancing off (moe.bias_update_speed=0, no sequence aux loss).

  dispatch  the real expert-parallel dispatcher (nanoseek.train.parallel.ExpertParallelMoE) under torchrun
         (gloo, --dispatch-ranks processes): one MoE layer of 32 experts, top-4, whose routing is skewed by
         a Zipf-like bias; the placement is fitted on one batch of routed tokens and the rows each rank's
         experts compute are counted on the next batch, without replicas and with 1, 2, 4 redundant
         experts per rank. The outputs with replicas are compared with those without (max |difference|).

The ratio is per MoE layer, then averaged over layers (each layer waits for its busiest rank). Writes
benchmarks/results/eplb.json.

    .venv/bin/python -m benchmarks.bench_eplb            # the two 50-step training runs: 6-17 min each on 2 busy cores
    .venv/bin/python -m benchmarks.bench_eplb --no-train # the synthetic and dispatcher parts only, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_result
from nanoseek.train.eplb import contiguous_placement, imbalance, rebalance

ROOT = Path(__file__).resolve().parents[1]


def _ratio(placement, loads_LE) -> float:
    return float(imbalance(placement.rank_loads(loads_LE)).mean())


def sweep(fit_LE: torch.Tensor, held_LE: torch.Tensor, eps: list[int], per_rank: list[int], groups: int,
          gpus_per_node: int) -> list[dict]:
    """One row per (EP size, redundancy, policy): max/mean per rank without and with EPLB."""
    L, E = fit_LE.shape
    rows = []
    for ep in eps:
        if E % ep:
            continue
        naive = contiguous_placement(L, E, ep)
        nodes = max(1, ep // gpus_per_node)
        policies = {"hierarchical": nodes, "global": 1} if groups % nodes == 0 and nodes > 1 else {"global": 1}
        for r in per_rank:
            for policy, n in policies.items():
                plan = rebalance(fit_LE, ep, r * ep, num_groups=groups if n > 1 else 1, num_nodes=n)
                rows.append({"ep": ep, "nodes": nodes if policy == "hierarchical" else 1, "policy": policy,
                             "redundant_per_rank": r, "redundant_experts": r * ep,
                             "before_fit": _ratio(naive, fit_LE), "after_fit": _ratio(plan, fit_LE),
                             "before_held_out": _ratio(naive, held_LE), "after_held_out": _ratio(plan, held_LE)})
    return rows


def zipf_loads(layers: int, experts: int, s: float, assignments: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) token counts [layers, experts] drawn from the same Zipf-like popularity."""
    g = torch.Generator().manual_seed(seed)
    rank_LE = torch.argsort(torch.rand(layers, experts, generator=g), dim=-1) + 1
    p_LE = 1.0 / rank_LE.double() ** s
    p_LE /= p_LE.sum(-1, keepdim=True)

    def draw():
        return torch.stack([torch.bincount(torch.multinomial(p, assignments, replacement=True, generator=g),
                                           minlength=experts) for p in p_LE]).float()

    return draw(), draw()


# ----------------------------------------------------------------------------- through the dispatcher
def dispatch_worker(out: str, tokens: int, seed: int, zipf: float, per_rank: list[int]) -> None:
    """One rank of the dispatcher measurement (run under torchrun by dispatch(); see the module docstring)."""
    import copy

    import torch.distributed as tdist

    from nanoseek.config import preset
    from nanoseek.model.moe import MoE
    from nanoseek.train import parallel as par
    from nanoseek.train.expert_replicas import ExpertReplicas

    torch.set_num_threads(1)
    dist = par.init_distributed()
    ep, rank = dist.world, dist.rank
    cfg = preset("tiny").replace(n_routed_experts=32, num_experts_per_tok=4, n_group=1, topk_group=1)
    torch.manual_seed(seed)  # the same weights and skew on every rank
    base = MoE(cfg)
    for p in base.parameters():
        torch.nn.init.normal_(p, std=cfg.hidden_size ** -0.5)
    # Zipf-like popularity through the balancing bias: expert of popularity rank r gets +0.1 * log(1 / r^s).
    pop = torch.randperm(cfg.n_routed_experts) + 1
    base.gate.e_score_correction_bias.copy_(-0.1 * zipf * pop.float().log())
    g = torch.Generator().manual_seed(seed + 1 + rank)  # each rank routes its own tokens
    fit_x, held_x = (torch.randn(1, tokens, cfg.hidden_size, generator=g) for _ in range(2))

    def layer(redundant: int, loads=None) -> MoE:
        moe = copy.deepcopy(base)
        reps = None
        if redundant:
            reps = ExpertReplicas([moe], {}, ep, rank, redundant, 0, dist.device)
            reps.set_placement(rebalance(loads, ep, redundant))
        par.shard_experts([moe], None, ep, rank, reps)
        return moe.eval()

    with torch.no_grad():
        plain = layer(0)
        plain.train()  # count the fit batch's loads
        plain(fit_x)
        loads = plain.load.clone()
        tdist.all_reduce(loads)
        plain.eval()
        ref, _ = plain(held_x)
        rows = []
        for r in per_rank:
            moe = layer(r * ep, loads.unsqueeze(0)) if r else plain
            y, _ = moe(held_x) if r else (ref, None)
            received = torch.tensor([float(moe.last_received)])
            every = [torch.zeros(1) for _ in range(ep)]
            tdist.all_gather(every, received)
            diff = torch.tensor([float((y - ref).abs().max())])
            tdist.all_reduce(diff, op=tdist.ReduceOp.MAX)
            per = [float(t) for t in every]
            rows.append({"redundant_per_rank": r, "redundant_experts": r * ep, "rows_per_rank": per,
                         "max_over_mean": max(per) / (sum(per) / ep), "max_abs_output_diff": float(diff)})
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": ep, "experts": cfg.n_routed_experts, "top_k": cfg.num_experts_per_tok,
                                         "tokens_per_rank": tokens, "zipf": zipf,
                                         "expert_load_max_over_mean": float(loads.max() / loads.mean()),
                                         "rows": rows}))
    par.destroy(dist)


def dispatch(ranks: int, tokens: int, seed: int, zipf: float) -> dict:
    """Run dispatch_worker under torchrun (gloo) and return rank 0's result."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dispatch.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
               "127.0.0.1", "--master_port", str(port), "-m", "benchmarks.bench_eplb", "--dispatch-worker", str(out),
               "--dispatch-tokens", str(tokens), "--seed", str(seed), "--dispatch-zipf", str(zipf)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------- real counts
def train_small(out: Path, steps: int, balanced: bool, extra: list[str]) -> tuple[Path, bool]:
    """`nanoseek train` (the public CLI, in a subprocess) of configs/small.toml for `steps` steps; a finished
    run already in `out` (from an earlier `--work DIR`) is reused. Returns (final model, whether reused)."""
    done = out / "final" / "config.json"
    if done.exists() and json.loads((out / "run_config.json").read_text())["train"]["steps"] == steps:
        return out / "final", True
    sets = [f"train.steps={steps}", "train.save_every=0", f"train.log_every={max(1, steps // 5)}", *extra]
    if not balanced:
        sets += ["moe.bias_update_speed=0", "moe.seq_aux_alpha=0"]
    cmd = [sys.executable, "-m", "nanoseek.cli", "train", "--config", str(ROOT / "configs" / "small.toml"),
           "--out", str(out), "--no-progress"] + [a for s in sets for a in ("--set", s)]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return out / "final", False


@torch.no_grad()
def routed_counts(final: Path, n_docs: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert routed assignments [MoE layers, E] of the trained model on built-in documents it did not
    train on (another corpus seed), split into two halves: (fit, held-out)."""
    import nanoseek
    from nanoseek.data import builtin_corpus, load_tokenizer

    model = nanoseek.load(final)
    tok = load_tokenizer(final)
    ids = [t for doc in builtin_corpus(n_docs, seed=seed) for t in tok.encode(doc)]
    n = len(ids) // seq_len
    batch = torch.tensor(ids[:n * seq_len]).view(n, seq_len)
    moes = model.moe_layers(include_mtp=False)
    E = moes[0].cfg.n_routed_experts
    halves = [torch.zeros(len(moes), E), torch.zeros(len(moes), E)]
    current = [0]

    def counter(i):
        def hook(module, inputs, output) -> None:  # the router returns (gate weights, expert ids, scores)
            halves[current[0]][i] += torch.bincount(output[1].flatten(), minlength=E).float()
        return hook

    hooks = [m.gate.register_forward_hook(counter(i)) for i, m in enumerate(moes)]
    for b in range(0, n, 8):
        current[0] = 0 if b < n // 2 else 1
        model(batch[b:b + 8])
    for h in hooks:
        h.remove()
    return halves[0], halves[1]


def _summary(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'EP':>4} {'nodes':>5} {'policy':>12} {'red/rank':>8} {'before':>8} {'after':>8} "
          f"{'held-out before':>16} {'after':>8}")
    for r in rows:
        print(f"{r['ep']:>4} {r['nodes']:>5} {r['policy']:>12} {r['redundant_per_rank']:>8} {r['before_fit']:>8.3f} "
              f"{r['after_fit']:>8.3f} {r['before_held_out']:>16.3f} {r['after_held_out']:>8.3f}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16, help="MoE layers in the synthetic V3-shaped load")
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per layer in each synthetic batch (x top-8)")
    ap.add_argument("--zipf", type=float, action="append", help="Zipf exponents (default 0.6 and 1.0)")
    ap.add_argument("--steps", type=int, default=50, help="training steps of each `nanoseek train` run")
    ap.add_argument("--eval-docs", type=int, default=400, help="held-out built-in documents for the real counts")
    ap.add_argument("--no-train", action="store_true", help="skip the two training runs (synthetic loads only)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="extra `nanoseek train` overrides for both runs, after train.batch_size=8")
    ap.add_argument("--work", help="keep the training runs in this folder and reuse finished ones (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dispatch-ranks", type=int, default=4, help="torchrun processes of the dispatcher part (0 = skip)")
    ap.add_argument("--dispatch-tokens", type=int, default=4096, help="tokens per rank and batch in the dispatcher part")
    ap.add_argument("--dispatch-zipf", type=float, default=1.0, help="skew of the dispatcher part's routing bias")
    ap.add_argument("--dispatch-worker", metavar="OUT", help=argparse.SUPPRESS)  # one torchrun rank of it
    args = ap.parse_args(argv)
    if args.dispatch_worker:
        dispatch_worker(args.dispatch_worker, args.dispatch_tokens, args.seed, args.dispatch_zipf, [0, 1, 2, 4])
        return {}
    args.sets = ["train.batch_size=8", *args.sets]
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    result: dict = {"benchmark": "eplb", "metric": "max / mean routed tokens per EP rank, mean over MoE layers",
                    "zipf": [], "train": []}
    V3_EXPERTS, V3_GROUPS, V3_TOPK, GPUS_PER_NODE = 256, 8, 8, 8
    for s in args.zipf or [0.6, 1.0]:
        fit, held = zipf_loads(args.layers, V3_EXPERTS, s, args.tokens * V3_TOPK, args.seed)
        rows = sweep(fit, held, [8, 16, 32, 64], [0, 1, 2, 4], V3_GROUPS, GPUS_PER_NODE)
        result["zipf"].append({"s": s, "layers": args.layers, "experts": V3_EXPERTS, "groups": V3_GROUPS,
                               "gpus_per_node": GPUS_PER_NODE, "assignments_per_layer": args.tokens * V3_TOPK,
                               "rows": rows})
        _summary(rows, f"Zipf s={s}: {V3_EXPERTS} experts in {V3_GROUPS} groups, {args.layers} layers")

    if args.dispatch_ranks:
        d = dispatch(args.dispatch_ranks, args.dispatch_tokens, args.seed, args.dispatch_zipf)
        result["dispatch"] = d
        print(f"\ndispatcher under torchrun: {d['ranks']} ranks, {d['experts']} experts top-{d['top_k']}, "
              f"expert load max/mean {d['expert_load_max_over_mean']:.2f}")
        for r in d["rows"]:
            print(f"  {r['redundant_per_rank']} redundant per rank: rows per rank {[int(x) for x in r['rows_per_rank']]}, "
                  f"max/mean {r['max_over_mean']:.3f}, max |output diff| {r['max_abs_output_diff']:.1e}")
    if not args.no_train:
        with tempfile.TemporaryDirectory() as scratch:
            tmp = args.work or scratch
            for balanced in (True, False):
                t = time.perf_counter()
                run_dir = Path(tmp) / ("balanced" if balanced else "unbalanced")
                final, reused = train_small(run_dir, args.steps, balanced, args.sets)
                fit, held = routed_counts(final, args.eval_docs, seq_len=128, seed=args.seed + 1000)
                # 16 experts in 4 groups: EP 2/4/8/16, two ranks per "node" so the hierarchical policy runs.
                rows = sweep(fit, held, [2, 4, 8, 16], [0, 1, 2], groups=4, gpus_per_node=2)
                name = "aux-loss-free balancing on" if balanced else "balancing off"
                result["train"].append({"run": name, "preset": "small", "steps": args.steps, "overrides": args.sets,
                                        "assignments_per_layer": float(fit.sum(-1).mean()),
                                        "expert_load_max_over_mean": float((fit.amax(-1) / fit.mean(-1)).mean()),
                                        "seconds": round(time.perf_counter() - t, 1), "reused_run": reused,
                                        "rows": rows})
                _summary(rows, f"`nanoseek train` small, {args.steps} steps, {name}")
    path = write_result("eplb", result)
    print(f"\n-> {path}")
    return result


if __name__ == "__main__":
    main()
