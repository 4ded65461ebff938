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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability, then cast back before the weight (as transformers does).
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim/2] (fp32, computed on the CPU whatever device the model is built on, so
    every device rotates by the same angles) and the cos/sin attention factor for the config's rope."""
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
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
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 = keep the original frequency (high-frequency dims)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn_factor)


class Rotary(nn.Module):
    """Computes (cos, sin) of shape [..., T, rope_dim/2] for given positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attn_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

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
