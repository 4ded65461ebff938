"""Training (V3 report sections 2-4): run config, the one optimizer step every trainer uses (step.py), the
pretraining loop, optimizer and schedule, balancing, checkpoints, metrics.

`nanoseek train --config FILE --out DIR [--resume] [--set section.key=value ...]` (nanoseek.train.cli)
calls `train(load_run_config(FILE, sets), DIR, resume)`. Distributed (FSDP2 + expert parallelism) and
FP8 plug in through nanoseek.train.parallel and nanoseek.train.fp8, imported only when used.
"""

from nanoseek.train.config import RunConfig, load_run_config
from nanoseek.train.loop import train
from nanoseek.train.optim import OptimConfig
from nanoseek.train.schedule import Schedule
from nanoseek.train.step import NonFiniteLoss, TrainingError, TrainStep

__all__ = ["RunConfig", "load_run_config", "train", "TrainStep", "OptimConfig", "Schedule", "NonFiniteLoss",
           "TrainingError"]
