"""`nanoseek plan` (nanoseek.plan.cli): per-GPU memory and step time of a training layout (PP x EP x ZeRO-DP), and a search.

Given a model (ModelConfig), a cluster (GPU kind, count, GPUs per node, NVLink and network bandwidth)
and a layout, it estimates what each GPU holds and how long a step takes, hence GPU-hours per trillion
tokens and whether the layout fits. It reproduces DeepSeek-V3's training layout (V3 report section 3.1-3.2:
PP16 x EP64 x ZeRO-1 on 2,048 H800s, 8 per node): see tests/test_plan.py and the README.

Layout. gpus = pp x ep x dp, ranks ordered [pp, dp, ep] with EP innermost (an EP group is neighbouring
GPUs, a node's worth or whole nodes), as in nanoseek.train.parallel. The non-expert weights of a stage
are data-parallel over its ep x dp GPUs; each routed expert lives on one rank of every EP group (E / ep
experts per GPU) and is data-parallel over dp. No tensor parallelism (V3 used none).

Stages. A schedule runs S = pp x v stages: v = 1 for 1F1B, `virtual_stages` (default 2) for
Interleaved1F1B with stage s on rank s mod pp, v = 2 for the V-shaped ZBVZeroBubble and DualPipeV with
stage s on rank s (s < pp) or 2pp - 1 - s, so rank 0 holds both the embedding and the head, and the MTP
module shares them physically (V3 section 3.2.3). Other schedules keep a copy of the embedding on the
head's rank for MTP, counted as a full parameter. The embedding sits on stage 0; final norm, head and
MTP on stage S - 1. By default the decoder layers are split to minimise the busiest rank's FLOPs
(greedy fill under a bisected cap, every stage without embedding/head keeps >= 1 layer), or given.

Memory per GPU (the busiest rank is the one reported and the one that must fit):
  * weights, gradients, optimizer state per `Precision` (the V3 recipe, section 3.3: BF16 weights for
    compute, FP32 gradients and master weights, BF16 AdamW moments, FP8-cached linear inputs, the
    attention output cached in E5M6). ZeRO-1
    shards master weights and moments over the data-parallel group of each parameter (ep x dp for
    non-expert weights, dp for experts), ZeRO-2 also gradients, ZeRO-3 also weights (plus
    `zero3_prefetch_layers` layers gathered at a time).
  * activations: a per-token tally of the tensors each block saves for backward (see
    `activation_elements`), per recompute mode: `none` (plain autograd), `selective` (V3's recipe, sections
    3.2.3 and 3.3.3: recompute every RMSNorm and the MLA up-projections, cache the SwiGLU input and
    recompute its output), `full` (keep each layer's input, recompute the layer: one layer's activations as workspace).
    Times the micro-batches in flight on that rank, per schedule (in units of one micro-batch through all
    of the rank's layers; m micro-batches per step cap each count):
      1F1B            pp - r on rank r (PipeDream-flush; Narayanan et al. 2021)
      Interleaved1F1B ((pp - r - 1) * 2 + (v - 1) * pp + 1) / v  (Megatron-LM's warm-up count plus one, in
                      chunks of 1/v of the rank; rank 0: pp + (pp - 1)/v as in Korthikanti et al. 2022)
      ZBVZeroBubble   pp on every rank (Qi et al. 2024, ZB-V: 1F1B's peak memory, balanced over ranks)
      DualPipeV       pp + 1/2 on every rank (the DualPipe README's table: PP + 1 chunks of 1/2 a rank)
  * transients: logits (and their gradient) of one micro-batch on the head's rank, the MoE
    dispatch/combine buffers of the micro-batches communicating at once (2 under DualPipeV's overlap),
    the full-recompute workspace, ZeRO-3 gathered weights; plus `runtime_reserve_gib` (CUDA context,
    NCCL, cuBLAS workspace) and `fragmentation` (a fraction of everything allocated).

Step time:
  * compute: a rank's forward FLOPs (2 x active matmul weights + causal attention, as
    nanoseek.accounting counts them) at peak x MFU; backward = `backward_to_forward` x forward,
    of which `weight_grad_share` computes weight gradients (the W of zero-bubble schedules); recompute
    adds forward FLOPs to the backward (the MLA up-projections, or a whole forward). Step compute =
    m x the mean rank's micro-batch time: the MFU is read as the job's average utilisation, as
    `nanoseek cost` derives it. The busiest rank's excess (`stage_imbalance`, reported; V3's 61 layers
    plus head and MTP do not split evenly over 16 ranks) is counted only with
    `count_stage_imbalance` (then m x the busiest rank's time: a pipeline runs at its slowest stage).
  * pipeline bubble, from the schedules' published formulas with F, B, W the times per micro-batch of
    that same rank (a chunk is half of them on V-shaped schedules):
      1F1B (pp-1)(F+B); Interleaved1F1B (pp-1)(F+B)/v; ZBVZeroBubble (pp-1) max(0, F+B-3W)/2 per chunk
      (zero when forward = input-backward = weight-backward, as the ZB paper shows; the max(...) is our
      interpolation for other ratios); DualPipeV (pp-1)(F&B + B - 3W)/2 with F&B = F + B (the overlap
      hides communication, not compute), from the DualPipe README.
  * EP all-to-all per MoE layer and token: dispatch (FP8 under the V3 recipe) and combine (BF16)
    forward, their gradients (BF16) backward. Across nodes a token goes to at most M nodes (V3's
    node-limited routing: M = topk_group when the groups nest in nodes, else top_k; capped by the EP
    nodes), of which a fraction (nodes - 1)/nodes is remote on average; inside the node each of its top_k
    copies moves over NVLink unless its expert is on the receiving GPU. Network and NVLink run at once
    (time = the slower). DualPipeV overlaps it with compute (`dualpipev_ep_overlap`), the others by
    `other_ep_overlap` (0: exposed).
  * pipeline p2p: the activations (forward) and their gradients (backward) at every chunk boundary,
    `pp_p2p_overlap` of it hidden (the schedules post sends asynchronously).
  * data parallelism: ring reduce-scatter of gradients and all-gather of weights ((n-1)/n of the bytes
    per GPU), per step for ZeRO-1, plus per micro-batch reduce-scatter for ZeRO-2, and per micro-batch
    two all-gathers and a reduce-scatter for ZeRO-3; over the network when the group spans nodes;
    `dp_overlap` of it hidden.
  GPU-hours per trillion tokens = step time x GPUs / 3600 x 1e12 / tokens per step.
  Not modelled: tensor/context parallelism, the optimizer step, message latency (bandwidth terms only:
  small models look communication-cheap), per-kernel efficiency (one MFU for every FLOP), EP load
  imbalance between ranks (see nanoseek.train.eplb), CPU offload.

The default MFU is the one `nanoseek cost` derives from V3's published pre-training cost (2,664K H800
GPU-hours for 14.8T tokens at the dense BF16 peak), so the planner's V3 figure differs from the report's
180K GPU-hours per trillion tokens by exactly the recomputation, bubble and exposed communication it
adds on top. Every assumption is a field of `Assumptions` or `Precision` (`--set NAME=VALUE`).
"""

from __future__ import annotations

from nanoseek.plan.estimate import estimate
from nanoseek.plan.search import search
from nanoseek.plan.specs import (GPU_SPECS, PRECISIONS, SCHEDULES, Assumptions, Cluster, GPUSpec, Layout, PlanError,
                                 Precision, make_cluster, v3_mfu)

__all__ = ["estimate", "search", "GPU_SPECS", "PRECISIONS", "SCHEDULES", "Assumptions", "Cluster", "GPUSpec",
           "Layout", "PlanError", "Precision", "make_cluster", "v3_mfu"]
