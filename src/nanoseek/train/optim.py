"""AdamW with the V3 report's settings and the warm-up -> constant -> cosine learning-rate schedule.

V3 report section 4.2: AdamW with beta1 0.9, beta2 0.95, weight decay 0.1; the learning rate warms up
linearly, stays constant, then decays along a cosine to a tenth of its peak. Weight decay applies to
matrices only (linear, embedding and expert weights); norms, biases and other 1-D parameters are exempt.
The schedule is a pure function of the step, so resuming needs only the step (no scheduler object).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices (ndim >= 2) and undecayed 1-D parameters (norms, biases)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # The fused kernel updates each element with the same arithmetic however the parameters are grouped or
    # sharded (so resume and 1-vs-N-process runs stay exact) and is 2x faster than the per-tensor loop on a
    # CPU, where the optimizer step is memory-bound and a large part of an MoE step (every expert is updated).
    # FSDP2's DTensor parameters take the single-tensor path, which has the same per-element guarantee.
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    kind = {"foreach": False} if sharded else {"fused": True}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=1e-8, **kind)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, constant, cosine to min_lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = int(round(cfg.decay_frac * cfg.steps))
    decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
    if step < decay_start or cfg.steps <= decay_start:
        return cfg.lr
    frac = min(1.0, (step - decay_start) / max(1, cfg.steps - 1 - decay_start))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * frac))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


# ----------------------------------------------------------------------------- state by parameter name
def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW moments keyed `{exp_avg,exp_avg_sq,step}/{param name}`: a flat tensor dict for safetensors,
    independent of the param-group layout."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for p, st in optimizer.state.items():
        name = names[id(p)]
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                t = v.detach()
                out[f"{k}/{name}"] = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu().contiguous().clone()
    return out


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor]) -> None:
    """The inverse of optimizer_state; every trained parameter must have its moments."""
    params = dict(model.named_parameters())
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        kind, _, name = key.partition("/")
        if name not in params:
            raise ValueError(f"optimizer state for unknown parameter {name!r}")
        by_param.setdefault(name, {})[kind] = t
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in params.items() if id(p) in trained and n not in by_param]
    if by_param and missing:
        raise ValueError(f"optimizer state is missing parameter(s) {missing[:4]}")
    for name, st in by_param.items():
        p = params[name]
        optimizer.state[p] = {k: (v if k == "step" else v.to(device=p.device, dtype=p.dtype))
                              for k, v in st.items()}

