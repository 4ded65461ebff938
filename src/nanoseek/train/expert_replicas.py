"""Redundant experts at training time: the expert-parallel dispatcher serves a hot expert from several ranks.

The V3 report (section 3.4) deploys redundant copies of high-load experts, chosen from load statistics and
re-chosen periodically; nanoseek.train.eplb is DeepSeek's placement algorithm. This module runs a placement
inside nanoseek.train.parallel.ExpertParallelMoE:

  * each EP rank holds (E + R) / ep physical slots per MoE layer (R = parallel.redundant_experts); slot j of
    rank r holds the weights of logical expert placement.local_experts(layer, r)[j];
  * after routing, the (token, k) assignments of an expert with c replicas go round-robin over them (the
    n-th assignment of expert e on EP rank r to replica (n + r) mod c, ExpertPlacement.physical_ids), so a
    hot expert's tokens are split evenly and deterministically; the routing itself, the balancer's loads
    and max_vio stay logical;
  * the replicas of an expert get the gradients of the tokens they served; before the optimizer step
    (nanoseek.train.parallel.clip_grad_norm calls sync_grads) those are summed over all the expert's
    replicas and every replica takes the sum, so all copies take the same AdamW step and stay identical.
    The global gradient norm counts each logical expert once (a slot is weighted by 1 / its replica count);
  * checkpoints hold logical experts (one [E, ...] stack per weight, replica 0's copy), so a run with
    replicas resumes into one without and the other way round; the placement and the loads measured since
    the last rebalance travel in train_state.json, so a resumed run keeps serving tokens exactly as the
    uninterrupted one;
  * every parallel.eplb_interval optimizer steps, rebalance() runs EPLB on the loads of those steps and moves
    the weights and AdamW moments into the new slots (gather logical, scatter by the new placement).

Before the first rebalance the placement is eplb.initial_placement (replicas of each rank's first experts
on the next rank): no load has been measured yet.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as tdist
from torch import nn

from nanoseek.train.eplb import ExpertPlacement, initial_placement, placement_from_maps
from nanoseek.train.eplb import rebalance as eplb_rebalance

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def _local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(local tensor, index of its first row in the rank's slot stack, how many ranks hold an identical copy).

    FSDP2 shards the expert stacks along dim 0 (torch.chunk's rule) over the expert data-parallel ranks,
    or replicates them (parallel.fsdp = false); a plain tensor is this rank's whole stack."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(t, DTensor):
        return t, 0, 1
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    copies = math.prod(size for size, pl in zip(t.device_mesh.shape, t.placements) if isinstance(pl, Replicate))
    return t.to_local(), int(offset[0]) if offset else 0, copies


class ExpertReplicas:
    """The placement of every MoE layer's physical expert slots over one EP group, and the work it implies
    (see the module docstring). Built by nanoseek.train.parallel.parallelize when parallel.redundant_experts > 0.

    `names` maps each expert weight's state-dict name to its MoE layer index; `sum_group` is the process
    group over which the replicas' gradients are summed (every rank that holds a slot of these layers)."""

    def __init__(self, moes: list[nn.Module], names: dict[str, int], ep: int, ep_rank: int, redundant: int,
                 interval: int, device: torch.device, sum_group=None):
        E = moes[0].cfg.n_routed_experts
        self.moes, self.names, self.ep, self.ep_rank = moes, names, ep, ep_rank
        self.redundant, self.interval, self.device, self.sum_group = redundant, interval, device, sum_group
        self.num_experts = E
        self.window: torch.Tensor = torch.zeros(len(moes), E)  # logical loads since the last rebalance
        self.steps_in_window = 0
        self.rebalances = 0
        self.set_placement(initial_placement(len(moes), E, ep, redundant))

    # ------------------------------------------------------------------ the placement
    def set_placement(self, placement: ExpertPlacement) -> None:
        if placement.num_layers != len(self.moes) or placement.num_experts != self.num_experts \
                or placement.num_slots != self.num_experts + self.redundant or placement.num_ranks != self.ep:
            raise ValueError(f"placement of {placement.num_layers} layers x {placement.num_slots} slots over "
                             f"{placement.num_ranks} ranks does not fit {len(self.moes)} layers x "
                             f"{self.num_experts + self.redundant} slots over {self.ep} ranks")
        self.placement = placement
        dev = self.device
        self._on_device = ExpertPlacement(placement.phy2log.to(dev), placement.log2phy.to(dev),
                                          placement.logcnt.to(dev), placement.num_ranks)
        S = placement.slots_per_rank
        self._local = placement.phy2log[:, self.ep_rank * S:(self.ep_rank + 1) * S].to(dev)  # [L, S] logical ids
        self._first = placement.log2phy[:, :, 0].to(dev)  # [L, E] replica 0 of each expert
        self._hot = [torch.nonzero(placement.logcnt[layer] > 1).flatten().tolist() for layer in range(len(self.moes))]
        # Per layer: each local slot's row in that layer's buffer of replicated experts, -1 for a single copy.
        self._slot_pos = []
        for layer, hot in enumerate(self._hot):
            pos = torch.full((self.num_experts,), -1, dtype=torch.long)
            pos[hot] = torch.arange(len(hot))
            self._slot_pos.append(pos.to(dev)[self._local[layer]])

    @property
    def slots_per_rank(self) -> int:
        return self.placement.slots_per_rank

    def physical_ids(self, layer: int, idx_NK: torch.Tensor) -> torch.Tensor:
        return self._on_device.physical_ids(layer, idx_NK, offset=self.ep_rank)

    def local_experts(self, layer: int) -> torch.Tensor:
        """The logical expert of each of this rank's slots [S]."""
        return self._local[layer]

    def layer_of(self, name: str) -> int | None:
        return self.names.get(name)

    def to_logical(self, layer: int, full_P: torch.Tensor) -> torch.Tensor:
        """[P, ...] (the EP group's slot stacks concatenated in rank order) -> [E, ...] by replica 0."""
        return full_P.index_select(0, self._first[layer].to(full_P.device))

    def to_local(self, layer: int, full_E: torch.Tensor) -> torch.Tensor:
        """[E, ...] logical -> this rank's slots [S, ...]."""
        return full_E.index_select(0, self._local[layer].to(full_E.device))

    # ------------------------------------------------------------------ gradients
    def _expert_params(self):
        for layer, moe in enumerate(self.moes):
            for w in EXPERT_WEIGHTS:
                yield layer, getattr(moe.experts, w)

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Sum every replicated expert's gradient over its replicas and give each replica the sum (one
        all-reduce over sum_group for all layers). Collective: every rank of sum_group calls it."""
        jobs, bufs = [], []
        for layer, p in self._expert_params():
            hot = self._hot[layer]
            if not hot:
                continue
            if p.grad is None:  # never used on any rank this step: a zero gradient, as its replicas get
                p.grad = torch.zeros_like(p)
            g, row0, copies = _local_rows(p.grad)
            slot_pos = self._slot_pos[layer][row0:row0 + g.shape[0]].to(g.device)
            rows = torch.nonzero(slot_pos >= 0).flatten()
            buf = g.new_zeros((len(hot), *g.shape[1:]), dtype=torch.float32)
            # A slot replicated over `copies` expert data-parallel ranks holds the same averaged gradient there.
            buf.index_add_(0, slot_pos[rows], g[rows].float() / copies)
            jobs.append((g, rows, slot_pos[rows]))
            bufs.append(buf)
        if not bufs:
            return
        flat = torch.cat([b.flatten() for b in bufs])
        if tdist.is_initialized():
            tdist.all_reduce(flat, group=self.sum_group)
        for (g, rows, where), buf in zip(jobs, flat.split([b.numel() for b in bufs])):
            g[rows] = buf.view(-1, *g.shape[1:])[where].to(g.dtype)

    def row_weights(self, layer: int, g_local: torch.Tensor, row0: int) -> torch.Tensor:
        """1 / replica count of the expert in each local row: the norm then counts every expert once."""
        cnt = self._on_device.logcnt[layer].to(g_local.device)
        return 1.0 / cnt[self._local[layer][row0:row0 + g_local.shape[0]].to(g_local.device)].float()

    def weighted_grad_sq(self) -> dict[int, torch.Tensor]:
        """id(expert parameter) -> its gradient's sum of squares with each expert counted once (this rank's rows)."""
        out = {}
        for layer, p in self._expert_params():
            if p.grad is None:
                continue
            g, row0, copies = _local_rows(p.grad)
            sq = g.detach().float().pow(2).flatten(1).sum(1) if g.numel() else g.new_zeros(g.shape[0]).float()
            out[id(p)] = (sq * self.row_weights(layer, g, row0)).sum() / copies
        return out

    # ------------------------------------------------------------------ rebalancing
    def observe(self, loads_LE: torch.Tensor) -> None:
        """Add one optimizer step's (all-reduced, logical) expert loads [L, E] to the window."""
        self.window += loads_LE.detach().float().cpu().view_as(self.window)
        self.steps_in_window += 1

    def due(self, step_done: int) -> bool:
        return self.interval > 0 and step_done % self.interval == 0 and self.steps_in_window > 0

    @torch.no_grad()
    def rebalance(self, model: nn.Module, opt: torch.optim.Optimizer | None, dist) -> ExpertPlacement:
        """EPLB on the window's loads, then every expert weight and its AdamW moments moved into the new
        slots. Collective over the EP group (and the FSDP mesh); the window starts again."""
        from nanoseek.train.full_state import _gather, _scatter

        new = eplb_rebalance(self.window, self.ep, self.redundant)
        params = dict(model.named_parameters())
        moved = []
        for name in self.names:
            p = params[name]
            states = {k: v for k, v in (opt.state.get(p, {}) if opt is not None else {}).items()
                      if isinstance(v, torch.Tensor) and v.dim() > 0}
            moved.append((name, p, {k: _gather(name, v, dist) for k, v in states.items()}, _gather(name, p, dist)))
        self.set_placement(new)
        for name, p, states, full in moved:
            _copy_into(p, _scatter(name, full, p, dist))
            for k, v in states.items():
                _copy_into(opt.state[p][k], _scatter(name, v, opt.state[p][k], dist))
        self.window.zero_()
        self.steps_in_window = 0
        self.rebalances += 1
        return new

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """JSON-ready: the placement's maps and the loads measured since the last rebalance."""
        return {"redundant_experts": self.redundant, "phy2log": self.placement.phy2log.tolist(),
                "log2phy": self.placement.log2phy.tolist(), "window": self.window.tolist(),
                "steps_in_window": self.steps_in_window}

    def load_state_dict(self, state: dict) -> bool:
        """Take a checkpoint's placement when it has the same shape (same redundancy and EP size); returns
        whether it did. Call before loading the weights: they are scattered by the placement in force."""
        try:
            placement = placement_from_maps(torch.tensor(state["phy2log"]), torch.tensor(state["log2phy"]), self.ep)
            self.set_placement(placement)
            window = torch.tensor(state["window"], dtype=torch.float32)
        except (KeyError, ValueError, TypeError, RuntimeError):
            return False
        if window.shape != self.window.shape:
            return False
        self.window, self.steps_in_window = window, int(state.get("steps_in_window", 0))
        return True


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor

    (dst.to_local() if isinstance(dst, DTensor) else dst).copy_(src.to_local() if isinstance(src, DTensor) else src)


@torch.no_grad()
def replica_divergence(replicas: ExpertReplicas, dist) -> float:
    """Largest |difference| between two replicas of one expert, over all layers and weights (0 when the
    copies are identical, as sync_grads keeps them). Collective over the EP group."""
    from torch.distributed.tensor import DTensor

    worst = 0.0
    for layer, p in replicas._expert_params():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        parts = [torch.empty_like(full) for _ in range(replicas.ep)]
        tdist.all_gather(parts, full.contiguous(), group=dist.ep_group)
        full_P = torch.cat(parts)
        ref = replicas.to_logical(layer, full_P)[replicas._on_device.phy2log[layer].to(full_P.device)]
        worst = max(worst, float((full_P - ref).abs().max()))
    return worst
