"""Distributed training: process setup, expert parallelism (all-to-all dispatch) and FSDP2 data parallelism.

Follows the V3 report section 3.2 in spirit, on PyTorch's own engine and at the scale of this project:
  * expert parallelism (EP): the routed experts of every MoE layer are split over an EP group of `ep`
    ranks; each rank keeps E/ep of them as a local GroupedExperts. Tokens go to the rank that owns their
    expert with one all-to-all (uneven splits), are computed there, and come back with a second one;
  * data parallelism with FSDP2 `fully_shard`: the non-expert parameters are sharded over all ranks;
    the expert parameters are sharded over the remaining "expert data-parallel" dimension world/ep.
    The report uses ZeRO-1 instead; its 16-way pipeline parallelism is nanoseek.train.pipeline, which
    builds on the pieces here (shard_experts, clip_grad_norm, the state gathering).

Rank layout: a [world/ep, ep] mesh with the EP dimension innermost, so an EP group is made of
neighbouring ranks (the GPUs of one node on a real cluster, where the all-to-all is cheapest).

Gradient scaling. Every rank's loss is the mean over its own rows of the global batch, and FSDP averages
gradients over ranks, so non-expert gradients are those of the global mean loss. An expert's gradient,
though, receives the contributions of the whole EP group's losses through the all-to-all backward; the
combine all-to-all therefore scales its backward by 1/ep (and the dispatch all-to-all by ep, so that the
gradient reaching the tokens is unchanged). With the expert data-parallel average over world/ep ranks,
the expert gradients come out as those of the global mean loss too: one process and N processes take
the same optimizer steps, up to float rounding.

Everything that touches the EP all-to-all is collective: every rank of an EP group must run the same
number of forwards (evaluate on all ranks, not on rank 0 alone).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from ..model import Transformer
from ..model.moe import MoE

from .full_state import EXPERT_PARAMS, _gather, _scatter, gather_full_state, load_full_state  # noqa: F401


@dataclass
class Dist:
    """Where this process stands. world=1 and no process group when not started by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    ep: int = 1                 # expert-parallel degree, set by parallelize()
    ep_rank: int = 0            # rank inside the EP group = which slice of the experts this rank owns
    ep_group: object | None = None   # ProcessGroup of the EP group (None when ep == 1)
    mesh: object | None = None       # DeviceMesh [world/ep, ep] with dims ("dp_exp", "ep")
    replicas: object | None = None   # nanoseek.train.expert_replicas.ExpertReplicas (parallel.redundant_experts)

    @property
    def distributed(self) -> bool:
        return self.world > 1 or tdist.is_initialized()


def init_distributed() -> Dist:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group:
    NCCL with one GPU per process when CUDA is available, gloo on CPU otherwise."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise RuntimeError(f"torchrun environment variables are not integers: {e}") from e
    if cuda:
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device, backend=backend)


def is_main(dist: Dist) -> bool:
    return dist.rank == 0


def barrier(dist: Dist) -> None:
    if tdist.is_initialized():
        tdist.barrier()


