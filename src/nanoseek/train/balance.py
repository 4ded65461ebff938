"""Auxiliary-loss-free load balancing (V3 report section 2.1.2, eq. 16; gamma 0.001 in section 4.2).

Each routed expert i carries a bias b_i added to its affinity for top-k *selection* only. After every
optimizer step, with the tokens each expert received during that step (summed over micro-batches and
all-reduced across ranks), the sign rule moves b_i by gamma: down for an overloaded expert (load above
the mean), up for an underloaded one. The biases are then re-centred to mean 0 per layer: only their
differences matter for top-k, and re-centring stops the common drift of all biases together.

The update runs in an optimizer step post-hook, so it happens exactly once per optimizer step and never
on a step that was skipped. max_vio (the paper's MaxVio) = max load / mean load - 1, averaged over the
MoE layers, is measured on the same loads before the update.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class BiasBalancer:
    """Applies the sign rule after each optimizer step and keeps the loads it saw for logging.

    Under pipeline parallelism a rank holds only some MoE layers: `moe_layers` then lists every MoE layer of
    the model in order, with None for the layers other stages hold. The loads travel as one [L, E] table
    (zeros where a rank does not hold the layer), so the all-reduce sums each layer's loads over exactly the
    ranks that route tokens through it, and max_vio is that of the whole model on every rank.
    """

    def __init__(self, moe_layers: list[nn.Module | None], speed: float,
                 all_reduce_sum: Callable[[torch.Tensor], None] | None = None):
        self.layers = [m for m in moe_layers if m is not None]
        self.slots = [i for i, m in enumerate(moe_layers) if m is not None]
        self.n_layers = len(moe_layers)
        self.n_experts = next((m.load.numel() for m in self.layers), 0)
        self.speed = speed
        self.all_reduce_sum = all_reduce_sum
        self.last_loads: torch.Tensor | None = None  # [L, E] fp32 of the last step
        self.last_max_vio: float = 0.0
        self.total_loads: torch.Tensor | None = None  # [L, E] summed since this process started
        self.device = self.layers[0].load.device if self.layers else torch.device("cpu")

    def attach(self, optimizer: torch.optim.Optimizer):
        """Register the update as an optimizer post-step hook; returns the removable handle."""
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())

    @torch.no_grad()
    def step(self) -> None:
        if not self.n_layers:
            return
        if len(self.layers) == self.n_layers:
            loads_LE = torch.stack([m.load.float() for m in self.layers])
        else:  # a pipeline stage: its layers' rows of the model's table (the all-reduce fills the others)
            if not self.n_experts:
                raise ValueError("a rank that holds no MoE layer cannot size the load table; "
                                 "set BiasBalancer.n_experts")
            loads_LE = torch.zeros(self.n_layers, self.n_experts, device=self.device)
            for i, m in zip(self.slots, self.layers):
                loads_LE[i] = m.load.float()
        if self.all_reduce_sum is not None:
            self.all_reduce_sum(loads_LE)  # every rank routes its own tokens: the global load is the sum
        self.last_loads = loads_LE.cpu()
        self.last_max_vio = max_vio(loads_LE)
        self.total_loads = self.last_loads.clone() if self.total_loads is None else self.total_loads + self.last_loads
        if self.speed > 0:
            for m, load_E in zip(self.layers, loads_LE[self.slots]):
                bias = m.gate.e_score_correction_bias
                # +gamma below the mean, -gamma above; an expert exactly at the mean keeps its bias.
                bias += self.speed * torch.sign(load_E.mean() - load_E).to(bias)
                bias -= bias.mean()
        for m in self.layers:
            m.load.zero_()


def max_vio(loads_LE: torch.Tensor) -> float:
    """Mean over layers of max load / mean load - 1 (0 = perfectly balanced); 0 for layers with no tokens."""
    mean_L = loads_LE.float().mean(dim=1)
    vio_L = torch.where(mean_L > 0, loads_LE.float().amax(dim=1) / mean_L.clamp_min(1e-12) - 1, 0.0)
    return float(vio_L.mean())
