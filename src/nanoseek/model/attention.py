"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, V3 section 2.1.1) and its latent cache.

Shapes: B batch, T new tokens, L cached positions, H heads, C kv_lora_rank (the latent), R qk_rope_head_dim,
N qk_nope_head_dim, V v_head_dim.

Two mathematically equal paths:
  * naive (training, prefill): expand the latent to per-head keys/values with kv_b_proj and run SDPA;
  * absorbed (decode): fold kv_b_proj's key half into the query and its value half into the output, so
    attention runs directly against the cached latent. Only the normalised latent [C] and the rotated
    rope key [R] are cached per token and layer: 61 x (512 + 64) values, 70,272 bytes per token for V3
    in BF16.
The softmax scale is that of qk_head_dim (N + R), never of the absorbed dimension: absorption changes
how the dot products are computed, not their values.

The cache is reached through CacheView, a small interface (write and read rows, positions, the mask) so
that the storage layout (contiguous rows here, the engine's own in nanoseek.infer.cache) is not the
model's business.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm, apply_rope


class CacheView:
    """One cached forward's window on a latent cache: the whole interface the model uses.

    The forward brings T new tokens for each of B rows; row b's tokens sit at positions
    start_pos[b] .. start_pos[b] + T - 1 of its own sequence, and each attends to every earlier position
    of that sequence. A cache implementation provides:
      positions  [B, T] absolute positions of the new tokens (the rope angles);
      prefill    True when every row starts at position 0 with several tokens: attention over the new
                 tokens alone is then complete, so MLA takes the naive path;
      write(layer, name, rows_BTW)  store the new tokens' rows of stream `name`; MLA stores "latent",
                 the [normalised latent | rotated rope key] row (C + R values) of each token;
      read(layer, name) -> [B, L, W] positions 0 .. L-1 of each row's sequence, L = kv_len (the longest
                 row's end; positions beyond a shorter row's end are masked out by the score bias);
      mask() -> [B, T, L] bool and score_bias(n_heads) -> [B, T*H, L] additive 0 / -inf, or None when
                 nothing is masked (every row brings one token at the same position).
    Streams are named so that an attention variant can cache more per token (stream widths come from
    Transformer.cache_layout). This base class holds the bookkeeping shared by every storage layout;
    each storage layout defines write and read itself: LatentCacheView below (contiguous rows, the
    reference) and the engine's paged cache in nanoseek.infer.cache. Everything that is the same for every layer is computed once
    per forward: at batch 1 a decode step is dominated by per-op overhead, not arithmetic.
    """

    def __init__(self, start_pos: torch.Tensor, n_new: int, starts: list[int] | None = None):
        """start_pos [B] on the model's device; `starts`, the same positions as host ints when the caller
        has them (the engine does): reading them back from a GPU tensor would be a host sync per step."""
        self.start_pos = start_pos
        self.n_new = n_new
        starts = start_pos.tolist() if starts is None else starts
        self.kv_len = max(starts) + n_new  # positions [0, kv_len) are read
        self.prefill = n_new > 1 and max(starts) == 0
        self.positions = start_pos[:, None] + torch.arange(n_new, device=start_pos.device)  # [B, T]
        # Every row sees every cached key only when all rows start at the same place and bring one token.
        self._needs_mask = n_new > 1 or min(starts) != max(starts)
        self._bias = None

    def mask(self) -> torch.Tensor:
        """[B, T, L] bool: query t of row b sees key j iff j <= start_pos[b] + t."""
        keys = torch.arange(self.kv_len, device=self.positions.device)
        return keys[None, None, :] <= self.positions[:, :, None]

    def score_bias(self, n_heads: int) -> torch.Tensor | None:
        """Additive mask [B, T*H, L] for scores laid out (token, head) per row; built once per forward."""
        if not self._needs_mask:
            return None
        if self._bias is None:
            B, T = self.positions.shape
            allowed = self.mask()
            bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
            bias = bias.masked_fill_(~allowed, float("-inf"))
            self._bias = bias[:, :, None, :].expand(B, T, n_heads, self.kv_len).reshape(B, T * n_heads, self.kv_len)
        return self._bias


class LatentCache:
    """The reference cache: per stream one preallocated [layers, rows, max_len, W] tensor.

    A cache row holds one sequence; a forward names the rows it runs on (LatentCache.view). Keeping the
    latent and the rope key in one row lets decode attention score the query against [latent | rope key]
    in a single batched GEMM. Writing at a smaller position simply overwrites (that is how speculative
    decoding rolls back).
    """

    def __init__(self, n_layers: int, rows: int, max_len: int, widths: dict[str, int], dtype: torch.dtype,
                 device: torch.device | str):
        self.n_layers, self.rows, self.max_len = n_layers, rows, max_len
        self.data = {name: torch.zeros(n_layers, rows, max_len, w, dtype=dtype, device=device)
                     for name, w in widths.items()}

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.data.values())).dtype

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.data.values())

    def view(self, rows: torch.Tensor, start_pos: torch.Tensor, n_new: int) -> "LatentCacheView":
        """The window of one forward: cache rows `rows` [B] bring n_new tokens at start_pos [B]."""
        return LatentCacheView(self, rows, start_pos, n_new)


class LatentCacheView(CacheView):
    def __init__(self, cache: LatentCache, rows: torch.Tensor, start_pos: torch.Tensor, n_new: int):
        super().__init__(start_pos, n_new)
        if self.kv_len > cache.max_len:
            raise ValueError(f"sequence length {self.kv_len} exceeds the cache length {cache.max_len}")
        row_list = rows.tolist()
        if max(row_list) >= cache.rows or min(row_list) < 0:
            raise ValueError(f"cache slot out of range [0, {cache.rows})")
        self.cache, self.slots, self._slot_list = cache, rows, row_list

    def write(self, layer: int, name: str, rows_BTW: torch.Tensor) -> None:
        store = self.cache.data[name][layer]
        store[self.slots[:, None].expand_as(self.positions), self.positions] = rows_BTW.to(store.dtype)

    def read(self, layer: int, name: str) -> torch.Tensor:
        return self.cache.data[name][layer][:, : self.kv_len].index_select(0, self.slots)


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
        # What a cache holds per token for this layer (CacheView.write / read).
        self.cache_widths = {"latent": cfg.kv_lora_rank + cfg.qk_rope_head_dim}

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
            out = self._naive(q_nope, q_rope, latent, k_rope)
        else:
            cache.write(layer, "latent", torch.cat([latent, k_rope], dim=-1))
            if cache.prefill:
                # Prefill from an empty slot: the naive path over the new tokens is the cheaper one.
                out = self._naive(q_nope, q_rope, latent, k_rope)
            else:
                out = self._absorbed(q_nope, q_rope, cache.read(layer, "latent"), cache.score_bias(self.n_heads))
        return self.o_proj(out.reshape(B, T, self.n_heads * self.v_dim).to(x.dtype))  # the cache may be narrower

    def _naive(self, q_nope, q_rope, latent_BLC, k_rope_BLR, mask_B1TL: torch.Tensor | None = None):
        """Causal attention over the given tokens with per-head keys and values expanded from the latent
        (or, given a boolean mask [B, 1, T, L], attention where it is True: V3.2's top-k selection)."""
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
        if mask_B1TL is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1TL, scale=self.scale)
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
