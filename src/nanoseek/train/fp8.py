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

Where the GEMMs run (nanoseek.train.fp8_gemm, which also holds the shape guards and the agreement bound):
on Hopper GPUs the native block-scaled kernels (torch.nn.functional.scaled_mm with 1x128 / 128x128 scaling,
FP32 output); elsewhere the emulation (quantize to torch.float8_e4m3fn with the scale, dequantize, multiply in
FP32), which is exactly FP8 arithmetic with FP32 accumulation and stays the reference. Both see the same
quantized values: this module quantizes, the backend only multiplies.
Departure from the report: the activations saved for backward are kept in their original precision
(the report caches them in FP8 to save memory); wgrad quantizes them into 128x1 tiles directly.

The routed experts (stacked [E, 2F, D] and [E, D, F] weights) use the same function on a padded
[E, capacity, D] buffer: per-expert 128x128 weight blocks, and wgrad tiles that never straddle experts
(on Hopper one blockwise GEMM per expert: no grouped GEMM takes these scales, see fp8_gemm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import MLA
from ..model.layers import MLP
from ..model.moe import GroupedExperts
from .fp8_gemm import BACKENDS, dequantize_blocks, dequantize_tiles, gemm, resolve

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


@dataclass(frozen=True)
class FP8Options:
    block: int = 128          # tile width for activations and block side for weights
    backend: str = "auto"     # one of fp8_gemm.BACKENDS: auto, emulate, blockwise, scaled_mm

    def __post_init__(self):
        if self.block < 1:
            raise ValueError(f"fp8 block size must be >= 1, got {self.block}")
        if self.backend not in BACKENDS:
            raise ValueError(f"fp8 backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


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


# ----------------------------------------------------------------------------- FP8 GEMMs
class _FP8BatchedLinear(torch.autograd.Function):
    """y[z] = x[z] @ w[z]^T for x [Z,M,K], w [Z,N,K], with all three GEMMs in fine-grained FP8."""

    @staticmethod
    def forward(ctx, x, w, opts: FP8Options, out_dtype: torch.dtype):
        b = opts.block
        backend = resolve(opts.backend, b, x.device)
        w_q, w_s = quantize_blocks(w, b)
        x_q, x_s = quantize_tiles(x, b)
        y = gemm(x_q, x_s, w_q, w_s, True, backend, b)
        ctx.save_for_backward(x, w_q, w_s)
        ctx.block, ctx.backend, ctx.x_dtype, ctx.w_dtype = b, backend, x.dtype, w.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w_q, w_s = ctx.saved_tensors
        b, backend = ctx.block, ctx.backend
        dx = dw = None
        if ctx.needs_input_grad[0]:
            # dgrad: contraction over N. dy in 1x128 tiles along N; W^T's blocks are W's blocks transposed.
            dy_q, dy_s = quantize_tiles(dy, b)
            dx = gemm(dy_q, dy_s, w_q.transpose(1, 2), w_s.transpose(1, 2), True, backend, b).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            # wgrad: contraction over tokens M. dy^T and x^T in 1x128 tiles along M (128x1 tiles of dy, x).
            dyt_q, dyt_s = quantize_tiles(dy.transpose(1, 2), b)
            xt_q, xt_s = quantize_tiles(x.transpose(1, 2), b)
            dw = gemm(dyt_q, dyt_s, xt_q, xt_s, False, backend, b).to(ctx.w_dtype)
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

    def use_grouped_mm(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> bool:
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
    fp8_cfg may carry `block` (default 128) and `backend` ("auto" | "emulate" | "blockwise" | "scaled_mm").
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
