"""EPLB (nanoseek.train.eplb): DeepSeek's published example, placement invariants on random loads, and the
maps a dispatcher uses (replicated experts give the same MoE output and gradients as unreplicated ones)."""

from __future__ import annotations

import itertools

import pytest
import torch

from nanoseek.train.eplb import (ExpertPlacement, balanced_packing, contiguous_placement, imbalance, initial_placement,
                                 placement_from_maps, rebalance, rebalance_experts, replicate)

# The worked example of github.com/deepseek-ai/EPLB's README: 2 layers of 12 experts in 4 groups,
# 16 physical slots on 2 nodes x 4 GPUs, and the phy2log it prints (hierarchical policy).
README_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                               [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def test_published_example():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert torch.equal(phy2log, README_PHY2LOG)
    # The 4 redundant slots go to the 4 experts with the highest per-replica load in their node.
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert log2phy.shape == (2, 12, 2)
    _check_maps(phy2log, log2phy, logcnt)


def _check_maps(phy2log, log2phy, logcnt):
    L, P = phy2log.shape
    E = logcnt.shape[1]
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == P).all()
    for layer in range(L):
        assert torch.equal(torch.bincount(phy2log[layer], minlength=E), logcnt[layer])
        for e in range(E):
            slots = log2phy[layer, e]
            k = int(logcnt[layer, e])
            assert (slots[k:] == -1).all() and (slots[:k] >= 0).all()
            assert (phy2log[layer, slots[:k]] == e).all() and len(set(slots[:k].tolist())) == k


