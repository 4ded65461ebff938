"""The learning-rate schedule of every trainer, and what it does when a resumed run changes it.

V3 report section 4.2: the learning rate warms up linearly, stays constant, then decays along a cosine
(to a tenth of its peak there). `Schedule` is that shape with one knob for the decay: the last
`decay_frac` of the steps decay, so `decay_frac = 1` is warm-up then cosine (SFT) and `decay_frac = 0` is
warm-up then constant (GRPO). The LR is a pure function of the step, so resuming needs only the step and
the schedule saved in the checkpoint (no scheduler object).

Extending a run. Resuming a finished or decaying run with more steps (or another lr, min_lr, warm-up or
decay) would recompute the shape for the new total and send the LR back up to its peak. The policy
`on_extend` says what happens instead, from the step s0 the run resumes at, where the LR was lr0:
  * "continue": the decay goes on from lr0 along a cosine to min_lr at the new last step (a finished run
    stays at min_lr). A run that had not begun its decay simply follows the new schedule (its decay
    moves to the end of the new total);
  * "rewarm": a new linear warm-up over warmup_steps from lr0 to the new schedule, then that schedule
    (continual pre-training's re-warming).
`resume_schedule` decides and returns a line saying which; the result is saved with the checkpoints, so
a run resumed again after an extension reproduces it exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

ON_EXTEND = ("continue", "rewarm")
SHAPE = ("lr", "steps", "warmup_steps", "decay_frac", "min_lr")  # the keys that define the curve


@dataclass(frozen=True)
class Schedule:
    lr: float
    steps: int
    warmup_steps: int = 0
    decay_frac: float = 0.0
    min_lr: float = 0.0
    # Set when a resumed run changed the schedule: the step it resumed at, the LR it had reached, the policy.
    extended_at: int | None = None
    extended_lr: float = 0.0
    on_extend: str = "continue"

    @classmethod
    def of(cls, cfg: Any) -> "Schedule":
        """The schedule of any config with lr and steps, and optionally warmup_steps, decay_frac, min_lr."""
        return cls(**{k: getattr(cfg, k) for k in SHAPE if hasattr(cfg, k)})

    def base(self, step: int) -> float:
        """The LR of optimizer step `step` (0-based) with no extension: warm-up, constant, cosine to min_lr."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_start = self.decay_start
        if step < decay_start or self.steps <= decay_start:
            return self.lr
        frac = min(1.0, (step - decay_start) / max(1, self.steps - 1 - decay_start))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * frac))

    @property
    def decay_start(self) -> int:
        return max(self.warmup_steps, self.steps - int(round(self.decay_frac * self.steps)))

    def __call__(self, step: int) -> float:
        s0 = self.extended_at
        if s0 is None or step < s0:
            return self.base(step)
        lr0 = self.extended_lr
        if self.on_extend == "rewarm":
            k = step - s0
            if k < self.warmup_steps:
                return lr0 + (self.base(step) - lr0) * (k + 1) / self.warmup_steps
            return self.base(step)
        frac = min(1.0, (step - s0) / max(1, self.steps - 1 - s0))
        return self.min_lr + 0.5 * (lr0 - self.min_lr) * (1.0 + math.cos(math.pi * frac))

    def decaying(self, step: int) -> bool:
        """Whether the LR of `step` has come down from the peak after the warm-up (or an extension)."""
        if self.extended_at is not None and step >= self.extended_at:
            if self.on_extend == "continue":
                return True  # a cosine from where the run was, never above the peak
            return step - self.extended_at >= self.warmup_steps and self(step) < self.lr
        return step >= self.warmup_steps and self(step) < self.lr

    def shape(self) -> tuple:
        return tuple(getattr(self, k) for k in SHAPE)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schedule":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def resume_schedule(saved: Schedule | None, new: Schedule, step: int, on_extend: str,
                    key: str = "train") -> tuple[Schedule, str | None]:
    """(the schedule to use from `step` on, a line saying what changed or None).

    `saved` is the checkpoint's schedule (None when the checkpoint predates saved schedules: then the
    configured one is taken as is), `new` the configured one. An unchanged shape keeps the saved schedule,
    extension included, so an interrupted extended run resumes exactly.
    """
    if on_extend not in ON_EXTEND:
        raise ValueError(f"{key}.schedule_on_extend must be one of {ON_EXTEND}, got {on_extend!r}")
    if saved is None or saved.shape() == new.shape():
        return (saved or new), None
    lr0 = saved(step)
    changes = ", ".join(f"{key}.{k} {getattr(saved, k)} -> {getattr(new, k)}" for k in SHAPE
                        if getattr(saved, k) != getattr(new, k))
    head = f"schedule changed on resume at step {step} ({changes}): "
    other = '"rewarm" warms up again' if on_extend == "continue" else '"continue" keeps decaying instead'
    tail = f" ({key}.schedule_on_extend = \"{on_extend}\"; {other})"
    if on_extend == "rewarm":
        sched = dataclasses.replace(new, extended_at=step, extended_lr=lr0, on_extend="rewarm")
        if new.warmup_steps:
            what = (f"a new warm-up from lr {lr0:.3g} over {new.warmup_steps} steps to {sched(step + new.warmup_steps - 1):.3g}, "
                    f"then the schedule of {new.steps} steps")
        else:
            what = f"no warm-up steps, so the lr moves from {lr0:.3g} to {sched(step):.3g} at once"
    elif saved.decaying(step):
        sched = dataclasses.replace(new, extended_at=step, extended_lr=lr0, on_extend="continue")
        if lr0 <= new.min_lr:
            what = f"the decay had finished, so the lr stays at min_lr {new.min_lr:.3g} to step {new.steps}"
        else:
            what = f"the lr continues its decay from {lr0:.3g} to min_lr {new.min_lr:.3g} at step {new.steps}"
    else:
        sched = new
        what = f"the decay had not begun, so the new schedule applies: lr {lr0:.3g} -> {new(step):.3g} at step {step + 1}"
        if new.decay_frac:
            what += f", cosine decay from step {new.decay_start} to {new.steps}"
    return sched, head + what + tail
