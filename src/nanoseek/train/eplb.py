"""Expert-parallel load balancing with redundant experts (EPLB), as DeepSeek published it.

The V3 report (section 3.4, "redundant experts") serves hot experts from several GPUs; DeepSeek's EPLB
repository (github.com/deepseek-ai/EPLB) publishes the placement algorithm. Given each logical expert's
estimated load per MoE layer (a moving average of routed-token counts, say), it picks how many copies
("replicas", "physical experts") each logical expert gets and which GPU holds each copy, so that every
GPU holds the same number of expert slots and the load per GPU is as even as it can make it:

  hierarchical (used when the number of nodes divides the number of expert groups, which V3's
  node-limited routing rewards: a token's groups then sit on few nodes)
    1. pack the expert groups onto nodes, an equal number of groups per node, balancing node loads;
    2. inside each node, add replicas one at a time to the expert whose per-replica load
       (load / replica count) is highest, until the node's physical slots are filled;
    3. pack the node's replicas (each carrying load / count) onto its GPUs, an equal number per GPU;
  global (otherwise): the same with a single group on a single node, i.e. replicate over all slots
    and pack the replicas onto all GPUs.

Packing is the greedy rule "heaviest item first, into the lightest pack that still has room". Ties are
broken by index (a stable sort; the lowest pack), so the result is deterministic and equals DeepSeek's
published example output (see tests/test_eplb.py).

Maps, per layer (P = num_replicas physical slots, E logical experts, R = max replica count):
  phy2log [L, P]     the logical expert in physical slot p; slot p lives on GPU p // (P / num_gpus)
  log2phy [L, E, R]  the physical slots of expert e, replica 0 first, padded with -1
  logcnt  [L, E]     how many replicas expert e has (>= 1; sums to P per layer)

`ExpertPlacement` wraps the three maps with what an expert-parallel dispatcher needs: where each
expert's replicas live (rank, local slot), which logical expert each local slot of a rank holds (to
gather its weights), and `physical_ids`, which turns routed logical expert ids into physical slots,
spreading the assignments of a replicated expert evenly over its replicas. Replicas of one expert
receive separate gradients; `fold_replicas` sums per-slot tensors back onto logical experts.

How an all-to-all dispatcher uses a placement (per MoE layer l, on EP rank r):
  1. hold `placement.local_weights(l, r, W_E)` for each expert weight stack: slots_per_rank slots
     (E / ep without redundancy) whose logical ids are `placement.local_experts(l, r)`;
  2. after routing, `phys_NK = placement.physical_ids(l, idx_NK, offset=r)` and dispatch exactly as
     without replicas, with physical slots for expert ids (destination rank = phys // slots_per_rank);
  3. sum the gradients of an expert's replicas (an all-reduce over the ranks holding them, or
     `fold_replicas` on gathered per-slot gradients) so every copy takes the same optimizer step; save
     checkpoints per logical expert. Routing statistics (the balancing bias, `max_vio`) stay logical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# ----------------------------------------------------------------------------- the three steps
def balanced_packing(weight_LN: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each row's N items into `num_packs` packs of N / num_packs items, balancing pack weights.

    Items go heaviest first (stable order for ties) into the lightest pack that is not yet full (the
    lowest index among equally light ones). Returns (pack index [L, N], position inside the pack [L, N]).
    """
    L, N = weight_LN.shape
    if num_packs <= 0 or N % num_packs:
        raise ValueError(f"{N} items cannot be split evenly into {num_packs} packs")
    per_pack = N // num_packs
    pack_LN = torch.empty(L, N, dtype=torch.long)
    slot_LN = torch.empty(L, N, dtype=torch.long)
    if per_pack == 1:  # one item per pack: nothing to balance, keep the items where they are
        pack_LN[:] = torch.arange(N)
        slot_LN.zero_()
        return pack_LN, slot_LN
    order_LN = weight_LN.float().sort(dim=-1, descending=True, stable=True).indices
    for layer in range(L):
        row = weight_LN[layer].tolist()
        loads = [0.0] * num_packs
        sizes = [0] * num_packs
        for item in order_LN[layer].tolist():
            pack = min((p for p in range(num_packs) if sizes[p] < per_pack), key=loads.__getitem__)
            pack_LN[layer, item] = pack
            slot_LN[layer, item] = sizes[pack]
            loads[pack] += row[item]
            sizes[pack] += 1
    return pack_LN, slot_LN


