"""Fine-grained FP8 training for the linear layers (V3 report section 3.3).

What the report does, and what this module does the same way:
  * E4M3 for every tensor (no E5M2 for gradients): 448 is the largest finite value;
  * activations (and output gradients) are scaled per 1x128 tile: one scale per token per 128 channels
    of the contraction dimension; weights per 128x128 block; every scale is the tile's online max-abs / 448;
  * all three GEMMs of a linear y = x W^T run in FP8 with the tile orientation each one needs:
      forward  y  = x  W^T : x in 1x128 tiles along K, W in 128x128 blocks;
      dgrad    dx = dy W   : dy in 1x128 tiles along N (its contraction dim), W's blocks reused as they are
                             (a 128x128 block grid is the same for W and W^T);
      wgrad    dW = dy^T x : contraction over tokens, so dy and x are both quantized in 128x1 tiles
                             (one scale per channel per 128 tokens; per expert for the grouped experts);
  * products accumulate in FP32, the paper's promotion to CUDA cores every 128 elements of K; master
    weights and weight gradients stay FP32;
  * embedding, output head, router (gating), norms and the attention core stay in high precision.

Emulation (CPU, and any device without FP8 GEMMs): quantize to torch.float8_e4m3fn with the scale,
dequantize, multiply in FP32: the numbers are exactly those of an FP8 GEMM with FP32 accumulation.
On CUDA GPUs with FP8 tensor cores (sm89+), each 128-wide K slice is one torch._scaled_mm with row-wise
scales (the 1x128 tile scales of that slice and the 128x128 block scales broadcast along columns), and
the slices are summed in FP32; the GEMM output per slice is BF16, as _scaled_mm's row-wise mode requires.
Departure from the report: the activations saved for backward are kept in their original precision
(the report caches them in FP8 to save memory); wgrad quantizes them into 128x1 tiles directly.

The routed experts (stacked [E, 2F, D] and [E, D, F] weights) use the same function on a padded
[E, capacity, D] buffer: per-expert 128x128 weight blocks, and wgrad tiles that never straddle experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import MLA
from ..model.layers import MLP
from ..model.moe import GroupedExperts

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


@dataclass(frozen=True)
class FP8Options:
    block: int = 128          # tile width for activations and block side for weights
    backend: str = "auto"     # "auto" (scaled_mm on FP8-capable CUDA, else emulate), "emulate", "scaled_mm"

    def __post_init__(self):
        if self.block < 1:
            raise ValueError(f"fp8 block size must be >= 1, got {self.block}")
        if self.backend not in ("auto", "emulate", "scaled_mm"):
            raise ValueError(f"fp8 backend must be auto, emulate or scaled_mm, got {self.backend!r}")


# ----------------------------------------------------------------------------- quantization
def quantize_tiles(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x block tiles along the last dim: returns (float8 values [..., K], fp32 scales [..., ceil(K/block)]).

    x ~= q * scale (scale repeated over its tile). A partial last tile is scaled by its own max-abs.
    """
    K = x.shape[-1]
    nb = -(-K // block)
    xf = x.float()
    padded = F.pad(xf, (0, nb * block - K)) if nb * block != K else xf
    tiles = padded.unflatten(-1, (nb, block))
    amax = tiles.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (tiles / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.flatten(-2)[..., :K], scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    return q.float() * scale.repeat_interleave(block, dim=-1)[..., : q.shape[-1]]


def quantize_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """block x block tiles over the last two dims: (float8 [..., N, K], fp32 scales [..., ceil(N/b), ceil(K/b)])."""
    N, K = w.shape[-2:]
    nn_, nk = -(-N // block), -(-K // block)
    wf = w.float()
    padded = F.pad(wf, (0, nk * block - K, 0, nn_ * block - N))
    tiles = padded.unflatten(-1, (nk, block)).unflatten(-3, (nn_, block))  # [..., nn, b, nk, b]
    amax = tiles.abs().amax(dim=-1).amax(dim=-2)  # [..., nn, nk]; two contiguous reductions
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (tiles / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.flatten(-4, -3).flatten(-2)[..., :N, :K], scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    N, K = q.shape[-2:]
    s = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :N, :K]
    return q.float() * s


# ----------------------------------------------------------------------------- FP8 GEMMs
def _use_scaled_mm(opts: FP8Options, device: torch.device) -> bool:
    if opts.backend == "emulate":
        return False
    if opts.backend == "scaled_mm":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _gemm_tiles_blocks(a_q, a_s, b_q, b_s, block: int, scaled_mm: bool) -> torch.Tensor:
    """out[z] = A[z] @ B[z]^T in FP32, A [Z,M,K] in 1x128 tiles (scales [Z,M,K/b]), B [Z,N,K] in
    128x128 blocks (scales [Z,N/b,K/b])."""
    if not scaled_mm:
        return torch.bmm(dequantize_tiles(a_q, a_s, block), dequantize_blocks(b_q, b_s, block).transpose(1, 2))
    # Column scales of B per K slice: the block scale of each row's block.
    b_cols = b_s.repeat_interleave(block, dim=1)[:, : b_q.shape[1]]  # [Z, N, K/b]
    return _scaled_mm_sliced(a_q, a_s, b_q, b_cols, block)


def _gemm_tiles_tiles(a_q, a_s, b_q, b_s, block: int, scaled_mm: bool) -> torch.Tensor:
    """out[z] = A[z] @ B[z]^T in FP32 with both operands in 1x128 tiles along the contraction dim K."""
    if not scaled_mm:
        return torch.bmm(dequantize_tiles(a_q, a_s, block), dequantize_tiles(b_q, b_s, block).transpose(1, 2))
    return _scaled_mm_sliced(a_q, a_s, b_q, b_s, block)


def _scaled_mm_sliced(a_q, a_s, b_q, b_s, block: int) -> torch.Tensor:
    """torch._scaled_mm per (batch, 128-wide K slice) with row-wise scales, summed in FP32."""
    Z, M, K = a_q.shape
    N = b_q.shape[1]
    out = torch.zeros(Z, M, N, dtype=torch.float32, device=a_q.device)
    for z in range(Z):
        for j, k0 in enumerate(range(0, K, block)):
            k1 = min(K, k0 + block)
            a = a_q[z, :, k0:k1].contiguous()
            b = b_q[z, :, k0:k1].contiguous().t()  # column-major [kc, N], as _scaled_mm wants
            out[z] += torch._scaled_mm(a, b, scale_a=a_s[z, :, j:j + 1].contiguous(),
                                       scale_b=b_s[z, :, j][None, :].contiguous(),
                                       out_dtype=torch.bfloat16).float()
    return out


class _FP8BatchedLinear(torch.autograd.Function):
    """y[z] = x[z] @ w[z]^T for x [Z,M,K], w [Z,N,K], with all three GEMMs in fine-grained FP8."""

    @staticmethod
    def forward(ctx, x, w, opts: FP8Options, out_dtype: torch.dtype):
        b = opts.block
        sm = _use_scaled_mm(opts, x.device)
        w_q, w_s = quantize_blocks(w, b)
        x_q, x_s = quantize_tiles(x, b)
        y = _gemm_tiles_blocks(x_q, x_s, w_q, w_s, b, sm)
        ctx.save_for_backward(x, w_q, w_s)
        ctx.opts, ctx.sm, ctx.x_dtype, ctx.w_dtype = opts, sm, x.dtype, w.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w_q, w_s = ctx.saved_tensors
        b, sm = ctx.opts.block, ctx.sm
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # dgrad: contraction over N. dy in 1x128 tiles along N; W^T's blocks are W's blocks transposed.
            dy_q, dy_s = quantize_tiles(dy, b)
            dx = _gemm_tiles_blocks(dy_q, dy_s, w_q.transpose(1, 2), w_s.transpose(1, 2), b, sm).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            # wgrad: contraction over tokens M. dy^T and x^T in 1x128 tiles along M (128x1 tiles of dy, x).
            dyt_q, dyt_s = quantize_tiles(dy.transpose(1, 2), b)
            xt_q, xt_s = quantize_tiles(x.transpose(1, 2), b)
            dw = _gemm_tiles_tiles(dyt_q, dyt_s, xt_q, xt_s, b, sm).to(ctx.w_dtype)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, opts: FP8Options = FP8Options()) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T in FP8. The output dtype is the autocast dtype when autocast is on, else x's."""
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    with torch.autocast(dev, enabled=False):
        y = _FP8BatchedLinear.apply(x.reshape(1, -1, x.shape[-1]), w[None], opts, out_dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def fp8_bmm(x_ZMK: torch.Tensor, w_ZNK: torch.Tensor, opts: FP8Options = FP8Options()) -> torch.Tensor:
    dev = x_ZMK.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_ZMK.dtype
    with torch.autocast(dev, enabled=False):
        return _FP8BatchedLinear.apply(x_ZMK, w_ZNK, opts, out_dtype)


# ----------------------------------------------------------------------------- modules
class FP8Linear(nn.Linear):
    """nn.Linear whose matmul runs in fine-grained FP8; same parameters and state-dict names."""

    fp8: FP8Options

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.fp8)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class FP8GroupedExperts(GroupedExperts):
    """GroupedExperts with both expert GEMMs in FP8 (per-expert 128x128 weight blocks)."""

    fp8: FP8Options

    def use_grouped_mm(self, dtype: torch.dtype, cap: int = 0) -> bool:
        return False  # forward() then takes forward_padded, which runs in FP8 here

    # GroupedExperts.forward scatters the sorted rows into a zero-padded buffer and calls this;
    # zero padding rows neither change a tile's max-abs nor contribute to wgrad.
    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """All experts on a zero-padded [E, cap, D] buffer, both GEMMs in FP8."""
        w1, w2 = self.gate_up_proj, self.down_proj
        h = fp8_bmm(x_ECD, w1, self.fp8)
        g, u = h.chunk(2, dim=-1)
        return fp8_bmm(F.silu(g) * u, w2, self.fp8)


def _options(fp8_cfg) -> FP8Options:
    return FP8Options(block=getattr(fp8_cfg, "block", 128), backend=getattr(fp8_cfg, "backend", "auto"))


def enable_fp8(model: nn.Module, fp8_cfg=None) -> nn.Module:
    """Switch the linears of attention (q/kv/o projections), dense MLPs, shared experts and routed experts
    to fine-grained FP8, in place. Embedding, head, router, norms and MTP's eh_proj stay as they are.

    Call before parallelize(): it swaps module classes and keeps every parameter and state-dict name.
    fp8_cfg may carry `block` (default 128) and `backend` ("auto" | "emulate" | "scaled_mm").
    """
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("enable_fp8() must run before parallelize(): the model is already sharded with FSDP")
    opts = _options(fp8_cfg)
    for mod in list(model.modules()):
        if isinstance(mod, (MLA, MLP)):
            for child in mod.children():
                if isinstance(child, nn.Linear) and not isinstance(child, FP8Linear):
                    child.__class__ = FP8Linear
                    child.fp8 = opts
        elif isinstance(mod, GroupedExperts) and not isinstance(mod, FP8GroupedExperts):
            mod.__class__ = FP8GroupedExperts
            mod.fp8 = opts
    return model
