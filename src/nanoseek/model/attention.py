"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, V3 section 2.1.1) and its latent cache.

Shapes: B batch, T new tokens, L cached positions, H heads, C kv_lora_rank (the latent), R qk_rope_head_dim,
N qk_nope_head_dim, V v_head_dim.

Two mathematically equal paths:
  * naive (training, prefill): expand the latent to per-head keys/values with kv_b_proj and run SDPA;
  * absorbed (decode): fold kv_b_proj's key half into the query and its value half into the output, so
    attention runs directly against the cached latent. Only the normalised latent [C] and the rotated
    rope key [R] are cached per token and layer: 70,272 bytes/token for V3 in BF16.
The softmax scale is that of qk_head_dim (N + R), never of the absorbed dimension (REFERENCE.md section 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm, apply_rope


class LatentCache:
    """Preallocated per-slot cache: latent [layers, slots, max_len, C] and rope key [layers, slots, max_len, R].

    A slot holds one sequence. Callers track each slot's length; writing at a smaller position simply
    overwrites (that is how speculative decoding rolls back).
    """

    def __init__(self, n_layers: int, num_slots: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.max_len = max_len
        self.num_slots = num_slots
        self.latent = torch.zeros(n_layers, num_slots, max_len, kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(n_layers, num_slots, max_len, rope_dim, dtype=dtype, device=device)

    def nbytes(self) -> int:
        return self.latent.nbytes + self.k_rope.nbytes


class CacheView:
    """What one forward needs to read/write the cache: the slot and start position of each row."""

    def __init__(self, cache: LatentCache, slots: torch.Tensor, start_pos: torch.Tensor, n_new: int):
        self.cache = cache
        self.slots = slots
        self.start_pos = start_pos
        end = int(start_pos.max()) + n_new
        if end > cache.max_len:
            raise ValueError(f"sequence length {end} exceeds the cache length {cache.max_len}")
        if int(slots.max()) >= cache.num_slots or int(slots.min()) < 0:
            raise ValueError(f"cache slot out of range [0, {cache.num_slots})")
        self.n_new = n_new
        self.kv_len = end  # positions [0, kv_len) are read
        self.positions = start_pos[:, None] + torch.arange(n_new, device=start_pos.device)  # [B, T]

    def write(self, layer: int, latent_BTC: torch.Tensor, k_rope_BTR: torch.Tensor) -> None:
        rows = self.slots[:, None].expand_as(self.positions)
        self.cache.latent[layer][rows, self.positions] = latent_BTC.to(self.cache.latent.dtype)
        self.cache.k_rope[layer][rows, self.positions] = k_rope_BTR.to(self.cache.k_rope.dtype)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.cache.latent[layer][self.slots, : self.kv_len],
                self.cache.k_rope[layer][self.slots, : self.kv_len])

    def mask(self) -> torch.Tensor:
        """[B, 1, T, L] bool: query t of row b sees key j iff j <= start_pos[b] + t."""
        keys = torch.arange(self.kv_len, device=self.positions.device)
        return (keys[None, None, :] <= self.positions[:, :, None]).unsqueeze(1)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads = H
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=False)

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        q = self.q_proj(x) if self.cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin, self.cfg.rope_interleave)  # [B,T,H,R]
        kv = self.kv_a_proj_with_mqa(x)
        latent, k_rope = kv.split([self.kv_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B,T,C]; the norm applies to the latent only
        # One rope key shared by all heads.
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin, self.cfg.rope_interleave).squeeze(2)  # [B,T,R]
        return q_nope, q_rope, latent, k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: CacheView | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_rope, latent, k_rope = self._project(x, cos, sin)
        if cache is None:
            out = self._naive(q_nope, q_rope, latent, k_rope, mask=None)
        else:
            cache.write(layer, latent, k_rope)
            if T > 1 and int(cache.start_pos.max()) == 0:
                # Prefill from an empty slot: the naive path over the new tokens is the cheaper one.
                out = self._naive(q_nope, q_rope, latent, k_rope, mask=None)
            else:
                lat_BLC, rope_BLR = cache.read(layer)
                out = self._absorbed(q_nope, q_rope, lat_BLC, rope_BLR, cache.mask())
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_dim))

    def _naive(self, q_nope, q_rope, latent_BLC, k_rope_BLR, mask):
        B, T, H, _ = q_nope.shape
        L = latent_BLC.shape[1]
        kv = self.kv_b_proj(latent_BLC).view(B, L, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B,H,T,N+R]
        k = torch.cat([k_nope, k_rope_BLR[:, :, None, :].expand(B, L, H, self.rope)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        pad = self.nope + self.rope - self.v_dim
        if pad > 0:
            # Fused (flash) SDPA kernels want one head size for q, k and v; zero columns in v cost a little
            # extra GEMM but avoid the unfused path, which materialises [B,H,T,T] several times (slower on CPU).
            v = F.pad(v, (0, pad))
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return o[..., : self.v_dim].transpose(1, 2)  # [B,T,H,V]

    def _absorbed(self, q_nope, q_rope, latent_BLC, k_rope_BLR, mask_B1TL):
        H = self.n_heads
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]  # [H,N,C], [H,V,C]
        dtype = latent_BLC.dtype
        q_lat = torch.einsum("bthn,hnc->bhtc", q_nope, w_uk.to(q_nope.dtype)).to(dtype)  # query in latent space
        scores = torch.matmul(q_lat, latent_BLC.unsqueeze(1).transpose(-1, -2))  # [B,H,T,L]
        scores = scores + torch.matmul(q_rope.transpose(1, 2).to(dtype), k_rope_BLR.unsqueeze(1).transpose(-1, -2))
        scores = scores.float() * self.scale
        scores = scores.masked_fill(~mask_B1TL, float("-inf"))
        probs = scores.softmax(dim=-1).to(dtype)
        o_lat = torch.matmul(probs, latent_BLC.unsqueeze(1))  # [B,H,T,C]
        return torch.einsum("bhtc,hvc->bthv", o_lat, w_uv.to(dtype))  # [B,T,H,V]