def replicate(weight_LN: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give N experts `num_slots` >= N replicas so the largest per-replica load is as small as possible.

    Slot i < N holds expert i; each further slot goes to the expert whose load / replica count is then
    the highest (the lowest index among ties). This greedy choice is optimal for minimising the
    maximum of load / count. Returns (slot -> expert [L, S], replica rank of each slot [L, S],
    replica count per expert [L, N]).
    """
    L, N = weight_LN.shape
    if num_slots < N:
        raise ValueError(f"{num_slots} physical slots cannot hold {N} experts")
    w = weight_LN.float()
    slot2exp = torch.arange(num_slots).repeat(L, 1)
    rank = torch.zeros(L, num_slots, dtype=torch.long)
    count = torch.ones(L, N, dtype=torch.long)
    rows = torch.arange(L)
    for slot in range(N, num_slots):
        hot = (w / count).argmax(dim=-1)  # first maximum on ties
        slot2exp[:, slot] = hot
        rank[:, slot] = count[rows, hot]
        count[rows, hot] += 1
    return slot2exp, rank, count


def _invert(perm_LN: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm_LN)
    inv.scatter_(1, perm_LN, torch.arange(perm_LN.shape[1]).expand_as(perm_LN).contiguous())
    return inv


def _hierarchical(weight_LE: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(phy2log, replica rank per slot, logcnt) by the three steps of the module docstring."""
    L, E = weight_LE.shape
    group_size, groups_per_node = E // num_groups, num_groups // num_nodes
    slots_per_node, gpus_per_node = num_replicas // num_nodes, num_gpus // num_nodes
    slots_per_gpu = num_replicas // num_gpus

    # 1. groups -> nodes. Renumber the experts node by node ("node-major" ids): expert j of the group in
    #    position q of node n gets id (n * groups_per_node + q) * group_size + j.
    group_load_LG = weight_LE.unflatten(-1, (num_groups, group_size)).sum(-1)
    node_LG, pos_LG = balanced_packing(group_load_LG, num_nodes)
    first_LG = (node_LG * groups_per_node + pos_LG) * group_size
    log2nm_LE = (first_LG.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)
    nm2log_LE = _invert(log2nm_LE)

    # 2. replicate inside each node: one row per (layer, node) over that node's E / num_nodes experts.
    load_nm = weight_LE.gather(-1, nm2log_LE).view(L * num_nodes, E // num_nodes)
    slot2nm, slot_rank, nm_count = replicate(load_nm, slots_per_node)

    # 3. replicas -> GPUs of their node, each replica carrying an equal share of its expert's load.
    share = (load_nm / nm_count).gather(-1, slot2nm)
    gpu, pos = balanced_packing(share, gpus_per_node)
    final2slot = _invert(gpu * slots_per_gpu + pos)  # final position inside the node -> step-2 slot

    node_offset = (torch.arange(num_nodes) * (E // num_nodes)).view(1, num_nodes, 1)
    phy2nm = (slot2nm.gather(-1, final2slot).view(L, num_nodes, -1) + node_offset).flatten(-2)
    phy2log = nm2log_LE.gather(-1, phy2nm)
    phy_rank = slot_rank.gather(-1, final2slot).view(L, -1)
    logcnt = nm_count.view(L, -1).gather(-1, log2nm_LE)
    return phy2log, phy_rank, logcnt


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's EPLB entry point: (phy2log [L, P], log2phy [L, E, R] padded with -1, logcnt [L, E]).

    `weight` [L, E] (or [E] for one layer) holds the estimated load of each logical expert; P =
    num_replicas physical slots spread over num_gpus GPUs on num_nodes nodes. Hierarchical balancing when
    num_nodes divides num_groups, global balancing otherwise (see the module docstring).
    """
    w = torch.as_tensor(weight).detach().float().cpu()
    if w.dim() == 1:
        w = w.unsqueeze(0)
    if w.dim() != 2 or w.shape[1] == 0:
        raise ValueError(f"weight must be [layers, experts], got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("expert loads must be finite and non-negative")
    L, E = w.shape
    if num_gpus <= 0 or num_nodes <= 0 or num_groups <= 0:
        raise ValueError("num_groups, num_nodes and num_gpus must be positive")
    if num_replicas < E:
        raise ValueError(f"num_replicas={num_replicas} is fewer than the {E} logical experts")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} must be a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if E % num_groups:
        raise ValueError(f"{E} experts cannot form {num_groups} equal groups")
    if num_groups % num_nodes == 0:
        phy2log, phy_rank, logcnt = _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phy_rank, logcnt = _hierarchical(w, num_replicas, 1, 1, num_gpus)
    R = int(logcnt.max())
    log2phy = torch.full((L, E, R), -1, dtype=torch.long)
    log2phy.view(L, -1).scatter_(-1, phy2log * R + phy_rank, torch.arange(num_replicas).expand(L, -1).contiguous())
    return phy2log, log2phy, logcnt


# ----------------------------------------------------------------------------- for a dispatcher
@dataclass(frozen=True)
class ExpertPlacement:
    """Which logical expert every physical slot holds, per MoE layer, over `num_ranks` EP ranks.

    Physical slot p lives on rank p // slots_per_rank as that rank's local slot p % slots_per_rank,
    the layout an all-to-all dispatcher sorts by (rank r owns slots [r * S, (r + 1) * S)).
    """

    phy2log: torch.Tensor  # [L, P] long
    log2phy: torch.Tensor  # [L, E, R] long, -1 padded
    logcnt: torch.Tensor   # [L, E] long
    num_ranks: int

    def __post_init__(self):
        L, P = self.phy2log.shape
        if self.num_ranks <= 0 or P % self.num_ranks:
            raise ValueError(f"{P} physical slots cannot be split evenly over {self.num_ranks} ranks")
        if self.log2phy.shape[:2] != (L, self.logcnt.shape[1]) or self.logcnt.shape[0] != L:
            raise ValueError("phy2log, log2phy and logcnt disagree on the number of layers or experts")

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.num_ranks

    def replicas(self, layer: int, expert: int) -> list[tuple[int, int]]:
        """(rank, local slot) of every replica of `expert`, replica 0 first."""
        S = self.slots_per_rank
        return [(p // S, p % S) for p in self.log2phy[layer, expert].tolist() if p >= 0]

    def local_experts(self, layer: int, rank: int) -> list[int]:
        """The logical expert held in each local slot of `rank` (gather the expert weights with it)."""
        S = self.slots_per_rank
        return self.phy2log[layer, rank * S:(rank + 1) * S].tolist()

    def local_weights(self, layer: int, rank: int, weight_E: torch.Tensor) -> torch.Tensor:
        """Rows of a logical per-expert tensor [E, ...] (an expert weight stack) for `rank`'s slots."""
        S = self.slots_per_rank
        return weight_E[self.phy2log[layer, rank * S:(rank + 1) * S].to(weight_E.device)]

    def physical_ids(self, layer: int, idx_NK: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Physical slot of each routed (token, k) assignment, same shape as the logical ids `idx_NK`.

        The assignments of expert e, in row-major order, go round-robin over its replicas starting at
        replica `offset` mod count: replica loads differ by at most one per call. Pass the EP rank as
        `offset` so the remainders of different source ranks land on different replicas.
        """
        e_M = idx_NK.flatten().long()
        dev = e_M.device
        cnt_E = self.logcnt[layer].to(dev)
        order = e_M.argsort(stable=True)
        count_E = torch.bincount(e_M, minlength=self.num_experts)
        start_E = count_E.cumsum(0) - count_E
        nth_sorted = torch.arange(e_M.numel(), device=dev) - start_E[e_M[order]]
        nth = torch.empty_like(nth_sorted).index_copy_(0, order, nth_sorted)  # occurrence number of each assignment
        replica = (nth + offset) % cnt_E[e_M]
        return self.log2phy[layer].to(dev)[e_M, replica].view(idx_NK.shape)

    def rank_of(self, phys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank, local slot) of physical slot ids."""
        return phys // self.slots_per_rank, phys % self.slots_per_rank

    def fold_replicas(self, layer: int, per_slot_P: torch.Tensor) -> torch.Tensor:
        """Sum a per-slot tensor [P, ...] (replica gradients, token counts) onto logical experts [E, ...]."""
        out = per_slot_P.new_zeros((self.num_experts, *per_slot_P.shape[1:]))
        return out.index_add_(0, self.phy2log[layer].to(per_slot_P.device), per_slot_P)

    def rank_loads(self, weight_LE: torch.Tensor) -> torch.Tensor:
        """Expected load per rank [L, num_ranks] when each expert's load splits evenly over its replicas."""
        w = torch.as_tensor(weight_LE).float().cpu().reshape(self.num_layers, self.num_experts)
        per_slot = (w / self.logcnt).gather(-1, self.phy2log)
        return per_slot.view(self.num_layers, self.num_ranks, self.slots_per_rank).sum(-1)


def rebalance(weight_LE: torch.Tensor, num_ranks: int, num_redundant: int = 0, num_groups: int = 1,
              num_nodes: int = 1) -> ExpertPlacement:
    """EPLB placement of E logical experts plus `num_redundant` extra replicas over `num_ranks` ranks."""
    w = torch.as_tensor(weight_LE)
    E = w.shape[-1]
    phy2log, log2phy, logcnt = rebalance_experts(w, E + num_redundant, num_groups, num_nodes, num_ranks)
    return ExpertPlacement(phy2log, log2phy, logcnt, num_ranks)


def placement_from_maps(phy2log: torch.Tensor, log2phy: torch.Tensor, num_ranks: int) -> ExpertPlacement:
    """An ExpertPlacement from its two maps (as a checkpoint stores them); logcnt is recounted, and the maps
    must describe each other (every slot of expert e listed in log2phy[l, e], replica order kept)."""
    phy2log, log2phy = torch.as_tensor(phy2log).long().cpu(), torch.as_tensor(log2phy).long().cpu()
    if phy2log.dim() != 2 or log2phy.dim() != 3 or log2phy.shape[0] != phy2log.shape[0]:
        raise ValueError(f"placement maps of shapes {tuple(phy2log.shape)} and {tuple(log2phy.shape)} do not fit")
    L, P = phy2log.shape
    E = log2phy.shape[1]
    if phy2log.numel() and (phy2log.min() < 0 or phy2log.max() >= E):
        raise ValueError(f"phy2log names experts outside [0, {E})")
    logcnt = (log2phy >= 0).sum(-1)
    for layer in range(L):
        for e in range(E):
            slots = log2phy[layer, e, :int(logcnt[layer, e])]
            if (slots >= P).any() or not (phy2log[layer, slots] == e).all() or int(logcnt[layer, e]) < 1:
                raise ValueError(f"placement maps disagree for layer {layer}, expert {e}")
    if not torch.equal(logcnt.sum(-1), torch.full((L,), P)):
        raise ValueError("placement maps disagree on the number of physical slots")
    return ExpertPlacement(phy2log, log2phy, logcnt, num_ranks)


def initial_placement(num_layers: int, num_experts: int, num_ranks: int, num_redundant: int) -> ExpertPlacement:
    """The placement before any load was measured: rank r holds its contiguous E/ranks experts (as without
    redundancy) plus num_redundant/ranks replicas. Redundant replica i copies expert (i % ranks) * E/ranks +
    i // ranks (the first experts of every rank, in turn) and lives on the next rank, never beside its
    original. (EPLB on equal loads would be as good a guess but may put both copies of an expert on one rank.)"""
    E, R, n = num_experts, num_redundant, num_ranks
    if E % n or R % n or R < 0:
        raise ValueError(f"{E} experts and {R} redundant replicas must both split evenly over {n} ranks")
    El, Rl = E // n, R // n
    phy2log = torch.empty(E + R, dtype=torch.long)
    for r in range(n):
        phy2log[r * (El + Rl):r * (El + Rl) + El] = torch.arange(r * El, (r + 1) * El)
    for i in range(R):
        owner = i % n
        phy2log[((owner + 1) % n) * (El + Rl) + El + i // n] = owner * El + (i // n) % El
    logcnt = torch.bincount(phy2log, minlength=E)
    log2phy = torch.full((E, int(logcnt.max())), -1, dtype=torch.long)
    seen = [0] * E
    originals = [p for p in range(E + R) if p % (El + Rl) < El]
    for p in originals + [p for p in range(E + R) if p % (El + Rl) >= El]:  # replica 0 is the original
        e = int(phy2log[p])
        log2phy[e, seen[e]] = p
        seen[e] += 1
    L = num_layers
    return ExpertPlacement(phy2log.repeat(L, 1), log2phy.repeat(L, 1, 1), logcnt.repeat(L, 1), n)


def contiguous_placement(num_layers: int, num_experts: int, num_ranks: int) -> ExpertPlacement:
    """The placement without EPLB: rank r holds experts [r * E/ranks, (r + 1) * E/ranks), one copy each."""
    if num_experts % num_ranks:
        raise ValueError(f"{num_experts} experts cannot be split evenly over {num_ranks} ranks")
    phy2log = torch.arange(num_experts).repeat(num_layers, 1)
    ones = torch.ones(num_layers, num_experts, dtype=torch.long)
    return ExpertPlacement(phy2log, phy2log.unsqueeze(-1).clone(), ones, num_ranks)


def imbalance(rank_load_LR: torch.Tensor) -> torch.Tensor:
    """max / mean load over ranks, per layer (1.0 = perfectly even)."""
    mean = rank_load_LR.float().mean(-1)
    return torch.where(mean > 0, rank_load_LR.float().amax(-1) / mean.clamp_min(1e-12), torch.ones_like(mean))
