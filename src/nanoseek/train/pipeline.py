"""Pipeline parallelism (V3 report section 3.2.1) on PyTorch's own engine, `torch.distributed.pipelining`,
composed with FSDP2 and expert parallelism (nanoseek.train.parallel) on one DeviceMesh.

Layout. The world is a (pp, dp/ep, ep) mesh ("pp", "dp_exp", "ep"), pipeline outermost: the ranks of one
stage are neighbours, and an EP group lies inside one stage (its ranks route that stage's tokens). Within
a stage the non-expert weights are FSDP2-sharded over the stage's dp ranks (nothing to shard when dp = 1)
and the routed experts are split over the EP group, as parallelize() does for the whole model.

Stages. The decoder layers are split into pp x v stages by a layer plan (as even as possible, or
`parallel.pp_layers`; nanoseek.train.pipeline_plan). Stage 0 also holds the embedding; the last stage the
final norm, the head and the MTP module(s). With the V-shaped schedules (ZBVZeroBubble, DualPipeV) the
first and last stages share rank 0, as in V3's DualPipe.

MTP and shared weights. MTP depth k embeds token i+k with the main model's embedding and predicts through
the main head (V3 section 2.2). The head is on the last stage with MTP. The embedding is needed by stage 0
and by the last stage: with a V-shaped schedule both stages are on rank 0 and use the same nn.Embedding,
physically shared, exactly as in one process. With the other schedules the last rank holds a copy; after
the backward the two copies' gradients are summed over the ranks holding them (one all-reduce, the same sum
in the same order on both), so both see the full gradient of the one-process model, take identical AdamW
steps and stay identical; the gradient norm counts the pair once, a checkpoint stores the stage-0 copy.
(The same mechanism covers tie_word_embeddings.) Shared weights are kept out of FSDP (replicated over dp,
their gradients averaged by the same all-reduce), because one FSDP unit cannot belong to two stage roots.

Loss. Micro-batch m's loss is that of one process, lm + w * mtp + aux, computed on the last stage by
Transformer.train_losses; the balance loss of every stage's MoE layers travels down the pipeline as a
second activation (a [1] tensor) so its gradient reaches each layer. The schedule runs with
scale_grads=False and a loss of loss_m / n, i.e. the backward of one process's mean over micro-batches;
masked (-100) targets are handled inside each micro-batch's mean, as in one process. The metrics are the
last stage's micro-batch means, averaged over the dp ranks. torch.distributed.pipelining needs equal
micro-batch shapes: the per-rank batch is split into n equal micro-batches.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from nanoseek.config import ConfigError
from nanoseek.model import Transformer
from nanoseek.train.pipeline_plan import V_SHAPED, StagePlan, make_plan, microbatches, schedule_class
from nanoseek.train.step import TrainStep

METRICS = ("loss", "mtp_loss", "aux_loss")

# ----------------------------------------------------------------------------- stage modules
class _HeldElsewhere(nn.Module):
    """Stands in for a decoder block another pipeline rank holds (keeps the state-dict names of the others)."""
    mlp = None


class StageModule(nn.Module):
    """One pipeline stage: [embedding] + its decoder blocks + [final norm, head, MTP module(s)].

    forward(ids) on stage 0, forward(h, aux) on the others, with the micro-batch's token ids as the keyword
    `ids` on every stage (the MTP modules on the last one embed tokens i+k). Returns (h [B,T,D], aux [1]) or,
    on the last stage, (logits [B,T,V], MTP logits [B,T-k,V] per depth..., aux [1]).
    """

    def __init__(self, shell: Transformer, index: int, plan: StagePlan, aux_alpha: float, amp: torch.dtype | None):
        super().__init__()
        self.index, self.first, self.last = index, index == 0, index == plan.n_stages - 1
        self.blocks = nn.ModuleDict({str(i): shell.layers[i] for i in plan.layers[index]})
        if self.first or (self.last and len(shell.mtp)):
            self.embed_tokens = shell.embed_tokens
        if self.last:
            self.norm, self.lm_head, self.mtp = shell.norm, shell.lm_head, shell.mtp
        self.aux_alpha, self.amp = aux_alpha, amp
        # The pruned model, unregistered (a tuple hides it from nn.Module): its rotary table and MTP loop
        # run on modules this stage registers itself.
        self._model = (shell,)

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None, ids: torch.Tensor | None = None):
        model = self._model[0]
        amp = torch.autocast(x.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with amp:
            if self.first:
                h = self.embed_tokens(x)
                aux = torch.zeros(1, device=x.device, dtype=torch.float32)
            else:
                h = x
            cos, sin = model.rotary(torch.arange(h.shape[1], device=h.device))
            for block in self.blocks.values():
                h, a = block(h, cos, sin, aux_alpha=self.aux_alpha)
                if a is not None:
                    aux = aux + a
            if not self.last:
                return h, aux
            logits = self.lm_head(self.norm(h))
            mtp_logits = []
            for _, mod, hk, a in model.mtp_hidden_states(h, ids, self.aux_alpha):
                mtp_logits.append(self.lm_head(mod.shared_head.norm(hk)))
                if a is not None:
                    aux = aux + a
        return (logits, *mtp_logits, aux)


def _prune(model: Transformer, plan: StagePlan, pp_rank: int) -> Transformer:
    """Drop (in place) what this rank's stages do not run; state-dict names stay those of the full model."""
    mine = plan.stages_of(pp_rank)
    keep = {i for s in mine for i in plan.layers[s]}
    for i in range(len(model.layers)):
        if i not in keep:
            model.layers[i] = _HeldElsewhere()
    first, last = 0 in mine, plan.n_stages - 1 in mine
    if not first and not (last and len(model.mtp)) and not (last and model.config.tie_word_embeddings):
        model.embed_tokens = None
    if not last:
        model.norm = None
        model.lm_head = None
        model.mtp = nn.ModuleList()
    return model


