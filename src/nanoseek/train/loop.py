"""The pretraining loop (V3 report sections 2-4): data, model, bf16 autocast, MTP and balance losses,
metrics, atomic checkpoints and exact resume. The optimizer step itself (AdamW, the warm-up/constant/cosine
schedule, gradient accumulation, clipping, the NaN/inf guard, aux-loss-free bias updates) is
nanoseek.train.step's, shared with SFT and GRPO.

One process or many: under torchrun, `nanoseek.train.parallel` (imported only then) provides
`init_distributed() -> Dist`, `parallelize(model, run_cfg, dist)` (FSDP2 + expert parallelism),
`all_reduce_sum(tensor, dist)`, `clip_grad_norm(model, max_norm, dist)`, and for checkpoints
`gather_full_state(model, optimizer, dist) -> (model_state, optim_state)` and
`load_full_state(model, optimizer, model_state, optim_state, dist)`, with optim_state in the flat
`{kind}/{param name}` layout of nanoseek.train.optim.optimizer_state.
`nanoseek.train.fp8.enable_fp8(model, fp8_cfg)` swaps in FP8 linears when fp8.enabled.

The global batch of step s is PackedDataset.batch(s, batch_size, ...) whatever the world size: rank r
takes its contiguous rows, splits them into micro-batches of micro_batch_size, and averages the gradient
over them (FSDP averages over ranks). Every per-step quantity is a pure function of the step and the
state saved in the checkpoint, which is what makes a resumed run reproduce the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoseek.config import ConfigError
from nanoseek.data import PackedDataset
from nanoseek.device import autocast_dtype, device_peak_flops, resolve_device
from nanoseek.model import Transformer
from nanoseek.train import checkpoint as ckpt
from nanoseek.train import dsa
from nanoseek.train.config import RunConfig
from nanoseek.train.metrics import MetricsLogger, plot_expert_load, plot_loss, truncate_metrics
from nanoseek.train.optim import OptimConfig, load_optimizer_state, optimizer_state
from nanoseek.train.prepare import prepare_data
from nanoseek.train.schedule import Schedule, resume_schedule
from nanoseek.train.step import NonFiniteLoss, TrainingError, TrainStep

__all__ = ["Trainer", "train", "NonFiniteLoss", "TrainingError"]


@dataclass
class LocalDist:
    """The single-process stand-in for nanoseek.train.parallel.Dist (same fields)."""
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str | None = None


# ----------------------------------------------------------------------------- processes
def init_dist(cfg: RunConfig):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from nanoseek.train.parallel import init_distributed

        dist = init_distributed()
    else:
        dist = LocalDist(0, 1, 0, resolve_device(cfg.train.device, "train.device"))
    if dist.world % cfg.parallel.ep:
        raise ConfigError(f"parallel.ep={cfg.parallel.ep} must divide the number of processes ({dist.world})")
    return dist


def saved_schedule(state: dict) -> Schedule | None:
    """The LR schedule a checkpoint was trained with (older checkpoints: from their run config's [train])."""
    if "schedule" in state:
        return Schedule.from_dict(state["schedule"])
    train = state.get("run_config", {}).get("train")
    return Schedule.from_dict(train) if isinstance(train, dict) else None


def moe_layer_names(model: Transformer) -> list[str]:
    cfg = model.config
    names = [f"layer {i}" for i, moe in enumerate(cfg.is_moe_layer) if moe]
    names += [f"mtp {k}" for k, m in enumerate(model.mtp) if m.mlp in model.moe_layers()]
    return names if len(names) == len(model.moe_layers()) else [f"moe {i}" for i in range(len(model.moe_layers()))]


# ----------------------------------------------------------------------------- the run
class Trainer:
    """One pretraining run in DIR: setup (data, model, the TrainStep, resume), run (the loop), checkpoints
    and the final export. train() below is the usual way in."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out_dir), progress
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.dist = init_dist(cfg)
        self.main = self.dist.rank == 0
        self.device = self.dist.device
        self.amp = autocast_dtype(t.dtype, self.device)
        W = self.dist.world
        self.pipe = None  # nanoseek.train.pipeline.Pipeline when parallel.pp > 1
        if cfg.parallel.pp > 1:  # the batch is split over the data-parallel ranks of a stage, world / pp
            from nanoseek.train.pipeline_plan import microbatches

            self.accum, note = microbatches(cfg, W)  # checks the layout against the world and the schedule
            if note:
                self.log(note)
            self.data_world = W // cfg.parallel.pp
            self.data_rank = self.dist.rank % self.data_world
            self.per_rank = t.batch_size // self.data_world
            self.micro = self.per_rank // self.accum
        else:
            if t.batch_size % W:
                raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by the number of processes ({W})")
            self.data_world, self.data_rank = W, self.dist.rank
            self.per_rank = t.batch_size // W
            self.micro = t.micro_batch_size or self.per_rank
            if self.per_rank % self.micro:
                raise ConfigError(f"the per-process batch ({t.batch_size} / {W} = {self.per_rank}) must be a multiple "
                                  f"of train.micro_batch_size ({self.micro})")
            self.accum = self.per_rank // self.micro
        self.ckpt_root = self.out / "checkpoints"

    def log(self, msg: str) -> None:
        if self.main:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stderr)

    def _barrier(self) -> None:
        if self.dist.world > 1:
            torch.distributed.barrier()

    def setup(self, resume: bool) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        if not resume and ckpt.list_checkpoints(self.ckpt_root):
            raise TrainingError(f"{self.out} already holds checkpoints: pass --resume to continue that run, "
                                "or choose another --out")
        self._prepare_data()
        self.model = self._build_model()
        speed = cfg.moe.bias_update_speed if cfg.dsa.stage != "warmup" else 0.0  # the warm-up freezes the model
        if self.pipe is not None:
            from nanoseek.train.pipeline import PipelineStep

            self.stepper = PipelineStep(self.pipe, OptimConfig.of(t), bias_update_speed=speed, dist=self.dist)
        else:
            self.stepper = TrainStep(self.model, OptimConfig.of(t), bias_update_speed=speed, dist=self.dist)
        self.step = 0
        if resume:
            self._resume()
        if self.main:  # after the resume: a config that cannot continue the run leaves the saved one as it was
            cfg.save(self.out, self.model_cfg)
            truncate_metrics(self.out / "metrics.jsonl", self.step)  # drop what a killed run logged after its checkpoint
        from nanoseek.accounting import training_flops_per_token

        self.flops_per_token = training_flops_per_token(self.model_cfg, t.seq_len)
        self.peak = device_peak_flops(self.device, self.amp) * self.dist.world if self.main else 0.0

    def _prepare_data(self) -> None:
        """Tokenizer and token shards (rank 0 builds them, the others wait and read)."""
        cfg = self.cfg
        data_cfg = cfg.data
        if cfg.train.init_from and data_cfg.tokenizer == "train":  # the starting model's own tokenizer
            data_cfg = dataclasses.replace(data_cfg, tokenizer=cfg.train.init_from)
        if self.main:
            prepare_data(data_cfg, self.out, progress=self.progress, log=self.log)
        self._barrier()
        tok, self.tok_dir, data_dir = prepare_data(data_cfg, self.out, progress=False, log=lambda m: None)
        self.data = PackedDataset(data_dir, cfg.train.seq_len)
        self.model_cfg = cfg.model_config(vocab_size=tok.vocab_size)
        if self.model_cfg.vocab_size < tok.vocab_size:
            raise ConfigError(f"train.init_from: the model's vocabulary ({self.model_cfg.vocab_size}) is smaller "
                              f"than the tokenizer's ({tok.vocab_size})")

    def _build_model(self) -> Transformer:
        """The seeded model on this process's device, with FP8 and FSDP2 + EP applied from outside."""
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        random.seed(t.seed)
        model = Transformer(self.model_cfg)
        model.init_weights(seed=t.seed)
        if t.init_from:
            from nanoseek.hf import load

            model.load_state_dict(load(t.init_from, dtype=torch.float32).state_dict())
            self.log(f"weights from {t.init_from} (train.init_from; the model config is its config.json)")
        self.n_params = model.num_params()
        self.n_trained = dsa.apply_stage(model, cfg.dsa)
        if cfg.dsa.stage != "off":
            self.log(f"V3.2 indexer training, stage {cfg.dsa.stage}: {self.n_trained:,} trained parameters")
        model.to(self.device)
        if cfg.fp8.enabled:
            from nanoseek.train.fp8 import enable_fp8

            model = enable_fp8(model, cfg.fp8) or model  # it may convert in place and return None
        if cfg.parallel.pp > 1:
            from nanoseek.train.pipeline import build_pipeline

            self.pipe = build_pipeline(model, cfg, self.dist, self.amp)
            model = self.pipe.shell  # this rank's stages only; state-dict names are the full model's
        elif self.dist.world > 1:
            from nanoseek.train.parallel import parallelize

            model = parallelize(model, cfg, self.dist)
        model.train()
        return model

    def _resume(self) -> None:
        path = ckpt.latest_valid(self.ckpt_root, warn=lambda m: self.log(f"warning: {m}"))
        if path is None:
            self.log(f"no valid checkpoint in {self.ckpt_root}: starting from step 0")
        else:
            self._restore(path)
        self._barrier()  # every rank has chosen before rank 0 renames anything
        if self.main:
            for p in ckpt.set_aside(self.ckpt_root, self.step):
                self.log(f"warning: set the invalid checkpoint aside as {p}")

    def _restore(self, path: Path) -> None:
        if self.pipe is not None:
            from nanoseek.train import pipeline_state

            pipeline_state.load_checkpoint(path, self.pipe, self.stepper.opt)
            rng, state = ckpt.read_rng_and_state(path)
            self._resumed(path, rng, state)
            return
        model_state, optim_state, rng, state = ckpt.load_checkpoint(path)
        for warning in ckpt.check_resumable(path, model_state, self.model_cfg):  # another model: an error
            self.log(f"warning: {warning}")
        opt = self.stepper.opt
        if self.dist.world > 1:
            from nanoseek.train.parallel import load_full_state

            replicas = getattr(self.dist, "replicas", None)
            # Checkpoints hold logical experts; the placement only says which slots serve which tokens.
            if replicas is not None and not replicas.load_state_dict(state.get("eplb") or {}):
                self.log("the checkpoint has no placement for this layout of redundant experts: starting from "
                         "the initial placement")
            load_full_state(self.model, opt, model_state, optim_state, self.dist)
        else:
            self.model.load_state_dict(model_state)
            load_optimizer_state(self.model, opt, optim_state)
        self._resumed(path, rng, state)

    def _resumed(self, path: Path, rng: dict, state: dict) -> None:
        t = self.cfg.train
        for key in ("batch_size", "seq_len", "seed"):
            if state.get(key) != getattr(t, key):
                self.log(f"warning: train.{key} is {getattr(t, key)} but the checkpoint was trained with "
                         f"{state.get(key)}: the resumed run will not match an uninterrupted one")
        ckpt.set_rng_state(rng)
        self.step, self.stepper.tokens = int(state["step"]), int(state["tokens"])
        self.log(f"resumed from {path} (step {self.step})")
        self.stepper.schedule, change = resume_schedule(saved_schedule(state), self.stepper.schedule, self.step,
                                                        t.schedule_on_extend)
        if change:
            self.log(change)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, step: int) -> dict:
        t = self.cfg.train
        x, y = self.data.batch(step, t.batch_size, self.data_rank, self.data_world, seed=t.seed)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        m = self.micro
        micro_batches = [(x[i * m:(i + 1) * m], y[i * m:(i + 1) * m]) for i in range(self.accum)]
        loss = None if self.pipe is not None else self._loss  # a pipeline computes it on its last stage
        return self.stepper(step, micro_batches, loss, tokens=t.batch_size * t.seq_len)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        amp = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with amp:
            out = self.model.forward_train(*batch, mtp_weight=cfg.mtp.loss_weight, aux_alpha=cfg.moe.seq_aux_alpha)
        metrics = {"loss": out.lm_loss, "mtp_loss": out.mtp_loss, "aux_loss": out.aux_loss}
        if cfg.dsa.stage == "off":
            return out.loss, metrics
        loss, kl = dsa.stage_loss(self.model, out.loss, cfg.dsa)
        return loss, {**metrics, "indexer_kl": kl}

    # ------------------------------------------------------------------ checkpoints and exports
    def _full_model(self):
        """(a model holding the full weights on rank 0 or None elsewhere, the flat optimizer state)."""
        if self.dist.world == 1:
            return self.model, optimizer_state(self.model, self.stepper.opt)
        from nanoseek.train.parallel import gather_full_state

        model_state, optim_state = gather_full_state(self.model, self.stepper.opt, self.dist)
        if not self.main:
            return None, None
        full = Transformer(self.model_cfg)  # on CPU; its own init is overwritten right away
        full.load_state_dict(model_state)
        return full, optim_state

    def save(self, step: int) -> None:
        t = self.cfg.train
        state = {"tokens": self.stepper.tokens, "batch_size": t.batch_size, "seq_len": t.seq_len, "seed": t.seed,
                 "data_position": {"step": step, "seed": t.seed, "batch_size": t.batch_size},
                 "world": self.dist.world, "schedule": self.stepper.schedule.to_dict(),
                 "run_config": self.cfg.to_dict()}
        if getattr(self.dist, "replicas", None) is not None:
            state["eplb"] = self.dist.replicas.state_dict()
        if self.pipe is not None:  # every stage writes its own shard
            from nanoseek.train import pipeline_state

            path = pipeline_state.save_checkpoint(self.ckpt_root, step, self.pipe, self.stepper.opt, state,
                                                  self.tok_dir, t.keep_last)
            self.log(f"step {step}: checkpoint {path}")
            return
        model, optim_state = self._full_model()
        if self.main:
            path = ckpt.save_checkpoint(self.ckpt_root, step, model, optim_state, state, self.tok_dir, t.keep_last)
            self.log(f"step {step}: checkpoint {path}")
        self._barrier()

    def export_final(self) -> Path:
        """DIR/final: the trained model as a HF directory with its tokenizer (write, then rename)."""
        from nanoseek.hf import save as save_hf

        if self.pipe is not None:
            from nanoseek.train import pipeline_state

            return pipeline_state.export(self.out, self.pipe, self.tok_dir)
        model, _ = self._full_model() if self.dist.world > 1 else (self.model, None)
        final = self.out / "final"
        if self.main:
            tmp = self.out / f".tmp-final-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            save_hf(model, tmp, tokenizer_dir=self.tok_dir)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        self._barrier()
        return final

    def plots(self) -> None:
        plot_loss(self.out / "metrics.jsonl", self.out / "loss.png")
        loads = self.stepper.balancer.total_loads
        if loads is not None:
            names = self.pipe.moe_names() if self.pipe is not None else moe_layer_names(self.model)
            plot_expert_load(loads, names, self.out / "expert_load.png",
                             f"expert load, steps {self.first_step + 1}-{self.step}")

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        from tqdm.auto import tqdm

        t = self.cfg.train
        self.first_step = self.step
        logger = MetricsLogger(self.out) if self.main else None
        bar = tqdm(total=t.steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0,
                   disable=not (self.main and self.progress))
        if self.pipe is not None:
            p = self.pipe
            self.log(f"pipeline: pp={p.pp} x dp={p.dp} (ep={p.ep}), {p.plan.schedule}, {p.plan.n_stages} stages with "
                     f"{[len(x) for x in p.plan.layers]} layers; this rank runs stages {p.local}")
        self.log(f"{self.model_cfg.num_hidden_layers} layers, {self.n_params:,} parameters, "
                 f"vocab {self.model_cfg.vocab_size}; {self.dist.world} process(es) on {self.device}, "
                 f"{'bf16 autocast' if self.amp else 'fp32'}; global batch {t.batch_size} x {t.seq_len} tokens "
                 f"({self.accum} micro-batch(es) of {self.micro} per process)")
        self.stepper.start_clock()
        try:
            for step in range(self.step, t.steps):
                rec = self.train_step(step)
                self.step = done = step + 1
                self._eplb(done)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", refresh=False)
                if done == 1 or done % t.log_every == 0 or done == t.steps:
                    rec = self._log_step(done, rec, logger)
                    if not self.progress:  # no bar: the same numbers as a log line
                        self.log(f"step {done}/{t.steps}: loss {rec['loss']:.4f}, lr {rec['lr']:.2e}, "
                                 f"{rec['tokens_per_s']:.0f} tok/s, MFU {rec['mfu']:.1%}, max_vio {rec['max_vio']:.2f}")
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                    mfu=f"{rec['mfu']:.1%}", max_vio=f"{rec['max_vio']:.2f}")
                if done == t.steps or (t.save_every and done % t.save_every == 0):
                    self.save(done)
        finally:
            bar.close()
            if logger:
                logger.close()
        self.export_final()
        if self.main:
            self.plots()

    def _eplb(self, done: int) -> None:
        """Redundant experts: add the step's loads to the window; every parallel.eplb_interval steps, EPLB
        re-places the replicas (nanoseek.train.expert_replicas)."""
        replicas = getattr(self.dist, "replicas", None)
        if replicas is None or self.stepper.balancer.last_loads is None:
            return
        replicas.observe(self.stepper.balancer.last_loads)
        if replicas.due(done):
            from nanoseek.train.eplb import imbalance

            window, old = replicas.window.clone(), replicas.placement
            new = replicas.rebalance(self.model, self.stepper.opt, self.dist)
            self.log(f"step {done}: EPLB re-placed {replicas.redundant} redundant experts; on the last "
                     f"{replicas.interval} steps' loads, max/mean tokens per EP rank "
                     f"{float(imbalance(old.rank_loads(window)).mean()):.3f} -> "
                     f"{float(imbalance(new.rank_loads(window)).mean()):.3f}")

    def _log_step(self, done: int, rec: dict, logger: MetricsLogger | None) -> dict:
        """The step's metrics.jsonl record: the step's own, throughput since the last log, MFU."""
        tps = self.stepper.throughput()
        rec = {"step": done, **rec, "tokens_per_s": tps,
               "mfu": self.flops_per_token * tps / self.peak if self.peak else 0.0}
        if logger:
            logger.log(rec)
        return rec


def train(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Run (or continue) a pretraining run; returns DIR/final. Raises NonFiniteLoss, ConfigError, TrainingError.
    Under torchrun the process group is destroyed on the way out, whether the run finished or raised."""
    try:
        trainer = Trainer(cfg, out_dir, progress=progress)
        trainer.setup(resume)
        if trainer.step >= cfg.train.steps and (Path(out_dir) / "final" / "config.json").exists():
            trainer.log(f"the run is already complete ({trainer.step} steps)")
            return Path(out_dir) / "final"
        trainer.run()
        return Path(out_dir) / "final"
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from nanoseek.train.parallel import destroy

            destroy()
