"""Full (unsharded) model and optimizer state of a parallelized run, for checkpoints and export.

nanoseek.train.parallel shards a model three ways: FSDP2 DTensors (non-expert weights over all ranks,
expert stacks over the expert data-parallel ranks), expert slices over an EP group, and, with redundant
experts (nanoseek.train.expert_replicas), physical slots that hold copies of logical experts. Here every
tensor is reassembled into its one-process layout (experts in logical order, one copy each) and scattered
back: a checkpoint written by any layout loads into any other, and into one process. The optimizer state
uses nanoseek.train.optim's flat `{kind}/{param name}` keys. `dist` is a nanoseek.train.parallel.Dist.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn

EXPERT_PARAMS = ("experts.gate_up_proj", "experts.down_proj")


def _is_dist(x) -> bool:
    """A nanoseek.train.parallel.Dist (by its fields: this module does not import that one)."""
    return all(hasattr(x, k) for k in ("rank", "world", "ep", "ep_group"))


def _is_expert_key(name: str) -> bool:
    return name.endswith(EXPERT_PARAMS)


def _replica_layer(name: str, dist) -> int | None:
    rep = getattr(dist, "replicas", None)
    return rep.layer_of(name) if rep is not None else None


def _gather(name: str, t: torch.Tensor, dist) -> torch.Tensor:
    """The full tensor behind a local shard: FSDP DTensors all-gathered, expert shards concatenated (with
    redundant experts: the physical slots gathered, then one copy of each logical expert in order)."""
    from torch.distributed.tensor import DTensor

    full = t.full_tensor() if isinstance(t, DTensor) else t
    if dist.ep > 1 and _is_expert_key(name) and full.dim() > 0:
        parts = [torch.empty_like(full) for _ in range(dist.ep)]
        tdist.all_gather(parts, full.contiguous(), group=dist.ep_group)
        full = torch.cat(parts, dim=0)
        layer = _replica_layer(name, dist)
        if layer is not None:
            full = dist.replicas.to_logical(layer, full)
    return full


def _full_shape(name: str, t: torch.Tensor, dist) -> list[int]:
    shape = list(t.shape)  # a DTensor reports its global shape
    if dist.ep > 1 and _is_expert_key(name) and shape:
        shape[0] = dist.replicas.num_experts if _replica_layer(name, dist) is not None else shape[0] * dist.ep
    return shape


def _scatter(name: str, full: torch.Tensor, like: torch.Tensor, dist) -> torch.Tensor:
    """This rank's piece of a full tensor, laid out like `like` (DTensor shard or expert slice)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    layer = _replica_layer(name, dist)
    if layer is not None and full.dim() > 0:
        full = dist.replicas.to_local(layer, full)
    elif dist.ep > 1 and _is_expert_key(name) and full.dim() > 0:
        n = full.shape[0] // dist.ep
        full = full[dist.ep_rank * n:(dist.ep_rank + 1) * n]
    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return full.to(like.dtype)


def _broadcast_full(name: str, like: torch.Tensor, full: torch.Tensor | None, dist) -> torch.Tensor:
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
def _gather_model(model: nn.Module, dist, rank0_only: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        full = _gather(name, t, dist)
        if dist.rank == 0 or not rank0_only:
            out[name] = full.detach().cpu().contiguous().clone()
    return out


@torch.no_grad()
def _gather_optimizer(model: nn.Module, opt: torch.optim.Optimizer, dist,
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


def gather_full_state(model: nn.Module, *args, rank0_only: bool = True):
    """Full (unsharded, experts reassembled in global order, CPU) state for checkpoints and export.

    gather_full_state(model, dist) -> model state dict;
    gather_full_state(model, opt, dist) -> (model state dict, optimizer state keyed `{kind}/{param}`).
    Collective: every rank must call it; other ranks get empty dicts when rank0_only.
    """
    if len(args) == 1 and _is_dist(args[0]):
        return _gather_model(model, args[0], rank0_only)
    if len(args) == 2 and _is_dist(args[1]):
        opt, dist = args
        return _gather_model(model, dist, rank0_only), _gather_optimizer(model, opt, dist, rank0_only)
    raise TypeError("gather_full_state(model, dist) or gather_full_state(model, opt, dist)")


@torch.no_grad()
def _load_model(model: nn.Module, state: dict[str, torch.Tensor], dist) -> None:
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
                    dist) -> None:
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


def load_full_state(model: nn.Module, *args) -> None:
    """Inverse of gather_full_state: load full state into a parallelized model. Collective.

    load_full_state(model, state, dist) or load_full_state(model, opt, state, optim_state, dist).
    Rank 0 must hold the full state; other ranks may pass {} (tensors are broadcast from rank 0).
    """
    if len(args) == 2 and _is_dist(args[1]):
        _load_model(model, args[0], args[1])
        return
    if len(args) == 4 and _is_dist(args[3]):
        opt, state, optim_state, dist = args
        _load_model(model, state, dist)
        _load_optimizer(model, opt, optim_state, dist)
        return
    raise TypeError("load_full_state(model, state, dist) or load_full_state(model, opt, state, optim_state, dist)")
