"""AdamW with the V3 report's settings, the optimizer settings every trainer shares, and AdamW state by name.

V3 report section 4.2: AdamW with beta1 0.9, beta2 0.95, weight decay 0.1. Weight decay applies to
matrices only (linear, embedding and expert weights); norms, biases and other 1-D parameters are exempt.
The learning-rate schedule is nanoseek.train.schedule; nanoseek.train.step runs the optimizer step.
Optimizer state is saved keyed by parameter name, so a checkpoint does not depend on how the parameters
are grouped or sharded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from nanoseek.train.schedule import Schedule


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


@dataclass(frozen=True)
class OptimConfig:
    """What every trainer's optimizer step needs: AdamW, the schedule and the clip. Pretraining takes these
    keys from [train]; SFT decays over all its steps (decay_frac 1), GRPO keeps the LR constant after its
    warm-up (decay_frac 0)."""
    lr: float
    steps: int
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_frac: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0       # 0 = no clipping

    @classmethod
    def of(cls, cfg: Any, **fixed: Any) -> "OptimConfig":
        """The fields `cfg` (a TrainConfig, SFTConfig, GRPOConfig...) has, then `fixed`."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{n: getattr(cfg, n) for n in names if hasattr(cfg, n)}, **fixed})


def build_optimizer(model: nn.Module, cfg: Any, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over param_groups(model) with cfg's lr, weight_decay, beta1 and beta2.

    fused=None chooses the fused kernel unless the parameters are FSDP2 DTensors. The fused kernel updates
    each element with the same arithmetic however the parameters are grouped or sharded (so resume and
    1-vs-N-process runs stay exact) and is faster than the per-tensor loop on a CPU, where the optimizer
    step is memory-bound and a large part of an MoE step (every expert is updated). DTensor parameters
    take the single-tensor path, which has the same per-element guarantee.
    """
    from torch.distributed.tensor import DTensor

    if fused is None:
        fused = not any(isinstance(p, DTensor) for p in model.parameters())
    kind = {"fused": True} if fused else {"foreach": False}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=1e-8, **kind)


def lr_at(step: int, cfg: Any) -> float:
    """Learning rate of optimizer step `step` (0-based) under cfg's schedule keys (see Schedule)."""
    return Schedule.of(cfg)(step)


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

