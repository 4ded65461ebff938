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

EXPERT_PARAMS = ("experts.gate_up_proj", "experts.down_proj")


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


def destroy(dist: Dist) -> None:
    if tdist.is_initialized():
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
    the gate values. parallelize() swaps a plain MoE's class to this one and sets ep_group, ep and n_local;
    the router, the shared experts and the balance loss are those of MoE."""

    ep_group: object
    ep: int
    n_local: int

    def routed_experts(self, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        ep, El = self.ep, self.n_local
        K = idx_NK.shape[1]
        # Sorting by global expert id also groups the assignments by destination rank (rank r owns
        # experts [r*El, (r+1)*El)); the stable sort keeps token order inside an expert, as MoE does.
        order_M = idx_NK.flatten().argsort(stable=True)
        token_M = order_M // K
        counts_RE = self.count(idx_NK).view(ep, El)  # over the global experts; feeds the balancer's load
        recv_counts_RE = torch.empty_like(counts_RE)  # [source rank, my local expert]
        tdist.all_to_all_single(recv_counts_RE, counts_RE.contiguous(), group=self.ep_group)
        send = counts_RE.sum(1).tolist()
        recv = recv_counts_RE.sum(1).tolist()
        x_recv = _AllToAll.apply(x_ND[token_M], send, recv, self.ep_group, float(ep))
        # Received rows are ordered (source rank, local expert); the experts want them by local expert.
        local_e = torch.repeat_interleave(torch.arange(El, device=x_ND.device).repeat(ep),
                                          recv_counts_RE.flatten(), output_size=x_recv.shape[0])
        perm = local_e.argsort(stable=True)
        y_sorted = self.experts(x_recv[perm], recv_counts_RE.sum(0))
        y_recv = y_sorted[perm.argsort()]
        y_MD = _AllToAll.apply(y_recv, recv, send, self.ep_group, 1.0 / ep)
        y_MD = y_MD * w_NK.flatten()[order_M, None].to(y_MD.dtype)
        return torch.zeros_like(x_ND, dtype=y_MD.dtype).index_add_(0, token_M, y_MD).to(x_ND.dtype)


def shard_experts(moes: list[MoE], group, ep: int, ep_rank: int) -> None:
    """Keep this rank's E/ep routed experts of each MoE layer (slice ep_rank) and send every (token, expert)
    assignment to the rank that owns the expert (an all-to-all over `group`). Used by parallelize() and by
    the pipeline stages (nanoseek.train.pipeline), whose EP group lies inside one stage."""
    for moe in moes:
        ex = moe.experts
        El = ex.n_experts // ep
        sl = slice(ep_rank * El, (ep_rank + 1) * El)
        # Shard in place: the module keeps its class (and any FP8 wrapping) and its state-dict names.
        ex.gate_up_proj = nn.Parameter(ex.gate_up_proj.detach()[sl].clone())
        ex.down_proj = nn.Parameter(ex.down_proj.detach()[sl].clone())
        ex.n_experts = El
        moe.__class__ = ExpertParallelMoE
        moe.ep_group, moe.ep, moe.n_local = group, ep, El


def _parallel_options(run_cfg) -> tuple[int, bool]:
    par = getattr(run_cfg, "parallel", None)
    ep = getattr(par, "ep", 1)
    fsdp = getattr(par, "fsdp", True)
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ValueError(f"parallel.ep must be a positive integer, got {ep!r}")
    return ep, bool(fsdp)


def parallelize(model: Transformer, run_cfg, dist: Dist) -> Transformer:
    """Shard the experts over EP groups of run_cfg.parallel.ep ranks and apply FSDP2 over the ranks
    (parallel.fsdp=false replicates instead of sharding: FSDP2 on a [world, 1] mesh, i.e. plain DDP).

    Call it once, on a model initialised identically on every rank (same seed), after enable_fp8 if
    FP8 is wanted. Fills dist.ep, dist.ep_rank, dist.ep_group and dist.mesh. Returns the model (same object).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    ep, shard = _parallel_options(run_cfg)
    cfg = model.config
    moes = model.moe_layers()
    if dist.world % ep:
        raise ValueError(f"parallel.ep={ep} must divide the number of processes ({dist.world})")
    if ep > 1 and not moes:
        raise ValueError(f"parallel.ep={ep} but the model has no MoE layer to shard")
    if ep > 1 and cfg.n_routed_experts % ep:
        raise ValueError(f"parallel.ep={ep} must divide n_routed_experts={cfg.n_routed_experts}")
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

    ignored: set[nn.Parameter] = set()
    if ep > 1:
        shard_experts(moes, dist.ep_group, ep, dist.ep_rank)
        for moe in moes:
            if dist.world // ep > 1:
                fully_shard(moe.experts, mesh=exp_mesh)
            else:  # each expert lives on exactly one rank: nothing to shard or average
                ignored.update(moe.experts.parameters())
    ign = ignored or None
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, ignored_params=ign)
    for mod in model.mtp:
        # The MTP module's norms and projection run outside its forward() (combine, shared_head): they
        # stay with the root; its attention and feed-forward are sharded units of their own.
        fully_shard(mod.self_attn, mesh=dp_mesh, ignored_params=ign)
        fully_shard(mod.mlp, mesh=dp_mesh, ignored_params=ign)
    fully_shard(model, mesh=dp_mesh, ignored_params=ign)
    # FSDP2 gathers the root's parameters (embedding, head, final norm) around forward() only; the
    # training and cached entry points need the same hooks.
    for method in ("forward_train", "forward_cached", "mtp_forward_cached"):
        register_fsdp_forward_method(model, method)
    return model