def destroy(dist: Dist | None = None) -> None:
    """Tear the process group down (every rank, at exit and on error paths: NCCL warns and may hang when a
    process exits with its group alive). Safe to call twice or without a group."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place; returns it (a no-op in a single process)."""
    if tdist.is_initialized() and dist.world > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Mean of `tensor` over all ranks, in place (e.g. each rank's loss on its rows -> the global loss)."""
    return all_reduce_sum(tensor, dist).div_(dist.world) if dist.world > 1 else tensor


# ----------------------------------------------------------------------------- expert parallelism
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits whose backward is the reverse all-to-all times grad_scale."""

    @staticmethod
    def forward(ctx, x, send_splits: list[int], recv_splits: list[int], group, grad_scale: float):
        ctx.splits, ctx.group, ctx.grad_scale = (send_splits, recv_splits), group, grad_scale
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        tdist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        send_splits, recv_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(send_splits), *grad_out.shape[1:]))
        tdist.all_to_all_single(grad_in, grad_out.contiguous(), send_splits, recv_splits, group=ctx.group)
        if ctx.grad_scale != 1.0:
            grad_in = grad_in * ctx.grad_scale
        return grad_in, None, None, None, None


class ExpertParallelMoE(MoE):
    """MoE whose routed experts are split over an EP group: each (token, expert) assignment is sent to the
    rank owning the expert, the local experts run there, and the outputs come back to be combined with
    the gate values. parallelize() swaps a plain MoE's class to this one and sets ep_group, ep and n_local
    (the expert slots per rank); the router, the shared experts and the balance loss are those of MoE.

    With redundant experts (`replicas`, nanoseek.train.expert_replicas) the slots are physical: a hot
    expert has copies on several ranks and its assignments are split over them; the routing and the
    loads counted for the balancer stay logical."""

    ep_group: object
    ep: int
    n_local: int
    replicas = None        # ExpertReplicas shared by the model's MoE layers, or None (one copy per expert)
    layer_index = 0        # this layer's row in the placement
    last_received = 0      # (token, expert) rows this rank's experts computed in the last forward
    last_slot_counts = None  # [n_local] of those rows per local slot (a device tensor)

    def routed_experts(self, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        ep, S = self.ep, self.n_local
        K = idx_NK.shape[1]
        counts_E = self.count(idx_NK)  # over the logical experts; feeds the balancer's load
        if self.replicas is None:
            slot_NK, counts_RS = idx_NK, counts_E.view(ep, S)
        else:
            slot_NK = self.replicas.physical_ids(self.layer_index, idx_NK)
            counts_RS = torch.bincount(slot_NK.flatten(), minlength=ep * S).view(ep, S)
        # Sorting by slot id also groups the assignments by destination rank (rank r holds slots
        # [r*S, (r+1)*S)); the stable sort keeps token order inside a slot, as MoE does.
        order_M = slot_NK.flatten().argsort(stable=True)
        token_M = order_M // K
        recv_counts_RS = torch.empty_like(counts_RS)  # [source rank, my local slot], on the tokens' device
        tdist.all_to_all_single(recv_counts_RS, counts_RS.contiguous(), group=self.ep_group)
        send = counts_RS.sum(1).tolist()
        recv = recv_counts_RS.sum(1).tolist()
        x_recv = _AllToAll.apply(x_ND[token_M], send, recv, self.ep_group, float(ep))
        self.last_received, self.last_slot_counts = x_recv.shape[0], recv_counts_RS.sum(0)
        # Received rows are ordered (source rank, local slot); the experts want them by local slot.
        local_e = torch.repeat_interleave(torch.arange(S, device=x_ND.device).repeat(ep),
                                          recv_counts_RS.flatten(), output_size=x_recv.shape[0])
        perm = local_e.argsort(stable=True)
        y_sorted = self.experts(x_recv[perm], recv_counts_RS.sum(0))
        y_recv = y_sorted[perm.argsort()]
        y_MD = _AllToAll.apply(y_recv, recv, send, self.ep_group, 1.0 / ep)
        y_MD = y_MD * w_NK.flatten()[order_M, None].to(y_MD.dtype)
        return torch.zeros_like(x_ND, dtype=y_MD.dtype).index_add_(0, token_M, y_MD).to(x_ND.dtype)


def shard_experts(moes: list[MoE], group, ep: int, ep_rank: int, replicas=None) -> None:
    """Keep this rank's E/ep routed experts of each MoE layer (slice ep_rank) and send every (token, expert)
    assignment to the rank that owns the expert (an all-to-all over `group`). Used by parallelize() and by
    the pipeline stages (nanoseek.train.pipeline), whose EP group lies inside one stage. With `replicas`
    (an ExpertReplicas over these layers) the rank keeps the weights of its physical slots instead."""
    for layer, moe in enumerate(moes):
        ex = moe.experts
        if replicas is None:
            El = ex.n_experts // ep
            keep = torch.arange(ep_rank * El, (ep_rank + 1) * El, device=ex.gate_up_proj.device)
        else:
            keep = replicas.local_experts(layer).to(ex.gate_up_proj.device)
        # Shard in place: the module keeps its class (and any FP8 wrapping) and its state-dict names.
        ex.gate_up_proj = nn.Parameter(ex.gate_up_proj.detach().index_select(0, keep).clone())
        ex.down_proj = nn.Parameter(ex.down_proj.detach().index_select(0, keep).clone())
        ex.n_experts = keep.numel()
        moe.__class__ = ExpertParallelMoE
        moe.ep_group, moe.ep, moe.n_local = group, ep, keep.numel()
        moe.replicas, moe.layer_index = replicas, layer


def _parallel_options(run_cfg) -> tuple[int, bool, int, int]:
    par = getattr(run_cfg, "parallel", None)
    ep = getattr(par, "ep", 1)
    fsdp = getattr(par, "fsdp", True)
    redundant, interval = getattr(par, "redundant_experts", 0), getattr(par, "eplb_interval", 0)
    for key, v, low in (("ep", ep, 1), ("redundant_experts", redundant, 0), ("eplb_interval", interval, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"parallel.{key} must be an integer >= {low}, got {v!r}")
    return ep, bool(fsdp), redundant, interval


def mixed_precision_policies(param_dtype: torch.dtype | None):
    """FSDP2 MixedPrecisionPolicy for the model and for the routers, or (None, None) in fp32.

    bf16 runs (train.dtype = "bf16", or "auto" on CUDA) all-gather the parameters in bf16 and compute in
    bf16, reduce-scatter the gradients in fp32, and keep fp32 sharded parameters (the master weights that
    AdamW updates), the V3 report's recipe (section 3.3) without FP8. The routers stay fp32 throughout
    (nanoseek.model.moe: tiny score differences flip the top-k): they get a policy of their own."""
    if param_dtype is None or param_dtype == torch.float32:
        return None, None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
            MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False))


def _param_dtype(run_cfg, dist: Dist) -> torch.dtype | None:
    from nanoseek.device import autocast_dtype

    return autocast_dtype(getattr(getattr(run_cfg, "train", None), "dtype", "fp32"), dist.device)


def parallelize(model: Transformer, run_cfg, dist: Dist, param_dtype: torch.dtype | None | str = "auto") -> Transformer:
    """Shard the experts over EP groups of run_cfg.parallel.ep ranks and apply FSDP2 over the ranks
    (parallel.fsdp=false replicates instead of sharding: FSDP2 on a [world, 1] mesh, i.e. plain DDP).
    parallel.redundant_experts > 0 adds that many expert replicas per MoE layer over the EP group, placed by
    EPLB (nanoseek.train.expert_replicas); parallel.eplb_interval is read by the training loop.
    `param_dtype` is FSDP2's compute dtype (mixed_precision_policies); "auto" = bf16 when run_cfg.train.dtype
    resolves to bf16 on dist.device, else fp32.

    Call it once, on a model initialised identically on every rank (same seed), after enable_fp8 if
    FP8 is wanted. Fills dist.ep, dist.ep_rank, dist.ep_group, dist.mesh and dist.replicas. Returns the model
    (same object).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    ep, shard, redundant, interval = _parallel_options(run_cfg)
    cfg = model.config
    moes = model.moe_layers()
    if dist.world % ep:
        raise ValueError(f"parallel.ep={ep} must divide the number of processes ({dist.world})")
    if ep > 1 and not moes:
        raise ValueError(f"parallel.ep={ep} but the model has no MoE layer to shard")
    if ep > 1 and cfg.n_routed_experts % ep:
        raise ValueError(f"parallel.ep={ep} must divide n_routed_experts={cfg.n_routed_experts}")
    if redundant and (ep == 1 or redundant % ep):
        raise ValueError(f"parallel.redundant_experts={redundant} needs parallel.ep > 1 and must be a multiple of "
                         f"it (every rank holds as many expert slots), got ep={ep}")
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("parallelize() was already applied to this model")
    if ep > 1 and any(type(m) is not MoE for m in moes):
        kinds = sorted({type(m).__name__ for m in moes} - {"MoE"})
        raise ValueError(f"parallel.ep={ep} needs the plain MoE modules, got {kinds} (nanoseek.infer.fast.restore "
                         "undoes the CPU decode transform)")
    model.to(dist.device)
    dist.ep = ep
    if dist.world == 1:
        return model

    from torch.distributed.device_mesh import init_device_mesh

    dev = dist.device.type
    # A trailing size-1 "shard" dimension turns FSDP2 into pure replication (HSDP with one shard).
    mesh = init_device_mesh(dev, (dist.world // ep, ep, 1), mesh_dim_names=("dp_exp", "ep", "one"))
    dp_mesh = init_device_mesh(dev, (dist.world,), mesh_dim_names=("dp",)) if shard else \
        init_device_mesh(dev, (dist.world, 1), mesh_dim_names=("dp", "one"))
    exp_mesh = mesh["dp_exp"] if shard else mesh["dp_exp", "one"]
    dist.mesh = mesh
    dist.ep_rank = mesh.get_local_rank("ep")
    dist.ep_group = mesh.get_group("ep") if ep > 1 else None

    if redundant:
        from nanoseek.train.expert_replicas import ExpertReplicas

        where = {id(m): name for name, m in model.named_modules()}
        names = {f"{where[id(moe)]}.experts.{w}": layer for layer, moe in enumerate(moes)
                 for w in ("gate_up_proj", "down_proj")}
        # The replicas' gradients are summed over every rank: replicas of an expert sit on different EP
        # ranks and, with an expert data-parallel dimension, their rows on different FSDP shards.
        dist.replicas = ExpertReplicas(moes, names, ep, dist.ep_rank, redundant, interval, dist.device)

    mp, router_mp = mixed_precision_policies(_param_dtype(run_cfg, dist) if param_dtype == "auto" else param_dtype)
    mpk = {"mp_policy": mp} if mp is not None else {}
    ignored: set[nn.Parameter] = set()
    if ep > 1:
        shard_experts(moes, dist.ep_group, ep, dist.ep_rank, dist.replicas)
        for moe in moes:
            if dist.world // ep > 1:
                fully_shard(moe.experts, mesh=exp_mesh, **mpk)
            else:  # each expert lives on exactly one rank: nothing to shard or average
                ignored.update(moe.experts.parameters())
    ign = ignored or None
    if router_mp is not None:
        for moe in moes:
            fully_shard(moe.gate, mesh=dp_mesh, ignored_params=ign, mp_policy=router_mp)
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, ignored_params=ign, **mpk)
    for mod in model.mtp:
        # The MTP module's norms and projection run outside its forward() (combine, shared_head): they
        # stay with the root; its attention and feed-forward are sharded units of their own.
        fully_shard(mod.self_attn, mesh=dp_mesh, ignored_params=ign, **mpk)
        fully_shard(mod.mlp, mesh=dp_mesh, ignored_params=ign, **mpk)
    fully_shard(model, mesh=dp_mesh, ignored_params=ign, **mpk)
    # FSDP2 gathers the root's parameters (embedding, head, final norm) around forward() only; the
    # training and cached entry points need the same hooks.
    for method in ("forward_train", "forward_cached", "mtp_forward_cached"):
        register_fsdp_forward_method(model, method)
    return model


def clip_grad_norm(model: nn.Module, max_norm: float, dist: Dist,
                   replicas: dict[int, int] | None = None) -> torch.Tensor:
    """Clip the global gradient norm to max_norm; returns the norm before clipping (a plain scalar tensor,
    equal on every rank). torch.nn.utils.clip_grad_norm_ cannot mix FSDP DTensors with the plain expert
    shards and would miss the other EP ranks' experts. Here each rank sums the squares of its local
    shards, divided by how many ranks hold a replica of that shard, and the sums are all-reduced.
    `replicas` maps id(parameter) -> how many ranks hold an identical plain copy of it (a pipeline's
    weights shared between stages); 1 otherwise.

    With redundant experts (dist.replicas) the replicas' gradients are first summed over each expert's
    copies (ExpertReplicas.sync_grads), and the norm counts every logical expert once."""
    from torch.distributed.tensor import DTensor, Replicate

    experts: dict[int, torch.Tensor] = {}
    if getattr(dist, "replicas", None) is not None:
        dist.replicas.sync_grads()
        experts = dist.replicas.weighted_grad_sq()
    grads, sqs = [], []
    for p in model.parameters():
        g = p.grad
        if g is None:
            continue
        if id(p) in experts:
            grads.append(g.to_local() if isinstance(g, DTensor) else g)
            sqs.append(experts[id(p)])
            continue
        copies = (replicas or {}).get(id(p), 1)
        if isinstance(g, DTensor):
            copies = 1
            for size, pl in zip(g.device_mesh.shape, g.placements):
                copies *= size if isinstance(pl, Replicate) else 1
            g = g.to_local()
        grads.append(g)
        sqs.append(g.detach().float().pow(2).sum() / copies)
    if not grads:
        return torch.zeros((), device=dist.device)
    norm = all_reduce_sum(torch.stack(sqs).sum(), dist).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm
