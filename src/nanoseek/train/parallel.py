"""Distributed training: process setup, expert parallelism (all-to-all dispatch) and FSDP2 data parallelism.

Follows the V3 report section 3.2 in spirit, on PyTorch's own engine and at the scale of this project:
  * expert parallelism (EP): the routed experts of every MoE layer are split over an EP group of `ep`
    ranks; each rank keeps E/ep of them as a local GroupedExperts. Tokens go to the rank that owns their
    expert with one all-to-all (uneven splits), are computed there, and come back with a second one;
  * data parallelism with FSDP2 `fully_shard`: the non-expert parameters are sharded over all ranks;
    the expert parameters are sharded over the remaining "expert data-parallel" dimension world/ep.
    The report uses ZeRO-1 and 16-way pipeline parallelism instead; neither is needed at our scale.

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


class ExpertParallelDispatcher:
    """MoE.dispatcher for expert parallelism: send each (token, expert) assignment to the rank owning the
    expert, run the local experts there, send the outputs back and combine them with the gate weights."""

    def __init__(self, group, ep: int, n_local: int):
        self.group, self.ep, self.n_local = group, ep, n_local

    def __call__(self, moe: MoE, x_ND: torch.Tensor, w_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        ep, El = self.ep, self.n_local
        K = idx_NK.shape[1]
        # Sorting by global expert id also groups the assignments by destination rank (rank r owns
        # experts [r*El, (r+1)*El)); the stable sort keeps token order inside an expert, as route_local does.
        order_M = idx_NK.flatten().argsort(stable=True)
        token_M = order_M // K
        counts_RE = torch.bincount(idx_NK.flatten(), minlength=ep * El).view(ep, El)
        recv_counts_RE = torch.empty_like(counts_RE)  # [source rank, my local expert]
        tdist.all_to_all_single(recv_counts_RE, counts_RE.contiguous(), group=self.group)
        send = counts_RE.sum(1).tolist()
        recv = recv_counts_RE.sum(1).tolist()
        x_recv = _AllToAll.apply(x_ND[token_M], send, recv, self.group, float(ep))
        # Received rows are ordered (source rank, local expert); the experts want them by local expert.
        local_e = torch.repeat_interleave(torch.arange(El, device=x_ND.device).repeat(ep),
                                          recv_counts_RE.flatten(), output_size=x_recv.shape[0])
        perm = local_e.argsort(stable=True)
        y_sorted = moe.experts(x_recv[perm], recv_counts_RE.sum(0))
        y_recv = y_sorted[perm.argsort()]
        y_MD = _AllToAll.apply(y_recv, recv, send, self.group, 1.0 / ep)
        y_MD = y_MD * w_NK.flatten()[order_M, None].to(y_MD.dtype)
        return torch.zeros_like(x_ND, dtype=y_MD.dtype).index_add_(0, token_M, y_MD).to(x_ND.dtype)


def _parallel_degree(run_cfg) -> int:
    par = getattr(run_cfg, "parallel", None)
    ep = getattr(par, "ep", 1) if par is not None else 1
    if not isinstance(ep, int) or ep < 1:
        raise ValueError(f"parallel.ep must be a positive integer, got {ep!r}")
    return ep


def _fsdp_modules():
    from torch.distributed.fsdp import FSDPModule, fully_shard
    return FSDPModule, fully_shard


def parallelize(model: Transformer, run_cfg, dist: Dist) -> Transformer:
    """Shard the experts over EP groups of run_cfg.parallel.ep ranks and apply FSDP2 over the ranks.

    Call it once, on a model initialised identically on every rank (same seed), after enable_fp8 if
    FP8 is wanted. Fills dist.ep, dist.ep_rank, dist.ep_group and dist.mesh. Returns the model (same object).
    """
    ep = _parallel_degree(run_cfg)
    cfg = model.config
    moes = model.moe_layers()
    if dist.world % ep:
        raise ValueError(f"parallel.ep={ep} must divide the number of processes ({dist.world})")
    if ep > 1 and not moes:
        raise ValueError(f"parallel.ep={ep} but the model has no MoE layer to shard")
    if ep > 1 and cfg.n_routed_experts % ep:
        raise ValueError(f"parallel.ep={ep} must divide n_routed_experts={cfg.n_routed_experts}")
    FSDPModule, fully_shard = _fsdp_modules()
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("parallelize() was already applied to this model")
    model.to(dist.device)
    dist.ep = ep
    if dist.world == 1:
        return model

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dist.device.type, (dist.world // ep, ep), mesh_dim_names=("dp_exp", "ep"))
    dp_mesh = init_device_mesh(dist.device.type, (dist.world,), mesh_dim_names=("dp",))
    dist.mesh = mesh
    dist.ep_rank = mesh.get_local_rank("ep")
    dist.ep_group = mesh.get_group("ep") if ep > 1 else None

    ignored: set[nn.Parameter] = set()
    if ep > 1:
        El = cfg.n_routed_experts // ep
        sl = slice(dist.ep_rank * El, (dist.ep_rank + 1) * El)
        for moe in moes:
            ex = moe.experts
            # Shard in place: the module keeps its class (and any FP8 wrapping) and its state-dict names.
            ex.gate_up_proj = nn.Parameter(ex.gate_up_proj.detach()[sl].clone())
            ex.down_proj = nn.Parameter(ex.down_proj.detach()[sl].clone())
            ex.n_experts = El
            moe.dispatcher = ExpertParallelDispatcher(dist.ep_group, ep, El)
            if dist.world // ep > 1:
                fully_shard(ex, mesh=mesh["dp_exp"])
            else:  # each expert lives on exactly one rank: nothing to shard or average
                ignored.update(ex.parameters())
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
    from torch.distributed.fsdp import register_fsdp_forward_method
    for method in ("forward_train", "forward_cached", "mtp_forward_cached"):
        register_fsdp_forward_method(model, method)
    return model


def _is_expert_key(name: str) -> bool:
    return name.endswith(EXPERT_PARAMS)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def gather_full_state(model: Transformer, dist: Dist, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The full state dict (unsharded, experts reassembled in global order, on CPU) for checkpoints and
    export. Collective: every rank must call it. Other ranks get {} when rank0_only."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        full = _full(t)
        if dist.ep > 1 and _is_expert_key(name):
            parts = [torch.empty_like(full) for _ in range(dist.ep)]
            tdist.all_gather(parts, full.contiguous(), group=dist.ep_group)
            full = torch.cat(parts, dim=0)
        if dist.rank == 0 or not rank0_only:
            out[name] = full.detach().cpu().clone()
    return out


@torch.no_grad()
def load_full_state(model: Transformer, state: dict[str, torch.Tensor], dist: Dist) -> None:
    """Inverse of gather_full_state: load a full state dict into a parallelized model. Collective. Rank 0
    must hold the state; other ranks may pass {} (the tensors are broadcast from rank 0)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = model.state_dict()
    if dist.rank == 0 or state:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in own.items():
        shape = list(t.shape)
        if dist.ep > 1 and _is_expert_key(name):
            shape[0] *= dist.ep
        if dist.rank == 0 or state:
            full = state[name].to(device=dist.device, dtype=t.dtype)
            if list(full.shape) != shape:
                raise ValueError(f"{name}: checkpoint shape {list(full.shape)} != model shape {shape}")
        else:
            full = torch.empty(shape, dtype=t.dtype, device=dist.device)
        if dist.world > 1:
            tdist.broadcast(full, src=0)
        if dist.ep > 1 and _is_expert_key(name):
            n = shape[0] // dist.ep
            full = full[dist.ep_rank * n:(dist.ep_rank + 1) * n]
        if isinstance(t, DTensor):
            shard = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None)
            t.to_local().copy_(shard.to_local())
        else:
            t.copy_(full)


def clip_grad_norm_(model: nn.Module, max_norm: float, dist: Dist) -> torch.Tensor:
    """Clip the global gradient norm to max_norm; returns the norm before clipping (a plain scalar tensor,
    equal on every rank). torch.nn.utils.clip_grad_norm_ cannot mix the FSDP DTensors with the plain
    expert shards, and would miss the other EP ranks' experts; here every parameter element lives on
    exactly one rank's local shard, so the squared norm is a plain sum over ranks."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
             for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=dist.device)
    sq = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
    norm = all_reduce_sum(sq, dist).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm

