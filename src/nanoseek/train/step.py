"""One optimizer step, the same for every trainer: pretraining (nanoseek.train.loop), SFT (nanoseek.rl.sft),
GRPO (nanoseek.rl.trainer) and distillation (nanoseek.rl.distill, which fine-tunes its student with SFT).

`TrainStep(model, OptimConfig(...), bias_update_speed=..., dist=...)` owns AdamW (weight decay on matrices
only, nanoseek.train.optim), the learning-rate schedule (nanoseek.train.schedule) and the aux-loss-free
balancer (V3 report section 2.1.2), which runs as an optimizer post-step hook. Calling it with a step
index, that step's micro-batches and a loss function takes one optimizer step:

  1. the learning rate of the step, from the schedule;
  2. per micro-batch, `loss, metrics = loss_fn(micro_batch)` and the backward of loss / (number of
     micro-batches) (or of the loss itself with average=False, when each micro-batch's loss is already
     its share of the whole); under FSDP2 the gradient reduce-scatter runs on the last micro-batch only;
  3. the metrics averaged (or summed) over the micro-batches and averaged over the ranks under torchrun,
     read with one sync;
  4. a non-finite metric or gradient norm raises NonFiniteLoss naming the step, before anything is applied
     (the gradients and expert loads of that step are dropped);
  5. the global gradient norm clipped (over FSDP shards and expert-parallel ranks under torchrun,
     nanoseek.train.parallel.clip_grad_norm);
  6. AdamW's step, then the balancer moves the routing biases by this step's expert loads (speed 0: the
     loads are only measured, for max_vio, and the biases stay frozen, as GRPO wants).
It returns the averaged metrics plus lr, grad_norm, max_vio and tokens (the running count of what the
caller passed as `tokens`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from nanoseek.errors import NanoseekError
from nanoseek.train.balance import BiasBalancer
from nanoseek.train.optim import OptimConfig, build_optimizer, set_lr
from nanoseek.train.schedule import Schedule

# loss_fn(micro_batch) -> (the loss to backpropagate, {name: 0-dim tensor or float} to average and log)
LossFn = Callable[[Any], tuple[torch.Tensor, dict[str, Any]]]


class TrainingError(NanoseekError, RuntimeError):
    """A run that cannot start or continue; the message says why."""


class NonFiniteLoss(TrainingError, FloatingPointError):
    """A NaN or inf loss or gradient norm; the step was not applied. Exit status 1, not 2: the input was
    valid and the run started; it diverged (a lower learning rate usually cures it)."""

    exit_code = 1


class TrainStep:
    """The optimizer, schedule, clipping, NaN/inf guard and balancing of one trainer (see the module doc)."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, *, bias_update_speed: float = 0.0, dist: Any = None,
                 name: str = "", fused: bool | None = None, moe_layers: list | None = None):
        self.model, self.cfg, self.dist = model, cfg, dist
        self.world = dist.world if dist is not None else 1
        self.device = dist.device if dist is not None else next(model.parameters()).device
        self.prefix = f"{name}: " if name else ""
        self.schedule = Schedule.of(cfg)
        self.opt = build_optimizer(model, cfg, fused=fused)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.all_reduce = None
        if self.world > 1:
            from nanoseek.train.parallel import all_reduce_sum

            self.all_reduce = lambda x: all_reduce_sum(x, dist)  # noqa: E731
        # A pipeline stage passes every MoE layer of the model in order, None for those other stages hold.
        layers = model.moe_layers() if moe_layers is None else moe_layers
        self.balancer = BiasBalancer(layers, bias_update_speed, self.all_reduce)
        self.metric_ranks = self.world  # how many ranks' metrics the all-reduced sums add up
        self.balancer.attach(self.opt)
        model.reset_load()  # loads counted before this trainer are not its steps'
        self.tokens = 0
        self.start_clock()

    # ------------------------------------------------------------------ the step
    def __call__(self, step: int, micro_batches: Sequence[Any], loss_fn: LossFn, tokens: int = 0,
                 average: bool = True) -> dict[str, float]:
        """One optimizer step over `micro_batches`. average=False: each micro-batch's loss and metrics are
        already its share of the step's whole (normalised by the whole batch's counts, as GRPO's length
        buckets are), so they are summed instead of averaged."""
        n = len(micro_batches)
        if n == 0:
            raise ValueError("TrainStep needs at least one micro-batch")
        lr = self.schedule(step)
        set_lr(self.opt, lr)
        order, names, sums, floats = self.forward_backward(micro_batches, loss_fn, average)
        values = self._reduce(names, sums, floats)
        values = {k: values[k] for k in order}
        if not all(math.isfinite(v) for v in values.values()):
            self._drop()
            raise NonFiniteLoss(f"{self.prefix}non-finite loss at step {step + 1}: "
                                + ", ".join(f"{k}={v}" for k, v in values.items()))
        gn = self.clip()
        if not math.isfinite(gn):
            self._drop()
            raise NonFiniteLoss(f"{self.prefix}non-finite gradient norm ({gn}) at step {step + 1} "
                                f"(loss={values.get('loss')})")
        self.opt.step()  # the balancer's post-hook updates the routing biases here
        self.opt.zero_grad(set_to_none=True)
        self.tokens += tokens
        return {**values, "lr": lr, "grad_norm": gn, "max_vio": self.balancer.last_max_vio, "tokens": self.tokens}

    def forward_backward(self, micro_batches: Sequence[Any], loss_fn: LossFn, average: bool = True):
        """Steps 2-3: the backward of every micro-batch's loss / n (of the loss itself with average=False);
        returns (metric names in order, the tensor-valued ones, their micro-batch means (sums) as one tensor,
        the float-valued means (sums)). nanoseek.train.pipeline overrides it with a pipeline schedule."""
        n = len(micro_batches)
        div = n if average else 1  # a division, as before: averaged steps keep their numbers to the bit
        sync = getattr(self.model, "set_requires_gradient_sync", None)  # FSDP2
        order: list[str] = []
        names: list[str] = []
        sums: torch.Tensor | None = None
        floats: dict[str, float] = {}
        for i, mb in enumerate(micro_batches):
            if sync is not None:
                sync(i == n - 1)
            loss, metrics = loss_fn(mb)
            (loss / div).backward()
            if sums is None:
                order = list(metrics)
                names = [k for k in order if isinstance(metrics[k], torch.Tensor)]
                sums = torch.zeros(len(names), device=self.device)
            if names:
                sums += torch.stack([metrics[k] for k in names]).detach().float() / div
            for k in order:
                if k not in names:
                    floats[k] = floats.get(k, 0.0) + float(metrics[k]) / div
        return order, names, sums, floats

    def _reduce(self, names: list[str], sums: torch.Tensor | None, floats: dict[str, float]) -> dict[str, float]:
        """The micro-batch means as floats, averaged over the ranks when there are several (one sync)."""
        if self.all_reduce is not None:
            if sums is not None and names:
                self.all_reduce(sums)
                sums /= self.metric_ranks
            if floats:
                t = torch.tensor(list(floats.values()), dtype=torch.float64, device=self.device)
                self.all_reduce(t)
                floats = dict(zip(floats, (t / self.metric_ranks).tolist()))
        out = dict(zip(names, sums.tolist())) if names and sums is not None else {}
        return {**out, **floats}

    def clip(self) -> float:
        """Clip the global gradient norm to cfg.grad_clip (0 = measure only); returns the norm before."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        if self.world > 1:
            from nanoseek.train.parallel import clip_grad_norm

            return float(clip_grad_norm(self.model, max_norm, self.dist))
        return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))

    def _drop(self) -> None:
        """Forget a step that will not be applied: its gradients and the expert loads it counted."""
        self.opt.zero_grad(set_to_none=True)
        for m in self.balancer.layers:
            m.load.zero_()

    # ------------------------------------------------------------------ throughput
    def start_clock(self) -> None:
        self._t0, self._tokens0 = time.perf_counter(), self.tokens

    def throughput(self) -> float:
        """Tokens per second since the previous call (or start_clock)."""
        now = time.perf_counter()
        tps = (self.tokens - self._tokens0) / max(now - self._t0, 1e-9)
        self._t0, self._tokens0 = now, self.tokens
        return tps