def _skewed(L, E, seed, s=1.0):
    """Zipf-like loads: expert of popularity rank r gets ~1/r^s, a random permutation per layer."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(L, E, generator=g), dim=-1) + 1
    return (1e4 / ranks.float() ** s).round()


CASES = [  # (experts, groups, nodes, gpus, redundant slots)
    (256, 8, 8, 64, 0), (256, 8, 8, 64, 64), (256, 8, 4, 32, 32), (64, 8, 2, 16, 16), (64, 4, 4, 8, 8),
    (32, 4, 1, 8, 8), (32, 4, 3, 6, 4), (16, 1, 2, 4, 4), (16, 2, 2, 8, 0), (12, 4, 2, 8, 4),
]


@pytest.mark.parametrize("E,groups,nodes,gpus,red", CASES)
def test_placement_invariants(E, groups, nodes, gpus, red):
    L = 4
    w = _skewed(L, E, seed=E + gpus + red)
    phy2log, log2phy, logcnt = rebalance_experts(w, E + red, groups, nodes, gpus)
    _check_maps(phy2log, log2phy, logcnt)
    P = E + red
    # Deterministic: same input, same output.
    again = rebalance_experts(w.clone(), P, groups, nodes, gpus)
    assert all(torch.equal(a, b) for a, b in zip((phy2log, log2phy, logcnt), again))
    plan = ExpertPlacement(phy2log, log2phy, logcnt, gpus)
    assert plan.slots_per_rank * gpus == P
    assert all(len(plan.local_experts(0, r)) == P // gpus for r in range(gpus))
    if groups % nodes == 0:  # hierarchical: every replica of a group's experts sits on the group's node
        node_of_slot = torch.arange(P) // (P // nodes)
        for layer, g in itertools.product(range(L), range(groups)):
            members = range(g * (E // groups), (g + 1) * (E // groups))
            nodes_used = {int(node_of_slot[p]) for e in members for p in log2phy[layer, e].tolist() if p >= 0}
            assert len(nodes_used) == 1
        for layer, n in itertools.product(range(L), range(nodes)):  # each node holds whole groups
            held = set(phy2log[layer, n * (P // nodes):(n + 1) * (P // nodes)].tolist())
            assert len(held) % (E // groups) == 0 and {e // (E // groups) for e in held}.__len__() == groups // nodes
    else:  # global policy: the same as one group on one node
        flat = rebalance_experts(w, P, 1, 1, gpus)
        assert all(torch.equal(a, b) for a, b in zip((phy2log, log2phy, logcnt), flat))
    # Never worse than the contiguous one-copy layout, summed over layers (each layer waits for its
    # busiest rank); with redundancy on a skewed load, clearly better.
    ours = plan.rank_loads(w).amax(-1).sum()
    if E % gpus == 0:  # (32 experts cannot be laid out contiguously over 6 GPUs; EPLB can, with 4 replicas)
        naive = contiguous_placement(L, E, gpus).rank_loads(w).amax(-1).sum()
        assert ours <= naive * (1 + 1e-6)
        if red >= gpus:
            assert ours < 0.9 * naive
    # Loads are conserved: the ranks share exactly the experts' total.
    assert torch.allclose(plan.rank_loads(w).sum(-1), w.sum(-1))


def test_replicate_is_optimal_for_max_share():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        w = torch.randint(1, 100, (1, 4), generator=g).float()
        _, _, cnt = replicate(w, 7)
        best = min(max(w[0, i].item() / c[i] for i in range(4))
                   for c in itertools.product(range(1, 5), repeat=4) if sum(c) == 7)
        assert (w / cnt).max().item() == pytest.approx(best)


def test_balanced_packing_fills_packs_evenly():
    w = torch.tensor([[5.0, 4, 3, 3, 3, 2]])
    pack, slot = balanced_packing(w, 2)
    assert sorted(torch.bincount(pack[0]).tolist()) == [3, 3]
    loads = torch.zeros(2).index_add_(0, pack[0], w[0])
    assert loads.max().item() == 10.0  # 20 total: the greedy reaches the optimum here
    assert {(int(p), int(s)) for p, s in zip(pack[0], slot[0])} == {(p, s) for p in range(2) for s in range(3)}


def test_skew_drops_with_redundancy():
    # Zipf s=1 over 256 experts: the hottest expert alone carries 16% of the load, 10x a rank's share.
    w = _skewed(8, 256, seed=0)
    naive = imbalance(contiguous_placement(8, 256, 64).rank_loads(w)).mean()
    assert naive > 10
    for nodes, floor in ((1, 1.05), (8, 2.5)):
        prev = float("inf")
        for red in (0, 64, 128, 256):
            now = imbalance(rebalance(w, 64, red, num_groups=8, num_nodes=nodes).rank_loads(w)).mean()
            assert now <= prev + 1e-6
            prev = now
        # One node must hold a hot group whole (hierarchical), so it stays above the global policy.
        assert prev < floor


def test_physical_ids_split_hot_experts_evenly():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    plan = ExpertPlacement(phy2log, log2phy, logcnt, 8)
    g = torch.Generator().manual_seed(0)
    idx_NK = torch.multinomial(README_WEIGHT[1].float(), 200 * 3, replacement=True, generator=g).view(200, 3)
    for offset in (0, 1, 5):
        phys = plan.physical_ids(1, idx_NK, offset=offset)
        assert phys.shape == idx_NK.shape
        assert torch.equal(phy2log[1][phys], idx_NK)  # every assignment lands on a copy of its expert
        per_slot = torch.bincount(phys.flatten(), minlength=16)
        for e in range(12):
            slots = [p for p in log2phy[1, e].tolist() if p >= 0]
            counts = per_slot[slots]
            assert counts.sum() == (idx_NK == e).sum() and counts.max() - counts.min() <= 1
        assert torch.equal(plan.fold_replicas(1, per_slot), torch.bincount(idx_NK.flatten(), minlength=12))
    rank, slot = plan.rank_of(phys)
    assert (rank < 8).all() and (slot < 2).all()
    assert plan.replicas(1, 5) == [(int(p) // 2, int(p) % 2) for p in log2phy[1, 5] if p >= 0]


def test_replicated_experts_give_the_same_output_and_gradients():
    """What a dispatcher does with the maps: hold W[local_experts] per rank, route to physical slots."""
    torch.manual_seed(0)
    E, D, N, K, ranks = 12, 8, 64, 3, 8
    plan = ExpertPlacement(*rebalance_experts(README_WEIGHT, 16, 4, 2, ranks), ranks)
    W = torch.randn(E, D, D, dtype=torch.float64, requires_grad=True)
    x = torch.randn(N, D, dtype=torch.float64)
    idx = torch.randint(0, E, (N, K))
    gate = torch.rand(N, K, dtype=torch.float64)

    def moe(weights, ids):
        return (gate.unsqueeze(-1) * torch.einsum("nd,nkde->nke", x, weights[ids])).sum(1)

    ref = moe(W, idx)
    (ref ** 2).sum().backward()
    grad_ref, W.grad = W.grad.clone(), None

    W_phys = torch.cat([plan.local_weights(0, r, W.detach()) for r in range(ranks)]).requires_grad_(True)
    assert W_phys.shape == (16, D, D)
    out = moe(W_phys, plan.physical_ids(0, idx, offset=3))
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-12)
    (out ** 2).sum().backward()
    torch.testing.assert_close(plan.fold_replicas(0, W_phys.grad), grad_ref, rtol=0, atol=1e-10)


def test_contiguous_placement_and_bad_input():
    naive = contiguous_placement(2, 8, 4)
    assert naive.local_experts(1, 2) == [4, 5] and naive.replicas(0, 7) == [(3, 1)]
    with pytest.raises(ValueError, match="fewer than"):
        rebalance_experts(README_WEIGHT, 8, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of num_gpus"):
        rebalance_experts(README_WEIGHT, 18, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of num_nodes"):
        rebalance_experts(README_WEIGHT, 16, 4, 3, 8)
    with pytest.raises(ValueError, match="equal groups"):
        rebalance_experts(README_WEIGHT, 16, 5, 1, 8)
    with pytest.raises(ValueError, match="non-negative"):
        rebalance_experts(-README_WEIGHT, 16, 4, 2, 8)
    with pytest.raises(ValueError, match="evenly"):
        contiguous_placement(1, 10, 4)
    one = rebalance_experts(README_WEIGHT[0], 16, 4, 2, 8)  # a single layer may be given as [E]
    assert torch.equal(one[0], README_PHY2LOG[:1])


def test_initial_placement_puts_copies_beside_no_original():
    plan = initial_placement(3, 8, 4, 4)  # 2 experts + 1 replica per rank
    assert plan.slots_per_rank == 3 and plan.num_layers == 3
    _check_maps(plan.phy2log, plan.log2phy, plan.logcnt)
    assert plan.local_experts(0, 0) == [0, 1, 6] and plan.local_experts(2, 1) == [2, 3, 0]
    for e in (0, 2, 4, 6):  # the first expert of every rank has a copy on the next rank
        ranks = [r for r, _ in plan.replicas(0, e)]
        assert len(ranks) == 2 and ranks[1] == (ranks[0] + 1) % 4
    assert int(plan.logcnt.sum()) == 3 * 12
    with pytest.raises(ValueError, match="evenly"):
        initial_placement(1, 8, 4, 3)


def test_placement_from_maps_round_trips_and_rejects_inconsistent_maps():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    plan = placement_from_maps(phy2log.tolist(), log2phy.tolist(), 8)  # as train_state.json holds them
    assert torch.equal(plan.logcnt, logcnt) and torch.equal(plan.log2phy, log2phy)
    bad = log2phy.clone()
    bad[0, 0, 0] = int(log2phy[0, 1, 0])  # expert 0's slot now names a slot of expert 1
    with pytest.raises(ValueError, match="disagree"):
        placement_from_maps(phy2log, bad, 8)
    with pytest.raises(ValueError, match="outside"):
        placement_from_maps(phy2log + 20, log2phy, 8)
