"""Small building blocks: RMSNorm, the SwiGLU MLP, and rotary embeddings (plain and YaRN).

RoPE follows DeepSeek-V2 section 2.1.3 (decoupled rope key) and YaRN (arXiv 2309.00071) exactly as
transformers computes it, so logits match to float precision: inverse frequencies blended between
interpolation and extrapolation by a linear ramp, and cos/sin multiplied by the YaRN attention factor
mscale(factor, mscale) / mscale(factor, mscale_all_dim). The softmax-scale correction lives in
ModelConfig.softmax_scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, yarn_mscale
from . import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability, then cast back before the weight (as transformers does).
        dtype = x.dtype
        if dtype == torch.float32 and kernels.usable(x, self.weight):  # inference: one C++ loop
            return kernels.rms_norm(x, self.weight, self.eps)
        if dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The same arithmetic in one fused op (bit-identical in fp32; a third of the time at decode sizes).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the few-row shapes of CPU decoding laid out for the memory-bound work they are.

    Decoding multiplies 1-16 rows by each weight, so the time is that of streaming the weight from memory,
    and torch's CPU F.linear gets there poorly (2-core EPYC, fp32: one row runs a single-threaded GEMV at
    ~13 GB/s; a few rows re-pack the whole weight first). In order of preference:
      * up to 32 rows, fp32: the C++ kernel of nanoseek.model.kernels (~30 GB/s at one or two rows; on
        small weights it also beats F.linear's call overhead: 2.8 vs 6.0 us for 64x128 at two rows);
      * one row without it: the weight's rows split into 4 batches of one bmm, which uses every thread;
      * 2-64 rows without it: W @ x^T, which streams W once.
    benchmarks/bench_kernels.py measures all three against F.linear.
    Without the kernels, small weights (under _RELAYOUT_MIN elements, where call overhead outweighs
    bandwidth) keep F.linear; so do training (grad enabled), GPUs and bias-carrying layers.
    """
    if bias is None and x.is_cpu and not torch.is_grad_enabled() and x.shape[-1]:
        n_out, n_in = weight.shape
        rows = x.numel() // n_in
        if rows <= 32 and weight.is_contiguous() and kernels.usable(x, weight):
            return kernels.rows_matmul(x.reshape(rows, n_in), weight).view(x.shape[:-1] + (n_out,))
        if weight.numel() < _RELAYOUT_MIN:
            return F.linear(x, weight)
        if rows == 1 and torch.get_num_threads() > 1 and n_out % _GEMV_SPLIT == 0 and weight.is_contiguous():
            y = torch.bmm(x.reshape(1, 1, n_in).expand(_GEMV_SPLIT, 1, n_in),
                          weight.view(_GEMV_SPLIT, n_out // _GEMV_SPLIT, n_in).transpose(1, 2))
            return y.view(x.shape[:-1] + (n_out,))
        if 2 <= rows <= 64:
            return torch.mm(weight, x.reshape(rows, n_in).t()).t().contiguous().view(x.shape[:-1] + (n_out,))
    return F.linear(x, weight, bias)


_GEMV_SPLIT = 4
_RELAYOUT_MIN = 1 << 16


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) that routes through `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim/2] and the cos/sin attention factor for the config's rope."""
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = cfg.rope_scaling
    if not rs:
        return 1.0 / pos_freqs, 1.0
    factor = float(rs["factor"])
    orig_max = int(rs.get("original_max_position_embeddings") or cfg.max_position_embeddings)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attn_factor = rs.get("attention_factor")
    if attn_factor is None:
        if mscale and mscale_all_dim:
            attn_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attn_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 = keep the original frequency (high-frequency dims)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn_factor)


class Rotary(nn.Module):
    """Computes (cos, sin) of shape [..., T, rope_dim/2] for given positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attn_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # [..., T, rope/2]
        return freqs.cos() * self.attn_factor, freqs.sin() * self.attn_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [..., T, H, rope_dim] by cos/sin [..., T, rope_dim/2] (broadcast over heads).

    Interleaved checkpoints (the official DeepSeek weights) pair dims (0,1), (2,3), ...; half-split ones
    pair (i, i + d/2). Both layouts produce the rotated pairs as [first halves | second halves]: a fixed
    permutation of the rope dims applied to q and k alike, so q.k is unchanged (transformers does the same).
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
