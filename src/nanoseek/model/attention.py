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
from .layers import Linear, RMSNorm, apply_rope


class LatentCache:
    """Preallocated per-slot cache: [layers, slots, max_len, C + R], the latent and the rope key side by side.

    Storing both in one row lets decode attention score the query against [latent | rope key] in a single
    batched GEMM. A slot holds one sequence. Callers track each slot's length; writing at a smaller position
    simply overwrites (that is how speculative decoding rolls back).
    """

    def __init__(self, n_layers: int, num_slots: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.max_len = max_len
        self.num_slots = num_slots
        self.kv_lora_rank = kv_lora_rank
        self.kv = torch.zeros(n_layers, num_slots, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)

    @property
    def latent(self) -> torch.Tensor:
        return self.kv[..., : self.kv_lora_rank]

    @property
    def k_rope(self) -> torch.Tensor:
        return self.kv[..., self.kv_lora_rank:]

    def nbytes(self) -> int:
        return self.kv.nbytes


class CacheView:
    """What one forward needs to read/write the cache: the slot and start position of each row.

    Everything that is the same for every layer (bounds checks, whether the slots are one contiguous range,
    the attention mask) is worked out once here rather than once per layer: at batch 1 a decode step is
    dominated by per-op overhead, not arithmetic.
    """

    def __init__(self, cache: LatentCache, slots: torch.Tensor, start_pos: torch.Tensor, n_new: int):
        self.cache = cache
        self.slots = slots
        self.start_pos = start_pos
        slot_list, start_list = slots.tolist(), start_pos.tolist()
        end = max(start_list) + n_new
        if end > cache.max_len:
            raise ValueError(f"sequence length {end} exceeds the cache length {cache.max_len}")
        if max(slot_list) >= cache.num_slots or min(slot_list) < 0:
            raise ValueError(f"cache slot out of range [0, {cache.num_slots})")
        self.n_new = n_new
        self.kv_len = end  # positions [0, kv_len) are read
        self.prefill = n_new > 1 and max(start_list) == 0
        self.positions = start_pos[:, None] + torch.arange(n_new, device=start_pos.device)  # [B, T]
        # Slots s, s+1, ... are read through a view instead of a gather.
        s0 = slot_list[0]
        self._first_slot = s0 if slot_list == list(range(s0, s0 + len(slot_list))) else None
        # Every row sees every cached key only when all rows start at the same place and bring one token.
        self._needs_mask = n_new > 1 or min(start_list) != max(start_list)
        self._bias = None

    def write(self, layer: int, kv_BTW: torch.Tensor) -> None:
        """Store [latent | rotated rope key] rows of the new tokens."""
        rows = self.slots[:, None].expand_as(self.positions)
        self.cache.kv[layer][rows, self.positions] = kv_BTW.to(self.cache.kv.dtype)

    def read(self, layer: int) -> torch.Tensor:
        """[B, kv_len, C + R] for this forward's rows (a view when their slots are contiguous)."""
        kv = self.cache.kv[layer]
        if self._first_slot is not None:
            return kv[self._first_slot: self._first_slot + self.slots.shape[0], : self.kv_len]
        return kv[:, : self.kv_len].index_select(0, self.slots)

    def kernel_args(self, layer: int, n_heads: int) -> tuple:
        """The cache arguments of kernels.block_decode for this layer."""
        rows = self.slots[:, None].expand_as(self.positions)
        first = -1 if self._first_slot is None else self._first_slot
        return (self.cache.kv[layer], self.slots, rows, self.positions, first, self.kv_len,
                self.score_bias(n_heads))

    def mask(self) -> torch.Tensor:
        """[B, 1, T, L] bool: query t of row b sees key j iff j <= start_pos[b] + t."""
        keys = torch.arange(self.kv_len, device=self.positions.device)
        return (keys[None, None, :] <= self.positions[:, :, None]).unsqueeze(1)

    def score_bias(self, n_heads: int) -> torch.Tensor | None:
        """Additive mask [B, T*H, L] (0 or -inf) for scores laid out (token, head) per row; None when nothing
        is masked. Built once per forward and shared by all layers."""
        if not self._needs_mask:
            return None
        if self._bias is None:
            B, T = self.positions.shape
            allowed = self.mask()[:, 0]  # [B, T, L]
            bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
            bias = bias.masked_fill_(~allowed, float("-inf"))
            self._bias = bias[:, :, None, :].expand(B, T, n_heads, self.kv_len).reshape(B, T * n_heads, self.kv_len)
        return self._bias


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
            self.q_proj = Linear(D, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = Linear(H * cfg.v_head_dim, D, bias=False)

    def _query_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised q-LoRA latent c_Q [B, T, q_lora_rank] (V3 eq. 7); V3.2's indexer reads it too."""
        return self.q_a_layernorm(self.q_a_proj(x))

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_latent: torch.Tensor | None = None):
        B, T, _ = x.shape
        if self.cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self._query_latent(x) if q_latent is None else q_latent)
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
            cache.write(layer, torch.cat([latent, k_rope], dim=-1))
            if cache.prefill:
                # Prefill from an empty slot: the naive path over the new tokens is the cheaper one.
                out = self._naive(q_nope, q_rope, latent, k_rope, mask=None)
            else:
                out = self._absorbed(q_nope, q_rope, cache.read(layer), cache.score_bias(self.n_heads))
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_dim).to(x.dtype))  # the cache may be narrower

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

    def _absorbed(self, q_nope, q_rope, kv_BLW, bias):
        """Attention straight against the cache rows kv_BLW = [latent | rope key] ([B, L, C + R]).

        Heads are folded into the row dimension ([B, T*H, .]) so that scores and the latent output are one
        batched GEMM each against the cache as stored: no per-head copy of the cache is ever made.
        """
        B, T, H, _ = q_nope.shape
        C, dtype = self.kv_rank, kv_BLW.dtype
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, C)
        w_uk, w_uv = w[:, : self.nope].to(dtype), w[:, self.nope:].to(dtype)  # [H,N,C], [H,V,C]
        q_lat = torch.bmm(q_nope.reshape(B * T, H, self.nope).transpose(0, 1).to(dtype), w_uk)  # [H, BT, C]
        q = torch.cat([q_lat.transpose(0, 1), q_rope.reshape(B * T, H, self.rope).to(dtype)], dim=-1)
        q = q.view(B, T * H, C + self.rope)
        if dtype == torch.float32:
            scores = torch.bmm(q, kv_BLW.transpose(1, 2)).mul_(self.scale) if bias is None else \
                torch.baddbmm(bias, q, kv_BLW.transpose(1, 2), alpha=self.scale)
        else:  # scores and softmax in fp32 whatever the cache dtype
            scores = torch.bmm(q, kv_BLW.transpose(1, 2)).float() * self.scale
            if bias is not None:
                scores = scores + bias
        probs = scores.softmax(dim=-1).to(dtype)
        o_lat = torch.bmm(probs, kv_BLW[..., :C])  # [B, T*H, C]
        o = torch.bmm(o_lat.view(B * T, H, C).transpose(0, 1), w_uv.transpose(1, 2))  # [H, BT, V]
        return o.transpose(0, 1).reshape(B, T, H, self.v_dim)