# ----------------------------------------------------------------------------- full state for checkpoints
def _is_expert_key(name: str) -> bool:
    return name.endswith(EXPERT_PARAMS)


def _gather(name: str, t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The full tensor behind a local shard: FSDP DTensors all-gathered, expert shards concatenated."""
    from torch.distributed.tensor import DTensor

    full = t.full_tensor() if isinstance(t, DTensor) else t
    if dist.ep > 1 and _is_expert_key(name) and full.dim() > 0:
        parts = [torch.empty_like(full) for _ in range(dist.ep)]
        tdist.all_gather(parts, full.contiguous(), group=dist.ep_group)
        full = torch.cat(parts, dim=0)
    return full


def _full_shape(name: str, t: torch.Tensor, dist: Dist) -> list[int]:
    shape = list(t.shape)  # a DTensor reports its global shape
    if dist.ep > 1 and _is_expert_key(name) and shape:
        shape[0] *= dist.ep
    return shape


def _scatter(name: str, full: torch.Tensor, like: torch.Tensor, dist: Dist) -> torch.Tensor:
    """This rank's piece of a full tensor, laid out like `like` (DTensor shard or expert slice)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if dist.ep > 1 and _is_expert_key(name) and full.dim() > 0:
        n = full.shape[0] // dist.ep
        full = full[dist.ep_rank * n:(dist.ep_rank + 1) * n]
    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return full.to(like.dtype)


def _broadcast_full(name: str, like: torch.Tensor, full: torch.Tensor | None, dist: Dist) -> torch.Tensor:
    shape = _full_shape(name, like, dist)
    if full is None:
        full = torch.empty(shape, dtype=like.dtype, device=dist.device)
    else:
        if list(full.shape) != shape:
            raise ValueError(f"{name}: checkpoint shape {list(full.shape)} != model shape {shape}")
        full = full.to(device=dist.device, dtype=like.dtype).contiguous()
    if dist.world > 1:
        tdist.broadcast(full, src=0)
    return full


@torch.no_grad()
def _gather_model(model: nn.Module, dist: Dist, rank0_only: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        full = _gather(name, t, dist)
        if dist.rank == 0 or not rank0_only:
            out[name] = full.detach().cpu().contiguous().clone()
    return out


@torch.no_grad()
def _gather_optimizer(model: nn.Module, opt: torch.optim.Optimizer, dist: Dist,
                      rank0_only: bool) -> dict[str, torch.Tensor]:
    """AdamW state keyed `{kind}/{param name}` (nanoseek.train.optim's flat layout), full tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        for kind, v in sorted(opt.state.get(p, {}).items()):
            if not isinstance(v, torch.Tensor):
                continue
            full = _gather(name, v, dist)
            if dist.rank == 0 or not rank0_only:
                out[f"{kind}/{name}"] = full.detach().cpu().contiguous().clone()
    return out


def gather_full_state(model: Transformer, *args, rank0_only: bool = True):
    """Full (unsharded, experts reassembled in global order, CPU) state for checkpoints and export.

    gather_full_state(model, dist) -> model state dict;
    gather_full_state(model, opt, dist) -> (model state dict, optimizer state keyed `{kind}/{param}`).
    Collective: every rank must call it; other ranks get empty dicts when rank0_only.
    """
    if len(args) == 1 and isinstance(args[0], Dist):
        return _gather_model(model, args[0], rank0_only)
    if len(args) == 2 and isinstance(args[1], Dist):
        opt, dist = args
        return _gather_model(model, dist, rank0_only), _gather_optimizer(model, opt, dist, rank0_only)
    raise TypeError("gather_full_state(model, dist) or gather_full_state(model, opt, dist)")


@torch.no_grad()
def _load_model(model: nn.Module, state: dict[str, torch.Tensor], dist: Dist) -> None:
    from torch.distributed.tensor import DTensor

    own = model.state_dict()
    have = dist.rank == 0 or bool(state)
    if have:
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in own.items():
        full = _broadcast_full(name, t, state[name] if have else None, dist)
        piece = _scatter(name, full, t, dist)
        (t.to_local() if isinstance(t, DTensor) else t).copy_(
            piece.to_local() if isinstance(piece, DTensor) else piece)


@torch.no_grad()
def _load_optimizer(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, torch.Tensor],
                    dist: Dist) -> None:
    keys = [sorted(state)] if dist.rank == 0 else [None]
    if dist.world > 1:
        tdist.broadcast_object_list(keys, src=0)  # just the key names, between our own processes
    params = dict(model.named_parameters())
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key in keys[0]:
        kind, _, name = key.partition("/")
        if name not in params:
            raise ValueError(f"optimizer state for unknown parameter {name!r}")
        p = params[name]
        ref = p if kind != "step" else torch.zeros((), dtype=torch.float32)
        have = dist.rank == 0 or bool(state)
        src = state[key] if have else None
        if kind == "step":  # a scalar counter, kept on the CPU in fp32 as AdamW keeps it
            full = src.to(torch.float32).clone() if have else torch.zeros((), dtype=torch.float32)
            if dist.world > 1:
                full = full.to(dist.device)
                tdist.broadcast(full, src=0)
            by_param.setdefault(name, {})[kind] = full.cpu()
            continue
        full = _broadcast_full(name, ref, src, dist)
        by_param.setdefault(name, {})[kind] = _scatter(name, full, ref, dist)
    for name, st in by_param.items():
        opt.state[params[name]] = st


def load_full_state(model: Transformer, *args) -> None:
    """Inverse of gather_full_state: load full state into a parallelized model. Collective.

    load_full_state(model, state, dist) or load_full_state(model, opt, state, optim_state, dist).
    Rank 0 must hold the full state; other ranks may pass {} (tensors are broadcast from rank 0).
    """
    if len(args) == 2 and isinstance(args[1], Dist):
        _load_model(model, args[0], args[1])
        return
    if len(args) == 4 and isinstance(args[3], Dist):
        opt, state, optim_state, dist = args
        _load_model(model, state, dist)
        _load_optimizer(model, opt, optim_state, dist)
        return
    raise TypeError("load_full_state(model, state, dist) or load_full_state(model, opt, state, optim_state, dist)")


def clip_grad_norm(model: nn.Module, max_norm: float, dist: Dist,
                   replicas: dict[int, int] | None = None) -> torch.Tensor:
    """Clip the global gradient norm to max_norm; returns the norm before clipping (a plain scalar tensor,
    equal on every rank). torch.nn.utils.clip_grad_norm_ cannot mix FSDP DTensors with the plain expert
    shards and would miss the other EP ranks' experts. Here each rank sums the squares of its local
    shards, divided by how many ranks hold a replica of that shard, and the sums are all-reduced.
    `replicas` maps id(parameter) -> how many ranks hold an identical plain copy of it (a pipeline's
    weights shared between stages); 1 otherwise."""
    from torch.distributed.tensor import DTensor, Replicate

    grads, sqs = [], []
    for p in model.parameters():
        g = p.grad
        if g is None:
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
