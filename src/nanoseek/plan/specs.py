"""Hardware, precision and modelling assumptions of `nanoseek plan`, and the cluster and layout it plans.

Every number the planner assumes is a field here (GPU_SPECS, PRECISIONS, Assumptions), so a user can
change it (`--set NAME=VALUE`) and the README can list it; see nanoseek.plan for what each one feeds.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.accounting import training_flops_per_token
from nanoseek.cost import implied_mfu
from nanoseek.errors import NanoseekError
from nanoseek.mfu import peak_flops, resolve_gpu

GiB = 2**30
SCHEDULES = ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV")
V_SHAPED = ("ZBVZeroBubble", "DualPipeV")
RECOMPUTE = ("none", "selective", "full")

# V3 report, section 1 (table 1) and 4.1: pre-training took 2,664K H800 GPU-hours for 14.8T tokens at
# 4K context, with a final global batch of 15,360 sequences.
V3_PRETRAIN_GPU_HOURS = 2.664e6
V3_PRETRAIN_TOKENS = 14.8e12
V3_SEQ_LEN = 4096
V3_GLOBAL_BATCH = 15360


class PlanError(NanoseekError, ValueError):
    """A layout that cannot run (the CLI prints it as one line and exits 2)."""


@dataclass(frozen=True)
class GPUSpec:
    memory_gib: float    # HBM as the vendor quotes it
    nvlink_gbps: float   # GB/s per GPU and direction inside a node (PCIe where there is no NVLink)
    network_gbps: float  # GB/s per GPU and direction across nodes (its NIC)


# Vendor datasheets; NVLink per direction = half the quoted bidirectional figure. Network: one 400 Gb/s
# NIC per GPU (50 GB/s) on HGX-class nodes, 200 Gb/s on A100-class, 100 Gb/s on PCIe workstation cards.
GPU_SPECS: dict[str, GPUSpec] = {
    "H100 SXM": GPUSpec(80, 450, 50), "H100 PCIe": GPUSpec(80, 64, 25), "H100 NVL": GPUSpec(94, 64, 25),
    # H800: NVLink cut to 400 GB/s bidirectional; V3 (section 3.2.2) quotes 160 GB/s NVLink, 50 GB/s IB.
    "H800": GPUSpec(80, 160, 50),
    "H200": GPUSpec(141, 450, 50), "H200 NVL": GPUSpec(141, 450, 50), "H20": GPUSpec(96, 450, 50),
    "A100": GPUSpec(80, 300, 25), "A800": GPUSpec(80, 200, 25),
    "L40S": GPUSpec(48, 32, 12.5), "L4": GPUSpec(24, 32, 12.5), "RTX 4090": GPUSpec(24, 32, 12.5),
    "RTX 3090": GPUSpec(24, 32, 12.5),
    "B200": GPUSpec(180, 900, 50), "GB200": GPUSpec(186, 900, 50),
    "MI300X": GPUSpec(192, 448, 50),  # Infinity Fabric: 7 x 64 GB/s links per GPU and direction
}


@dataclass(frozen=True)
class Precision:
    name: str
    weight_bytes: float   # the copy the GEMMs read
    grad_bytes: float     # accumulated gradients
    master_bytes: float   # optimizer master weights (0 when the weights are already FP32)
    moment_bytes: float   # each of AdamW's two moments
    act_bytes: float      # saved activations by default (residual stream, norms' inputs)
    cache_bytes: float    # saved inputs of linear layers (FP8 + one FP32 scale per 128 under the V3 recipe)
    attn_out_bytes: float  # the attention output saved for o_proj (V3: a custom E5M6 format, 12 bits)
    dispatch_bytes: float  # EP dispatch payload per element, forward (V3: FP8 with scales)
    comm_bytes: float      # combine forward and both backward all-to-alls, pipeline p2p


FP8_WITH_SCALES = 1 + 4 / 128
PRECISIONS: dict[str, Precision] = {
    "v3": Precision("v3", 2, 4, 4, 2, 2, FP8_WITH_SCALES, 1.5, FP8_WITH_SCALES, 2),
    "bf16": Precision("bf16", 2, 4, 4, 4, 2, 2, 2, 2, 2),
    "fp32": Precision("fp32", 4, 4, 0, 4, 4, 4, 4, 4, 4),
}


@dataclass(frozen=True)
class Assumptions:
    backward_to_forward: float = 2.0     # backward FLOPs / forward FLOPs (two GEMMs per forward GEMM)
    weight_grad_share: float = 0.5       # share of the backward that computes weight gradients (W)
    dualpipev_ep_overlap: float = 1.0    # share of the EP all-to-all DualPipeV hides behind compute
    other_ep_overlap: float = 0.0        # the same for the other schedules
    pp_p2p_overlap: float = 1.0          # share of pipeline send/recv hidden by asynchronous p2p
    dp_overlap: float = 0.0              # share of the ZeRO collectives hidden behind compute
    logits_bytes: float = 4.0            # FP32 logits for the cross-entropy
    loss_chunks: int = 1                 # >1: logits computed in that many chunks (fused/chunked loss)
    dispatch_headroom: float = 1.0       # receive buffers sized for this x the mean tokens per rank
    zero3_prefetch_layers: int = 2       # ZeRO-3: layers whose full weights are gathered at once
    runtime_reserve_gib: float = 2.0     # CUDA context, NCCL buffers, cuBLAS workspace
    fragmentation: float = 0.05          # allocator overhead, a fraction of the allocated bytes
    node_fanout: int = 0                 # >0: nodes a token's experts span (0: from the routing config)
    count_stage_imbalance: bool = False  # step compute from the busiest rank instead of the mean rank


@dataclass(frozen=True)
class Cluster:
    gpu: str
    gpus: int
    gpus_per_node: int
    peak_flops: float
    mfu: float
    spec: GPUSpec


@dataclass(frozen=True)
class Layout:
    pp: int
    ep: int
    dp: int | None = None
    schedule: str | None = None          # None: 1F1B when pp > 1
    virtual_stages: int = 2              # Interleaved1F1B's chunks per rank
    micro_batch: int = 1                 # sequences per micro-batch per data-parallel rank
    global_batch: int = V3_GLOBAL_BATCH  # sequences per step
    seq_len: int = V3_SEQ_LEN
    recompute: str = "selective"
    zero: int = 1
    stage_layers: tuple[int, ...] | None = None
    tp: int = 1


def v3_mfu() -> float:
    """The MFU V3's published cost implies on H800s at the dense BF16 peak (what `nanoseek cost` prints)."""
    from nanoseek.config import preset

    fpt = training_flops_per_token(preset("deepseek-v3"), V3_SEQ_LEN, include_mtp=True)
    return implied_mfu(fpt, V3_PRETRAIN_TOKENS, peak_flops("H800"), V3_PRETRAIN_GPU_HOURS)


def make_cluster(gpu: str, gpus: int, gpus_per_node: int, mfu: float | None = None, nvlink_gbps: float | None = None,
                 network_gbps: float | None = None, memory_gib: float | None = None) -> Cluster:
    kind = resolve_gpu(gpu)
    base = GPU_SPECS[kind]
    spec = GPUSpec(memory_gib or base.memory_gib, nvlink_gbps or base.nvlink_gbps, network_gbps or base.network_gbps)
    if min(spec.memory_gib, spec.nvlink_gbps, spec.network_gbps) <= 0:
        raise PlanError("memory and bandwidths must be positive")
    if gpus <= 0 or gpus_per_node <= 0:
        raise PlanError(f"--gpus and --gpus-per-node must be positive, got {gpus} and {gpus_per_node}")
    if gpus > gpus_per_node and gpus % gpus_per_node:
        raise PlanError(f"{gpus} GPUs do not fill whole nodes of {gpus_per_node}")
    mfu = v3_mfu() if mfu is None else mfu
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    return Cluster(kind, gpus, gpus_per_node, peak_flops(kind), mfu, spec)