# ----------------------------------------------------------------------------- this rank's pipeline
@dataclass
class GradSync:
    """Parameters whose gradients Pipeline all-reduces itself over `group`, then divides by `mean_over`;
    `replicas` ranks hold identical copies (for the gradient norm); `shared`: one weight used by two stages."""
    params: list[nn.Parameter]
    group: object | None
    replicas: int
    mean_over: int
    shared: bool = False


class Pipeline:
    """This rank's part of a pipelined Transformer: the pruned model (`shell`, whose state-dict names are
    the full model's), its stage modules, the schedule, and the groups that tie the copies together."""

    def __init__(self, model: Transformer, run_cfg, dist, amp: torch.dtype | None = None):
        from torch.distributed.device_mesh import init_device_mesh

        par, t = run_cfg.parallel, run_cfg.train
        cfg = model.config
        self.cfg, self.dist = cfg, dist
        self.n_micro, self.note = microbatches(run_cfg, dist.world)
        self.pp, self.ep = par.pp, par.ep
        self.dp = dist.world // self.pp
        self.per_micro = t.batch_size // self.dp // self.n_micro  # rows; the schedule's buffers have fixed shapes
        self.plan = make_plan(cfg.num_hidden_layers, self.pp, par.pp_schedule, par.pp_virtual_stages, par.pp_layers)
        self.mtp_weight, self.aux_alpha, self.seq_len = run_cfg.mtp.loss_weight, run_cfg.moe.seq_aux_alpha, t.seq_len
        if self.ep > 1 and (not model.moe_layers() or cfg.n_routed_experts % self.ep):
            raise ConfigError(f"parallel.ep={self.ep} must divide n_routed_experts={cfg.n_routed_experts}")
        dev = dist.device.type
        mesh = init_device_mesh(dev, (self.pp, self.dp // self.ep, self.ep), mesh_dim_names=("pp", "dp_exp", "ep"))
        self.mesh = mesh
        self.pp_rank = mesh.get_local_rank("pp")
        self.dp_rank = dist.rank % self.dp
        self.pp_group = mesh.get_group("pp")
        dist.mesh, dist.ep = mesh, self.ep
        dist.ep_rank = mesh.get_local_rank("ep")
        dist.ep_group = mesh.get_group("ep") if self.ep > 1 else None
        self.moe_slots = model.moe_layers()  # every MoE layer of the model, in order (before pruning)
        self.shell = _prune(model, self.plan, self.pp_rank).to(dist.device)
        self.moe_slots = [m if any(m is x for x in self.shell.moe_layers()) else None for m in self.moe_slots]
        self.local = self.plan.stages_of(self.pp_rank)
        self.modules = [StageModule(self.shell, s, self.plan, self.aux_alpha, amp) for s in self.local]
        self.syncs = self._shared_groups()  # gradients this class all-reduces itself (shared, replicated)
        self._parallelize(par.fsdp)
        self.records: list[tuple[torch.Tensor, ...]] = []
        self.schedule = self._build_schedule(amp)

    # ------------------------------------------------------------------ layout
    def moe_names(self) -> list[str]:
        cfg = self.cfg
        names = [f"layer {i}" for i, moe in enumerate(cfg.is_moe_layer) if moe]
        names += [f"mtp {k}" for k in range(len(self.moe_slots) - len(names))]
        return names

    def _shared_groups(self) -> list[GradSync]:
        """The weights that stages on two ranks (or two stages of one rank) use: the embedding when there is
        MTP or a tied head. Their copies' gradients are summed over the holding ranks, averaged over dp."""
        plan, cfg, dp = self.plan, self.cfg, self.dp
        if not (cfg.num_nextn_predict_layers or cfg.tie_word_embeddings):
            return []  # only stage 0 uses the embedding: an ordinary (FSDP-sharded) parameter
        holders = {plan.rank_of[0], plan.rank_of[-1]}
        ranks = sorted(p * dp + d for p in holders for d in range(dp))
        group = tdist.new_group(ranks) if len(ranks) > 1 else None  # every rank creates every group
        if self.pp_rank not in holders:
            return []
        return [GradSync([self.shell.embed_tokens.weight], group, len(ranks), dp, shared=True)]

    def _parallelize(self, shard: bool) -> None:
        from torch.distributed.fsdp import fully_shard

        from nanoseek.train.parallel import shard_experts

        ignored: set[nn.Parameter] = {p for g in self.syncs for p in g.params}
        moes = self.shell.moe_layers()
        # Zero-bubble schedules (ZBVZeroBubble, DualPipeV) split each backward into an input part and a weight
        # part (stage_backward_input / stage_backward_weight). FSDP2-sharded stages gave wrong gradients under
        # that split here (torch 2.13, gloo, dp = 2: the first step's gradient norm already off), so with dp > 1
        # these schedules replicate a stage's weights over its dp ranks and average the gradients with one
        # all-reduce per step (the DDP arithmetic; exact).
        replicate = self.dp > 1 and self.plan.schedule in V_SHAPED
        exp_dp = self.dp // self.ep
        if self.ep > 1:
            shard_experts(moes, self.dist.ep_group, self.ep, self.dist.ep_rank)
            experts = [p for moe in moes for p in moe.experts.parameters()]
            ignored.update(experts)
            if exp_dp > 1 and replicate:
                self.syncs.append(GradSync(experts, self.mesh.get_group("dp_exp"), exp_dp, exp_dp))
            elif exp_dp > 1:
                ignored.difference_update(experts)
                for moe in moes:
                    fully_shard(moe.experts, mesh=self.mesh["dp_exp"])
            # else: each expert on exactly one rank, nothing to shard or average
        if self.dp == 1:
            return  # one rank per stage: nothing to shard
        from torch.distributed.device_mesh import init_device_mesh

        dev = self.dist.device.type
        if replicate:
            mesh = init_device_mesh(dev, (self.pp, self.dp), mesh_dim_names=("pp", "dp"))
            skip = {id(p) for p in ignored}
            dense = [p for p in self.shell.parameters() if id(p) not in skip]
            self.syncs.append(GradSync(dense, mesh.get_group("dp"), self.dp, self.dp))
            return
        # A trailing size-1 dimension turns FSDP2 into replication (parallel.fsdp = false), as in parallelize().
        dp_mesh = init_device_mesh(dev, (self.pp, self.dp), mesh_dim_names=("pp", "dp"))["dp"] if shard else \
            init_device_mesh(dev, (self.pp, self.dp, 1), mesh_dim_names=("pp", "dp", "one"))["dp", "one"]
        ign = ignored or None
        for mod in self.modules:
            for block in mod.blocks.values():
                fully_shard(block, mesh=dp_mesh, ignored_params=ign)
            for m in getattr(mod, "mtp", []):
                fully_shard(m.self_attn, mesh=dp_mesh, ignored_params=ign)
                fully_shard(m.mlp, mesh=dp_mesh, ignored_params=ign)
            fully_shard(mod, mesh=dp_mesh, ignored_params=ign)

    # ------------------------------------------------------------------ the schedule
    def _examples(self, s: int, amp: torch.dtype | None):
        """Meta tensors with the shapes and dtypes stage s receives and sends (static: no shape inference,
        which would run real forwards and count expert loads)."""
        cfg, B, T = self.cfg, self.per_micro, self.seq_len
        dtype = next(p.dtype for p in self.shell.parameters() if p.is_floating_point())  # the residual stream's
        act = dict(device="meta", requires_grad=True)
        hidden = (torch.empty(B, T, cfg.hidden_size, dtype=dtype, **act), torch.empty(1, dtype=torch.float32, **act))
        inputs = (torch.empty(B, T, dtype=torch.long, device="meta"),) if s == 0 else hidden
        if s < self.plan.n_stages - 1:
            return inputs, hidden
        head = amp or dtype
        n_mtp = len(self.shell.mtp)
        logits = [torch.empty(B, T - k, cfg.vocab_size, dtype=head, device="meta") for k in range(n_mtp + 1)]
        return inputs, (*logits, torch.empty(1, dtype=torch.float32, device="meta"))

    def _build_schedule(self, amp: torch.dtype | None):
        from torch.distributed.pipelining import PipelineStage

        cls = schedule_class(self.plan.schedule)
        stages = []
        for mod, s in zip(self.modules, self.local):
            inputs, outputs = self._examples(s, amp)
            stages.append(PipelineStage(mod, s, self.plan.n_stages, self.dist.device, input_args=inputs,
                                        output_args=outputs, group=self.pp_group))
        self.stages = stages
        kw: dict[str, Any] = {"loss_fn": self._loss}
        params = inspect.signature(cls.__init__).parameters
        self._scaled_by_schedule = "scale_grads" not in params
        if not self._scaled_by_schedule:
            kw["scale_grads"] = False
        first = stages[0] if self.plan.schedule == "1F1B" else stages
        return cls(first, self.n_micro, **kw)

    def _loss(self, output, targets):
        logits, *mtp_logits, aux = output
        out = Transformer.train_losses(logits, mtp_logits, targets, aux.sum(), self.mtp_weight)
        self.records.append(tuple(x.detach() for x in (out.lm_loss, out.mtp_loss, out.aux_loss)))
        # scale_grads=False: the backward of loss / n, as in one process (older torch divides by n itself)
        return out.loss if self._scaled_by_schedule else out.loss / self.n_micro

    def run(self, ids: torch.Tensor, targets: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Forward and backward of this rank's batch (all its micro-batches); returns the last stage's
        per-micro-batch (lm, mtp, aux) losses ([] on ranks without the last stage)."""
        self.records = []
        holds_first, holds_last = 0 in self.local, self.plan.n_stages - 1 in self.local
        args = (ids,) if holds_first else ()
        kwargs: dict[str, Any] = {"target": targets if holds_last else None, "ids": ids}
        if "return_outputs" in inspect.signature(self.schedule.step).parameters:
            kwargs["return_outputs"] = False
        self.schedule.step(*args, **kwargs)
        self.sync_shared_grads()
        return self.records

    @torch.no_grad()
    def sync_shared_grads(self) -> None:
        """All-reduce the gradients FSDP does not: shared weights' copies (summed), replicated weights
        (averaged); see the module docstring. One flat all-reduce per group."""
        for g in self.syncs:
            grads = []
            for p in g.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            if g.group is not None:
                flat = torch.cat([x.flatten() for x in grads])
                tdist.all_reduce(flat, group=g.group)
                for x, y in zip(grads, flat.split([x.numel() for x in grads])):
                    x.copy_(y.view_as(x))
            if g.mean_over > 1:
                for x in grads:
                    x.div_(g.mean_over)

    def replicas(self) -> dict[int, int]:
        """id(parameter) -> ranks holding an identical copy, for the gradient norm."""
        return {id(p): g.replicas for g in self.syncs for p in g.params}

    def shared_params(self) -> set[int]:
        return {id(p) for g in self.syncs if g.shared for p in g.params}


def build_pipeline(model: Transformer, run_cfg, dist, amp: torch.dtype | None = None) -> Pipeline:
    """Split a seeded, full model (identical on every rank) into this rank's stages; see the module docstring."""
    from torch.distributed.fsdp import FSDPModule

    from nanoseek.train.parallel import ExpertParallelMoE

    if any(isinstance(m, (FSDPModule, ExpertParallelMoE)) for m in model.modules()):
        raise ValueError("build_pipeline() needs a plain model, not one parallelize() already wrapped")
    return Pipeline(model, run_cfg, dist, amp)


# ----------------------------------------------------------------------------- the training step
class PipelineStep(TrainStep):
    """TrainStep with the micro-batches driven by the pipeline schedule: the gradient norm is over all
    stages (the shared copies counted once) and the metrics are the last stage's, averaged over dp."""

    def __init__(self, pipe: Pipeline, cfg, *, bias_update_speed: float = 0.0, dist: Any = None, **kw):
        self.pipe = pipe
        super().__init__(pipe.shell, cfg, bias_update_speed=bias_update_speed, dist=dist,
                         moe_layers=pipe.moe_slots, **kw)
        self.balancer.n_experts = pipe.cfg.n_routed_experts
        self.balancer.device = dist.device
        self.metric_ranks = pipe.dp

    def __call__(self, step: int, micro_batches: Sequence[Any], loss_fn=None, tokens: int = 0) -> dict[str, float]:
        if loss_fn is not None:
            raise ValueError("PipelineStep computes the loss on the last stage; pass loss_fn=None")
        if len(micro_batches) != self.pipe.n_micro:
            raise ValueError(f"the pipeline was built for {self.pipe.n_micro} micro-batches, got {len(micro_batches)}")
        return super().__call__(step, micro_batches, None, tokens)

    def forward_backward(self, micro_batches, loss_fn, average: bool = True):
        if not average:
            raise ValueError("pipeline parallelism averages its micro-batches' losses (average=False is not supported)")
        ids = torch.cat([mb[0] for mb in micro_batches])
        targets = torch.cat([mb[1] for mb in micro_batches])
        records = self.pipe.run(ids, targets)
        n = len(micro_batches)
        sums = torch.zeros(len(METRICS), device=self.device)
        for rec in records:  # the same running sum as TrainStep's, micro-batch by micro-batch
            sums += torch.stack(rec).float() / n
        return list(METRICS), list(METRICS), sums, {}

    def clip(self) -> float:
        from nanoseek.train.parallel import clip_grad_norm

        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        return float(clip_grad_norm(self.model, max_norm, self.dist, replicas=self.pipe.replicas()))
